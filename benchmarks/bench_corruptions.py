"""Corruption generation throughput: `generate` with 2 worker processes vs the library in a plain serial loop.

Both corrupt the same Fashion-MNIST test images (28x28 gray; the serial loop feeds the library the same
32x32x3 reflect-padded arrays) with all 19 corruptions at severities 1-5. Throughput counts corrupted images
(image x corruption x severity) per second. Warm-ups first (glass_blur's numba compile in this process, the
fork server and its compile for the workers), then medians over repeats that alternate the variants. The
parallel figure is end to end: task shipping, per-(corruption, severity) part files, assembly, checksums.

    python benchmarks/bench_corruptions.py --images 300 --repeats 3

Target on this 2-core machine: parallel/serial >= 1.7. Last line: {"parallel_over_serial": <ratio>}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def serial_loop(lib, padded: np.ndarray, indices, names, seed: int = 0) -> int:
    from bnadapt.corruptions.names import SEEDED_BY_LIBRARY, corruption_seed

    n = 0
    for c in names:
        for s in range(1, 6):
            for img, i in zip(padded, indices):
                sd = corruption_seed(seed, c, s, i)
                np.random.seed(sd)
                kw = {"seed": sd} if c in SEEDED_BY_LIBRARY else {}
                lib.corrupt(img, severity=s, corruption_name=c, **kw)
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300,
                    help="images per variant (default 300: 28,500 corrupted images, so that pool start and file "
                         "writes, fixed costs of a few tenths of a second, weigh as little as in real sets)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corruptions", default="all")
    args = ap.parse_args()

    from bnadapt.corruptions.generate import generate, source_images
    from bnadapt.corruptions.names import parse_corruptions, require_library
    from bnadapt.data import select

    lib = require_library()
    names = parse_corruptions(args.corruptions)
    sel = select("fashion-mnist", "test", images=args.images)
    imgs = source_images(sel)
    padded = np.pad(np.repeat(imgs[..., None], 3, axis=3), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    work = Path(tempfile.mkdtemp(prefix="bench_corr_"))
    try:
        t = time.perf_counter()
        serial_loop(lib, padded[:1], sel.indices[:1], ["glass_blur"])
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        generate(select("fashion-mnist", "test", images=2), work / "warm", corruptions="glass_blur",
                 workers=args.workers, quiet=True)
        server_s = time.perf_counter() - t
        ser, par, ser_cpu, par_cpu = [], [], [], []
        for r in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            n = serial_loop(lib, padded, sel.indices, names)
            ser.append(n / (time.perf_counter() - t))
            ser_cpu.append(time.process_time() - c)
            t = time.perf_counter()
            g = generate(sel, work / f"p{r}", corruptions=names, workers=args.workers, quiet=True)
            par.append(n / (time.perf_counter() - t))
            # the wall time an idle machine with `workers` free cores would need: the busiest of the workers' share
            # of the corrupting CPU time and this process's own CPU time (files, checksums)
            par_cpu.append(max(g["corrupt_cpu_s"] / args.workers, g["main_cpu_s"]))
            shutil.rmtree(work / f"p{r}")
            print(f"repeat {r}: serial {ser[-1]:.0f} img/s, {args.workers} workers {par[-1]:.0f} img/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s, p = statistics.median(ser), statistics.median(par)
    proj = statistics.median(ser_cpu) / statistics.median(par_cpu)
    print(f"{args.images} Fashion-MNIST images x {len(names)} corruptions x 5 severities = {n} corrupted images")
    print(f"one-time costs: glass_blur numba compile {compile_s:.1f} s, fork server start + compile {server_s:.1f} s")
    print(f"serial library loop: {s:.0f} images/s (median of {args.repeats})")
    print(f"generate, {args.workers} workers: {p:.0f} images/s = {p / s:.2f}x serial (target >= 1.7x)")
    print(f"CPU-time projection for an idle machine with {args.workers} free cores: {proj:.2f}x serial (serial CPU "
          f"{statistics.median(ser_cpu):.1f} s vs max(worker CPU / {args.workers}, main CPU) "
          f"{statistics.median(par_cpu):.1f} s; an estimate, not a measurement)")
    print(f"extrapolated full Fashion-MNIST test set (10,000 x {len(names)} x 5 = {10000 * len(names) * 5:,}): "
          f"{10000 * len(names) * 5 / p / 60:.1f} min with {args.workers} workers, "
          f"{10000 * len(names) * 5 / s / 60:.1f} min serial")
    print(json.dumps({"parallel_over_serial": round(p / s, 3)}))


if __name__ == "__main__":
    main()
