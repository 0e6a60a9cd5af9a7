"""Thread count and OpenMP wait policy of `bnadapt noise` (or `bnadapt certify`) on a quiet and on a shared
machine.

A fixed workload (``--command noise``: ``bnadapt noise`` on zoo:adv-l2-1.5, 2,000 images, sigma 0.5, 1 run:
standard and adapted inference; ``--command certify``: ``bnadapt certify`` of the adapted zoo:adv-l2-1.5 at sigma
0.5 on 4 images with n = 20,000, eager, i.e. randomized-smoothing sampling) runs as a whole process with
``--threads 1`` and ``--threads 2`` under each OpenMP wait policy: ACTIVE (idle threads spin: torch's behaviour
when nothing sets it) and PASSIVE (idle threads sleep: what the bnadapt command sets unless the user did). "loaded"
runs beside a busy process that keeps one core at 100% (what another job on a shared 2-core machine does). Variants
alternate within each repeat; figures are medians. The results must be identical across variants (checked). Last
line: {"loaded_active_2t_over_1t": ..., "loaded_passive_2t_over_1t": ..., "quiet_passive_over_active_2t": ...} """

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(command: str, threads: int, policy: str, images: int, folder: Path) -> tuple[float, list]:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    common = ["--model", "zoo:adv-l2-1.5", "--threads", str(threads), "--device", "cpu", "--quiet"]
    if command == "noise":
        out = folder / "r.json"
        cmd = [sys.executable, "-m", "bnadapt.cli", "noise", *common, "--images", str(images), "--sigmas", "0.5",
               "--runs", "1", "--out", str(out)]
    else:
        for f in folder.glob("c*"):
            f.unlink()
        out = folder / "c.tsv"
        cmd = [sys.executable, "-m", "bnadapt.cli", "certify", *common, "--adapt", "--sigmas", "0.5", "--images",
               str(images), "--samples", "20000", "--no-compile", "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    dt = time.perf_counter() - t
    if command == "certify":  # every column but the time
        return dt, [line.rsplit("\t", 1)[0] for line in out.read_text().splitlines()]
    rows = json.loads(out.read_text())["results"]["rows"]
    return dt, [(r["standard"]["runs"], r["adapted"]["runs"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--command", choices=["noise", "certify"], default="noise")
    ap.add_argument("--images", type=int, default=None, help="default: 2000 for noise, 4 for certify")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.images is None:
        args.images = 2000 if args.command == "noise" else 4
    variants = [(t, p) for p in ("ACTIVE", "PASSIVE") for t in (1, 2)]
    times: dict[tuple, list[float]] = {}
    answers = set()
    with tempfile.TemporaryDirectory() as d:
        for load in ("quiet", "loaded"):
            burner = None
            if load == "loaded":
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for rep in range(args.repeats):
                    k = rep % len(variants)
                    for t, p in variants[k:] + variants[:k]:
                        dt, res = run_once(args.command, t, p, args.images, Path(d))
                        times.setdefault((load, t, p), []).append(dt)
                        answers.add(json.dumps(res))
            finally:
                if burner is not None:
                    burner.kill()
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "standard + adapted" if args.command == "noise" else "certify, n = 20,000, sigma 0.5, adapted"
    print(f"bnadapt {args.command}, {args.images} images, {what}, {args.repeats} repeats (median wall s):")
    for (load, t, p), v in sorted(med.items()):
        print(f"  {load:6s} threads={t} OMP_WAIT_POLICY={p:7s} {v:7.2f} s")
    print(f"identical results across all variants: {len(answers) == 1}")
    fig = {
        "loaded_active_2t_over_1t": round(med[("loaded", 2, "ACTIVE")] / med[("loaded", 1, "ACTIVE")], 3),
        "loaded_passive_2t_over_1t": round(med[("loaded", 2, "PASSIVE")] / med[("loaded", 1, "PASSIVE")], 3),
        "quiet_passive_over_active_2t": round(med[("quiet", 2, "PASSIVE")] / med[("quiet", 2, "ACTIVE")], 3),
        "quiet_2t_over_1t_passive": round(med[("quiet", 2, "PASSIVE")] / med[("quiet", 1, "PASSIVE")], 3),
        "identical_results": len(answers) == 1, "command": args.command,
    }
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
