"""Wall time of the Fashion-MNIST-C pipeline: generate the test set corrupted (N x 19 x 5) and evaluate one
zoo model on all of it without and with adaptive BN (the mCE reference, zoo:baseline, measured once on the
way), through the CLI, timed stage by stage, with the full-size figures extrapolated linearly in N.

    # a slice (what the report quotes), then the full run (10,000 images; long: run it on a quiet machine)
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/wall_fmnist_c.py --images 200 --dir /tmp/fmnist-c-200
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/wall_fmnist_c.py --images 10000 --dir /data/fmnist-c

Each stage is a separate ``python -m bnadapt.cli`` process (its start-up is included). Last line: JSON with
the measured and extrapolated seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FULL = 10000


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    print("$ bnadapt " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "bnadapt.cli", *argv], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="test images (10000 = the whole test set)")
    ap.add_argument("--dir", required=True, help="cache folder (reused when it already holds the set)")
    ap.add_argument("--model", default="zoo:adv-linf-0.1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    n = args.images
    images = [] if n >= FULL else ["--images", str(n)]
    gen = timed(["corruptions", "generate", *images, "--out", args.dir, "--workers", str(args.workers), "--quiet"])
    ev = timed(["corruptions", "evaluate", "--model", args.model, "--data", f"cifar10-c:{args.dir}",
                "--batch-size", str(args.batch_size), "--runs", str(args.runs), "--device", args.device,
                "--threads", str(args.threads), "--quiet", "--out", str(Path(args.dir) / f"eval-{n}.json"),
                "--csv", str(Path(args.dir) / f"eval-{n}.csv")])
    scale = FULL / n
    print(f"{n} images ({env_note}, {args.workers} workers, {args.threads} torch threads, {args.device}): "
          f"generate {gen:.1f} s, evaluate {ev:.1f} s (reference zoo:baseline + {args.model}, {args.runs} adapted runs)")
    print(f"extrapolated to {FULL}: generate {gen * scale / 60:.1f} min, evaluate {ev * scale / 60:.1f} min "
          "(linear in images; process start-up and the fork server's compile are counted once per slice, "
          "so this slightly overestimates)")
    print(json.dumps({"images": n, "generate_s": round(gen, 1), "evaluate_s": round(ev, 1),
                      "full_generate_s": round(gen * scale), "full_evaluate_s": round(ev * scale)}))


if __name__ == "__main__":
    main()
