"""Per-batch adapted inference vs standard eval inference of the same model on the same batches.

Fashion-MNIST-sized pre-activation ResNet (depth 2, widths 16/32/64, ~175k parameters), batch 512,
both in channels_last, under torch.inference_mode. Each repeat times a pass over the same batches with
each model, alternating the order; the figure is the median over repeats of the per-repeat ratio
(adapted / standard). Target (issue 2): at most 1.15.
Last line: {"adapted_over_standard": <ratio>, ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bnadapt.adapt import adapt
from bnadapt.models import PreActResNet
from bnadapt.noise import prepare


def timed(model, batches) -> float:
    t = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rho", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = PreActResNet(depth=2)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(256, 1, 28, 28))
    std = prepare(model)
    ada = prepare(adapt(model, args.rho))
    batches = [torch.rand(args.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
               for _ in range(args.batches)]
    ratios, t_std, t_ada = [], [], []
    with torch.inference_mode():
        timed(std, batches[:2]), timed(ada, batches[:2])  # warm-up
        for r in range(args.repeats):
            if r % 2:
                a, s = timed(ada, batches), timed(std, batches)
            else:
                s, a = timed(std, batches), timed(ada, batches)
            t_std.append(s)
            t_ada.append(a)
            ratios.append(a / s)
    n = args.batch_size * args.batches
    print(f"batch {args.batch_size}, {args.batches} batches, {args.repeats} repeats, rho={args.rho}, "
          f"threads={torch.get_num_threads()}")
    print(f"standard eval : median {n / statistics.median(t_std):8.0f} img/s")
    print(f"adapted (per-batch): median {n / statistics.median(t_ada):8.0f} img/s")
    print(f"ratio adapted/standard: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(json.dumps({"adapted_over_standard": round(statistics.median(ratios), 4),
                      "standard_img_s": round(n / statistics.median(t_std)),
                      "adapted_img_s": round(n / statistics.median(t_ada)), "rho": args.rho,
                      "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
