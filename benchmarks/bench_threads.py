"""Thread count and OpenMP wait policy of `bnadapt noise` on a quiet and on a shared machine.

A fixed workload (``bnadapt noise`` on zoo:adv-l2-1.5, 2,000 images, sigma 0.5, 1 run: standard and
adapted inference) runs as a whole process with ``--threads 1`` and ``--threads 2`` under each OpenMP
wait policy: ACTIVE (idle threads spin: torch's behaviour when nothing sets it) and PASSIVE (idle threads
sleep: what the bnadapt command sets unless the user did). "loaded" runs beside a busy process that keeps
one core at 100% (what another job on a shared 2-core machine does). Variants alternate within each
repeat; figures are medians. The results must be identical across variants (checked).
Last line: {"loaded_active_2t_over_1t": ..., "loaded_passive_2t_over_1t": ..., "quiet_passive_over_active_2t": ...}
"""

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


def run_once(threads: int, policy: str, images: int, out: Path) -> tuple[float, list]:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    cmd = [sys.executable, "-m", "bnadapt.cli", "noise", "--model", "zoo:adv-l2-1.5", "--images", str(images),
           "--sigmas", "0.5", "--runs", "1", "--threads", str(threads), "--device", "cpu", "--quiet", "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    dt = time.perf_counter() - t
    rows = json.loads(out.read_text())["results"]["rows"]
    return dt, [(r["standard"]["runs"], r["adapted"]["runs"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    variants = [(t, p) for p in ("ACTIVE", "PASSIVE") for t in (1, 2)]
    times: dict[tuple, list[float]] = {}
    answers = set()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        for load in ("quiet", "loaded"):
            burner = None
            if load == "loaded":
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for rep in range(args.repeats):
                    k = rep % len(variants)
                    for t, p in variants[k:] + variants[:k]:
                        dt, res = run_once(t, p, args.images, out)
                        times.setdefault((load, t, p), []).append(dt)
                        answers.add(json.dumps(res))
            finally:
                if burner is not None:
                    burner.kill()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bnadapt noise, {args.images} images, standard + adapted, {args.repeats} repeats (median wall s):")
    for (load, t, p), v in sorted(med.items()):
        print(f"  {load:6s} threads={t} OMP_WAIT_POLICY={p:7s} {v:7.2f} s")
    print(f"identical results across all variants: {len(answers) == 1}")
    fig = {
        "loaded_active_2t_over_1t": round(med[("loaded", 2, "ACTIVE")] / med[("loaded", 1, "ACTIVE")], 3),
        "loaded_passive_2t_over_1t": round(med[("loaded", 2, "PASSIVE")] / med[("loaded", 1, "PASSIVE")], 3),
        "quiet_passive_over_active_2t": round(med[("quiet", 2, "PASSIVE")] / med[("quiet", 2, "ACTIVE")], 3),
        "quiet_2t_over_1t_passive": round(med[("quiet", 2, "PASSIVE")] / med[("quiet", 1, "PASSIVE")], 3),
        "identical_results": len(answers) == 1,
    }
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
