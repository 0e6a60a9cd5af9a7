"""Per-batch adapted inference vs standard eval inference of the same model on the same batches.

Default: the Fashion-MNIST pre-activation ResNet (depth 2, widths 16/32/64, ~175k parameters), batch
512; ``--arch resnet50 --image-size 224`` (random weights, BN statistics warmed up) for GPU figures.
Both models in channels_last under torch.inference_mode (and ``--precision`` autocast). Each repeat
times a pass over the same batches with the standard model and the adapted model at every rho,
rotating the order; a figure is the median over repeats of the per-repeat ratio adapted / standard.
Targets (issue 7): <= 1.15 on the CPU at rho 1 and at rho 0.5 (rho < 1 costs no more than rho 1).
Last line: {"adapted_over_standard": <rho 1>, "adapted_over_standard_rho05": <rho 0.5>, ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bnadapt.adapt import adapt
from bnadapt.models import PreActResNet, ResNet50
from bnadapt.runs import autocast, prepare_model, resolve_device


def timed(model, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for x in batches:
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="preact_resnet", choices=["preact_resnet", "resnet50"])
    ap.add_argument("--image-size", type=int, default=None, help="default 28 (preact_resnet) or 224 (resnet50)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 (preact_resnet) or 256 (resnet50)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rho", default="1,0.5", help="comma-separated rho values (default 1,0.5)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    dev = resolve_device(args.device)
    rhos = [float(r) for r in args.rho.split(",")]
    torch.manual_seed(0)
    if args.arch == "resnet50":
        size, bs, ch = args.image_size or 224, args.batch_size or 256, 3
        model = ResNet50()
    else:
        size, bs, ch = args.image_size or 28, args.batch_size or 512, 1
        model = PreActResNet(depth=2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, ch, size, size))
    std = prepare_model(model, dev)
    adapted = {r: prepare_model(adapt(model, r), dev) for r in rhos}
    batches = [torch.rand(bs, ch, size, size, device=dev).contiguous(memory_format=torch.channels_last)
               for _ in range(args.batches)]
    names = ["standard"] + [f"rho={r:g}" for r in rhos]
    nets = [std] + [adapted[r] for r in rhos]
    times = {n: [] for n in names}
    with torch.inference_mode(), autocast(dev, args.precision):
        for net in nets:  # warm-up
            timed(net, batches[:2], dev)
        for rep in range(args.repeats):
            k = rep % len(nets)
            for name, net in list(zip(names, nets))[k:] + list(zip(names, nets))[:k]:
                times[name].append(timed(net, batches, dev))
    n = bs * args.batches
    ratios = {r: statistics.median(a / s for a, s in zip(times[f"rho={r:g}"], times["standard"])) for r in rhos}
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"{args.arch} {ch}x{size}x{size}, batch {bs}, {args.batches} batches, {args.repeats} repeats, device {dev}"
          f"{' (' + gpu + ')' if gpu else ''}, {args.precision}, threads={torch.get_num_threads()}")
    for name in names:
        print(f"  {name:9s} median {n / statistics.median(times[name]):9.0f} img/s")
    for r in rhos:
        print(f"  adapted/standard at rho={r:g}: median {ratios[r]:.3f}")
    out = {"adapted_over_standard": round(ratios.get(1.0, float("nan")), 4),
           "adapted_over_standard_rho05": round(ratios.get(0.5, float("nan")), 4),
           "standard_img_s": round(n / statistics.median(times["standard"])), "device": str(dev), "gpu": gpu,
           "arch": args.arch, "batch_size": bs, "precision": args.precision}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
