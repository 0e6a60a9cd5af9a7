"""Noise samples per second of randomized-smoothing sampling on the zoo's adapted adv-l2 model.

Three ways to push noisy copies of one image through the same frozen adapted model (batch 1,000):

- ``certify``: :meth:`bnadapt.smoothing.Smooth.sample_counts` as ``bnadapt certify`` uses it (noise
  written into a preallocated channels_last buffer, counts accumulated by ``bincount`` on the device)
  on the model as ``bnadapt certify`` prepares it (channels_last, ``torch.compile`` unless --no-compile);
- (a) ``plain``: the published loop (``x.repeat``, ``randn_like``, ``argmax``, counting on the host) on
  the model as loaded (eager, default memory format), as Cohen et al.'s code runs it;
- (b) ``forward-only``: the certify model on pre-generated noisy batches, nothing else (the limit).

Each repeat times the three in rotating order on the same number of samples; the figures are medians
over repeats of per-repeat ratios. Targets (issue 4): certify/plain >= 1.5, certify/forward-only >= 0.85.
Last line: {"vs_plain": <ratio>, "vs_forward_only": <fraction>, ...}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from bnadapt.adapt import adapt_then_freeze
from bnadapt.data import load_dataset
from bnadapt.models import load_model
from bnadapt.noise import prepare
from bnadapt.smoothing import Smooth, plain_sample_counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:adv-l2-1.5")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000, help="samples per timed measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    ds = load_dataset("fashion-mnist", split="test")
    calib, _ = ds.get(range(512))
    frozen = adapt_then_freeze(loaded.model, calib + args.sigma * torch.randn(calib.shape), 1.0)
    plain_model = copy.deepcopy(frozen).eval()
    fast_model = prepare(copy.deepcopy(frozen), compile=not args.no_compile)
    nc = len(ds.class_names)
    smooth = Smooth(fast_model, nc, args.sigma, batch_size=args.batch)
    x, _ = ds.get([0])
    x = x[0]
    nb = args.samples // args.batch
    pre = [(x + args.sigma * torch.randn(args.batch, *x.shape)).contiguous(memory_format=torch.channels_last)
           for _ in range(nb)]

    def run_certify():
        smooth.sample_counts(x, args.samples, torch.Generator().manual_seed(1))

    def run_plain():
        plain_sample_counts(plain_model, x, args.samples, args.sigma, args.batch, nc)

    def run_forward():
        with torch.inference_mode():
            for b in pre:
                fast_model(b).argmax(1)

    fns = {"certify": run_certify, "plain": run_plain, "forward_only": run_forward}
    for f in fns.values():  # warm-up (and compilation)
        f()
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.repeats):
        for k in order[r % 3:] + order[:r % 3]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    vs_plain = statistics.median(p / c for p, c in zip(times["plain"], times["certify"]))
    vs_fwd = statistics.median(f / c for f, c in zip(times["forward_only"], times["certify"]))
    rate = {k: args.samples / statistics.median(v) for k, v in times.items()}
    print(f"model {args.model} adapted at sigma={args.sigma}, batch {args.batch}, {args.samples} samples x "
          f"{args.repeats} repeats, compile={not args.no_compile}, threads={torch.get_num_threads()}")
    for k, v in rate.items():
        print(f"  {k:13s} {v:9.0f} samples/s (median)")
    print(f"certify / plain = {vs_plain:.2f}x   certify / forward-only = {vs_fwd:.2f}")
    print(json.dumps({"vs_plain": round(vs_plain, 3), "vs_forward_only": round(vs_fwd, 3),
                      "certify_samples_s": round(rate["certify"]), "plain_samples_s": round(rate["plain"]),
                      "forward_only_samples_s": round(rate["forward_only"]), "compile": not args.no_compile}))


if __name__ == "__main__":
    main()
