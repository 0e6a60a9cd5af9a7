"""Online (stream) adaptation: accuracy at small batches and the cost per image (issue 12).

(1) Accuracy: an i.i.d. stream of Fashion-MNIST test images under sigma = 0.5 noise, classified by the
    zoo's adv-l2-1.5 and adv-linf-0.1 with standard inference, the paper's per-batch adaptation (rho 1)
    at batch 512 and 8, and the online estimators (defaults: ema momentum 0.01, window 256, prior
    N = 16) at batch 1 and 8 (:func:`bnadapt.stream.stream_evaluation`, the same streams for every
    method). Default: 2,000 images x 2 runs (a few minutes on 2 CPU cores); the full measurement is
    ``--images 10000 --runs 5`` (printed at the end).
(2) Cost per image of online adapted inference against standard inference of the same model at the
    same batch size (batches 1 and 8; the zoo architecture, channels_last, torch.inference_mode, one
    thread unless --threads): each repeat times a pass over the same batches with every variant, in a
    rotating order; a figure is the median over repeats of the per-repeat ratio. Target: <= 1.3.

Last line: {"online_over_standard_b1": <ema>, "online_over_standard_b8": <ema>, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bnadapt.adapt import stream_adapt
from bnadapt.runs import prepare_model, resolve_device, set_threads

MODELS = ("zoo:adv-l2-1.5", "zoo:adv-linf-0.1")


def accuracy_part(args, dev) -> dict:
    from bnadapt.data import select
    from bnadapt.models import load_model
    from bnadapt.stream import stream_evaluation

    sel = select("fashion-mnist", images=args.images)
    models = [load_model(m) for m in MODELS]
    res = stream_evaluation(models, sel, batch_sizes=(1, 8, 512), runs=args.runs, sigma=0.5, scenario="iid",
                            device=dev, quiet=True)
    if args.out:
        res.write(args.out)
    out = {}
    print(f"(1) online accuracy, i.i.d. stream of {len(sel)} Fashion-MNIST test images at sigma 0.5, "
          f"{args.runs} run(s), mean over runs (%):")
    print(f"  {'model':14s} {'standard':>9s} {'pb@512':>7s} {'pb@8':>6s} " +
          " ".join(f"{e + '@' + str(b):>10s}" for e in ("ema", "window", "prior") for b in (1, 8)))
    for name in {r["model"]: None for r in res.results["rows"]}:
        rows = {r["batch_size"]: r["methods"] for r in res.results["rows"] if r["model"] == name}
        cells = {"standard": rows[512]["standard"]["mean"], "per_batch_b512": rows[512]["per-batch"]["mean"],
                 "per_batch_b8": rows[8]["per-batch"]["mean"]}
        for e in ("ema", "window", "prior"):
            for b in (1, 8):
                cells[f"{e}_b{b}"] = rows[b][e]["mean"]
        print(f"  {name:14s} {100 * cells['standard']:9.1f} {100 * cells['per_batch_b512']:7.1f} "
              f"{100 * cells['per_batch_b8']:6.1f} " +
              " ".join(f"{100 * cells[f'{e}_b{b}']:10.1f}" for e in ("ema", "window", "prior") for b in (1, 8)))
        print(f"  {'':14s} ema@1 - per-batch@512: {100 * (cells['ema_b1'] - cells['per_batch_b512']):+.1f} points; "
              f"ema@1 - standard: {100 * (cells['ema_b1'] - cells['standard']):+.1f} points")
        out[name] = {k: round(v, 4) for k, v in cells.items()}
    print(f"  (per-batch adaptation cannot run at batch 1; wall {res.wall_s:.0f} s)")
    return out


def timed(net, batches, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for x in batches:
        net(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def cost_part(args, dev) -> dict:
    from bnadapt.models import load_model

    model = load_model(MODELS[0]).model
    variants = {"standard": lambda: model, "ema": lambda: stream_adapt(model, estimator="ema"),
                "ema_rho05": lambda: stream_adapt(model, 0.5, estimator="ema"),
                "window": lambda: stream_adapt(model, estimator="window"),
                "prior": lambda: stream_adapt(model, estimator="prior")}
    out = {}
    print(f"(2) cost per image vs standard inference ({MODELS[0]} architecture, device {dev}, "
          f"threads={torch.get_num_threads()}, {args.repeats} repeats, median of per-repeat ratios):")
    for b in (1, 8):
        n_batches = max(8, args.images_per_pass // b)
        g = torch.Generator().manual_seed(b)
        batches = [(torch.rand(b, 1, 28, 28, generator=g) + 0.5 * torch.randn(b, 1, 28, 28, generator=g))
                   .to(dev).contiguous(memory_format=torch.channels_last) for _ in range(n_batches)]
        nets = {k: prepare_model(f(), dev) for k, f in variants.items()}
        names = list(nets)
        times = {k: [] for k in names}
        with torch.inference_mode():
            for k in names:
                timed(nets[k], batches[:4], dev)
            for rep in range(args.repeats):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for k in order:
                    times[k].append(timed(nets[k], batches, dev))
        n = b * n_batches
        std_us = 1e6 * statistics.median(times["standard"]) / n
        line = [f"  batch {b}: standard {std_us:7.1f} us/img"]
        for k in names[1:]:
            ratio = statistics.median(a / s for a, s in zip(times[k], times["standard"]))
            out[f"{k}_over_standard_b{b}"] = round(ratio, 3)
            line.append(f"{k} {ratio:.2f}x")
        out[f"standard_us_per_image_b{b}"] = round(std_us, 1)
        print(", ".join(line))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=2000, help="stream length of the accuracy part (full: 10000)")
    ap.add_argument("--runs", type=int, default=2, help="streams per setting in the accuracy part (full: 5)")
    ap.add_argument("--repeats", type=int, default=9, help="timing repeats")
    ap.add_argument("--images-per-pass", type=int, default=400, help="images per timed pass")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", default=None, help="also write the accuracy part's stream result (.json)")
    args = ap.parse_args()
    set_threads(args.threads)
    dev = resolve_device(args.device)
    acc = {} if args.skip_accuracy else accuracy_part(args, dev)
    cost = cost_part(args, dev)
    print("full accuracy measurement: PYTHONPATH=$PWD python benchmarks/bench_stream.py --images 10000 --runs 5 "
          f"--device {args.device} --out stream_iid_sigma05.json", file=sys.stderr)
    last = {"online_over_standard_b1": cost["ema_over_standard_b1"],
            "online_over_standard_b8": cost["ema_over_standard_b8"], **cost, "accuracy": acc,
            "device": str(dev), "threads": torch.get_num_threads(), "images": args.images, "runs": args.runs}
    print(json.dumps(last))


if __name__ == "__main__":
    main()
