"""Noise samples per second of randomized-smoothing sampling on an adapted, frozen model.

Default: the zoo's adv-l2-1.5 adapted at sigma 0.5 (Fashion-MNIST); ``--arch resnet50 --image-size 224``
uses a ResNet-50 with random weights (BN statistics warmed up, then adapted on noisy random images):
speed does not depend on the weights. ``--device`` and ``--precision`` (fp32, bf16, fp16 on CUDA).

Three ways to push noisy copies of one image through the same frozen adapted model (batch 1,000):

- ``certify``: :meth:`bnadapt.smoothing.Smooth.sample_counts` as ``bnadapt certify`` uses it (noise
  written into a preallocated channels_last buffer, counts accumulated by ``bincount`` on the device)
  on the model as ``bnadapt certify`` prepares it (channels_last, ``torch.compile`` unless --no-compile);
- (a) ``plain``: the published loop (``x.repeat``, ``randn_like``, ``argmax``, counting on the host) on
  the model as loaded (eager, default memory format), as Cohen et al.'s code runs it;
- (b) ``forward-only``: the certify model on pre-generated noisy batches, nothing else (the limit);
- (c) ``eager``: certify's sampling on the same model prepared without ``torch.compile`` (what
  ``--no-compile`` runs): ``compile_gain`` = certify / eager says whether compiling pays on this device.

Each repeat times the three in rotating order on the same number of samples; the figures are medians
over repeats of per-repeat ratios. Targets (issue 4, CPU): certify/plain >= 1.5, certify/forward-only
>= 0.85. Also printed: the seconds to certify one image at n = 100,000 (+ n0 = 100) at the certify rate.
Last line: {"vs_plain": <ratio>, "vs_forward_only": <fraction>, "seconds_per_image_n100k": ..., ...}
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
from bnadapt.models import ResNet50, load_model
from bnadapt.runs import autocast, prepare_model, resolve_device
from bnadapt.smoothing import Smooth, plain_sample_counts


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:adv-l2-1.5")
    ap.add_argument("--arch", default=None, choices=[None, "resnet50"], help="resnet50: random weights instead of --model")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000, help="samples per timed measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    if args.arch == "resnet50":
        model = ResNet50().train()
        s = args.image_size
        with torch.no_grad():
            model(torch.rand(16, 3, s, s))
        x = torch.rand(3, s, s)
        calib = torch.rand(64, 3, s, s)
        nc, what = 1000, f"resnet50 3x{s}x{s} (random weights)"
    else:
        loaded = load_model(args.model)
        ds = load_dataset("fashion-mnist", split="test")
        calib, _ = ds.get(range(512))
        x = ds.get([0])[0][0]
        nc, what = len(ds.class_names), args.model
    frozen = adapt_then_freeze(model if args.arch else loaded.model, calib + args.sigma * torch.randn(calib.shape), 1.0)
    plain_model = copy.deepcopy(frozen).eval().to(dev)
    fast_model = prepare_model(copy.deepcopy(frozen), dev, compile=not args.no_compile)
    smooth = Smooth(fast_model, nc, args.sigma, batch_size=args.batch, precision=args.precision)
    eager_smooth = Smooth(prepare_model(copy.deepcopy(frozen), dev, compile=False), nc, args.sigma,
                          batch_size=args.batch, precision=args.precision)
    nb = args.samples // args.batch
    xd = x.to(dev)
    pre = [(xd + args.sigma * torch.randn(args.batch, *x.shape, device=dev)).contiguous(memory_format=torch.channels_last)
           for _ in range(nb)]

    def run_certify():
        smooth.sample_counts(x, args.samples, torch.Generator(device=dev).manual_seed(1))

    def run_eager():
        eager_smooth.sample_counts(x, args.samples, torch.Generator(device=dev).manual_seed(1))

    def run_plain():
        with autocast(dev, args.precision):
            plain_sample_counts(plain_model, x, args.samples, args.sigma, args.batch, nc)

    def run_forward():
        with torch.inference_mode(), autocast(dev, args.precision):
            for b in pre:
                fast_model(b).argmax(1)

    fns = {"certify": run_certify, "plain": run_plain, "forward_only": run_forward, "eager": run_eager}
    for f in fns.values():  # warm-up (and compilation)
        f()
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:
            _sync(dev)
            t = time.perf_counter()
            fns[k]()
            _sync(dev)
            times[k].append(time.perf_counter() - t)
    vs_plain = statistics.median(p / c for p, c in zip(times["plain"], times["certify"]))
    vs_fwd = statistics.median(f / c for f, c in zip(times["forward_only"], times["certify"]))
    gain = statistics.median(e / c for e, c in zip(times["eager"], times["certify"]))
    rate = {k: args.samples / statistics.median(v) for k, v in times.items()}
    per_image = 100_100 / rate["certify"]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"{what} adapted at sigma={args.sigma}, batch {args.batch}, {args.samples} samples x {args.repeats} repeats, "
          f"compile={not args.no_compile}, {args.precision}, device {dev}{' (' + gpu + ')' if gpu else ''}, "
          f"threads={torch.get_num_threads()}")
    for k, v in rate.items():
        print(f"  {k:13s} {v:9.0f} samples/s (median)")
    print(f"certify / plain = {vs_plain:.2f}x   certify / forward-only = {vs_fwd:.2f}   "
          f"one image at n = 100,000: {per_image:.1f} s   compiled / eager = {gain:.2f}x")
    print(json.dumps({"vs_plain": round(vs_plain, 3), "vs_forward_only": round(vs_fwd, 3),
                      "certify_samples_s": round(rate["certify"]), "plain_samples_s": round(rate["plain"]),
                      "forward_only_samples_s": round(rate["forward_only"]),
                      "eager_samples_s": round(rate["eager"]), "compile_gain": round(gain, 3),
                      "seconds_per_image_n100k": round(per_image, 2), "compile": not args.no_compile,
                      "precision": args.precision, "device": str(dev), "gpu": gpu, "model": what}))


if __name__ == "__main__":
    main()
