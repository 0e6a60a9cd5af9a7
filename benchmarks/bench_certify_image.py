"""Wall time to certify one image at n = 100,000 (n0 = 100, alpha = 0.001, batch 1,000) for each zoo
model, adapted-then-frozen at sigma = 0.5 on 512 calibration images, as ``bnadapt certify --adapt`` runs
it (channels_last, torch.compile unless --no-compile; compilation excluded). Median over --images
images. Last line: {"seconds_per_image": {"<model>": s, ...}, "n": 100000}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bnadapt.adapt import adapt_then_freeze
from bnadapt.data import load_dataset
from bnadapt.models import load_model, zoo_names
from bnadapt.runs import prepare_model as prepare
from bnadapt.smoothing import Smooth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist", split="test")
    calib, _ = ds.get(range(9000, 9512))
    g = torch.Generator().manual_seed(0)
    noisy = calib + args.sigma * torch.randn(calib.shape, generator=g)
    out = {}
    for name in zoo_names():
        model = prepare(adapt_then_freeze(load_model(f"zoo:{name}").model, noisy, 1.0), compile=not args.no_compile)
        smooth = Smooth(model, len(ds.class_names), args.sigma, batch_size=1000)
        x0, _ = ds.get([0])
        smooth.certify(x0[0], 100, 2000, 0.001, torch.Generator().manual_seed(0))  # warm-up / compile
        times = []
        for i in range(args.images):
            x, _ = ds.get([i])
            t = time.perf_counter()
            smooth.certify(x[0], 100, args.n, 0.001, torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - t)
        out[name] = round(statistics.median(times), 2)
        print(f"{name:14s} {out[name]:7.2f} s per image (n={args.n}, median of {args.images}; "
              f"{args.n / out[name]:.0f} samples/s)")
    print(json.dumps({"seconds_per_image": out, "n": args.n, "compile": not args.no_compile}))


if __name__ == "__main__":
    main()
