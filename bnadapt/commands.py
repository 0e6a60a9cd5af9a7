"""Foundation subcommands: ``adapt``, ``noise``, ``sweep``, ``zoo``; and the argument helpers that
every subcommand shares (``--model``/``--arch``, ``--data``/``--split``/``--n``/``--per-class``).

Every command validates all its arguments before any work, writes its JSON result atomically at the
end (a result file that exists is complete), and prints a readable table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnadapt.errors import BnadaptError, check

DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75)


# ----------------------------------------------------------------------------- shared argument helpers
def add_model_args(p: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    help_ = "zoo:NAME, a .safetensors checkpoint, a .pt/.pth state dict (with --arch), TorchScript, or module:factory"
    if multiple:
        p.add_argument("--model", action="append", required=True, help=help_ + " (repeatable)")
    else:
        p.add_argument("--model", required=True, help=help_)
    p.add_argument("--arch", default=None, help="architecture of a .pt/.pth state dict (preact_resnet, resnet50)")
    p.add_argument("--arch-args", default=None, help='JSON object of architecture arguments, e.g. \'{"num_classes": 10}\'')


def add_data_args(p: argparse.ArgumentParser, *, default_n: int | None = None) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist[:ROOT], cifar10:PATH, folder:PATH, or an .npz/.npy file (default fashion-mnist)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default test)")
    p.add_argument("--images", dest="n", type=int, default=default_n,
                   help="use a deterministic subset of N images (default: all)")
    p.add_argument("--per-class", type=int, default=None, help="at most K images per class in the subset")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset choice (default 0)")


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BnadaptError(f"{what} must be comma-separated numbers (got {text!r})") from None
    check(len(vals) > 0, f"{what} is empty; give comma-separated numbers")
    return vals


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BnadaptError(f"{what} must be comma-separated integers (got {text!r})") from None
    check(len(vals) > 0, f"{what} is empty; give comma-separated integers")
    return vals


def model_from_args(args, spec: str | None = None):
    from bnadapt.models import load_model

    arch_args = None
    if getattr(args, "arch_args", None):
        try:
            arch_args = json.loads(args.arch_args)
        except json.JSONDecodeError as e:
            raise BnadaptError(f"--arch-args is not valid JSON ({e})") from None
        check(isinstance(arch_args, dict), "--arch-args must be a JSON object")
    return load_model(spec or args.model, arch=getattr(args, "arch", None), arch_args=arch_args)


def data_from_args(args):
    """(dataset, indices or None, data description dict)."""
    from bnadapt.data import load_dataset, subset_indices

    ds = load_dataset(args.data, split=args.split)
    indices = None
    if args.n is not None or args.per_class is not None:
        n = args.n if args.n is not None else len(ds)
        check(n >= 1, f"--images must be >= 1 (got {n})")
        indices = subset_indices(ds.labels, n, args.per_class, seed=args.subset_seed)
    desc = {"name": ds.name, "spec": args.data, "split": args.split, "size": len(ds),
            "n": len(ds) if indices is None else int(len(indices)),
            "per_class": args.per_class, "subset_seed": args.subset_seed}
    return ds, indices, desc


def model_desc(loaded) -> dict[str, Any]:
    return {"spec": loaded.source, "sha256": loaded.sha256, "arch": loaded.card.get("arch"),
            "card_name": loaded.card.get("name")}


def check_output_path(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    check(not path.is_dir(), f"--out {out} is a folder; give a file path")
    check(path.parent.exists() or str(path.parent) == "", f"folder {path.parent} of --out does not exist; create it first")
    return path


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None, file=sys.stderr)


def validate_shape(loaded, ds) -> None:
    from bnadapt.models import check_input_shape

    check_input_shape(loaded, tuple(ds.image_shape))


# ----------------------------------------------------------------------------- noise (Table 1)
def cmd_noise(args) -> int:
    from bnadapt.adapt import check_model, check_rho
    from bnadapt.noise import check_sigma, evaluate_cell, format_table, prepare
    from bnadapt.results import provenance, write_json

    sigmas = [check_sigma(s) for s in parse_float_list(args.sigmas, "--sigmas")]
    rho = check_rho(args.rho)
    check(args.runs >= 1, f"--runs must be >= 1 (got {args.runs})")
    check(args.batch_size >= 2, f"--batch-size must be >= 2 for per-batch adaptation (got {args.batch_size})")
    out = check_output_path(args.out)
    models = [model_from_args(args, spec) for spec in args.model]
    ds, indices, data = data_from_args(args)
    for m in models:
        validate_shape(m, ds)
        check_model(m.model)
    n_img = data["n"]
    total = len(models) * len(sigmas) * args.runs * 2 * n_img
    bar = progress_bar(total, "noise")
    results = []
    t0 = time.time()
    for m in models:
        net = prepare(m.model)
        for s in sigmas:
            row = {"model": m.source, "sigma": s}
            for key, r in (("standard", None), ("adapted", rho)):
                cell = evaluate_cell(net, ds, sigma=s, rho=r, batch_size=args.batch_size, runs=args.runs,
                                     seed=args.seed, indices=indices, progress=bar)
                row[key] = cell.as_dict()
            results.append(row)
    bar.close()
    rows = []
    for m in models:
        name = m.card.get("name") or m.source
        for key, label in (("standard", name), ("adapted", "  + adaptive BN")):
            cells = [r[key] for r in results if r["model"] == m.source]
            rows.append([label] + [f"{100 * c['mean']:.1f} ± {100 * c['two_sd']:.2f}" for c in cells])
    table = format_table(["model"] + [f"sigma={s:g}" for s in sigmas], rows)
    print(f"Top-1 accuracy (%) under Gaussian noise, mean ± 2 sd over {args.runs} runs, "
          f"{n_img} images, batch {args.batch_size}, rho={rho}")
    print(table)
    if out:
        write_json(out, {
            "experiment": "noise_table", "provenance": provenance(wall_s=round(time.time() - t0, 2)),
            "models": [model_desc(m) for m in models], "data": data,
            "params": {"sigmas": sigmas, "rho": rho, "batch_size": args.batch_size, "runs": args.runs,
                       "seed": args.seed, "interpolate": "std", "noise": "pixel space, no clipping"},
            "results": results, "table": table,
        })
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- sweep (Tables 4, 5)
def cmd_sweep(args) -> int:
    from bnadapt.adapt import check_model, check_rho
    from bnadapt.noise import check_sigma, evaluate_cell, format_table, prepare
    from bnadapt.results import provenance, write_json

    sigma = check_sigma(args.sigma)
    check(args.runs >= 1, f"--runs must be >= 1 (got {args.runs})")
    if args.over == "rho":
        values = [check_rho(v) for v in parse_float_list(args.values or "0,0.1,0.3,0.5,0.7,0.9,1.0", "--values")]
        check(args.batch_size >= 2, f"--batch-size must be >= 2 (got {args.batch_size})")
        settings = [(v, args.batch_size) for v in values]
    else:
        values = parse_int_list(args.values or "8,16,32,64,128,256,512", "--values")
        check(all(v >= 2 for v in values), f"batch sizes must be >= 2 for per-batch adaptation (got {values})")
        rho = check_rho(args.rho)
        settings = [(rho, v) for v in values]
    out = check_output_path(args.out)
    models = [model_from_args(args, spec) for spec in args.model]
    ds, indices, data = data_from_args(args)
    for m in models:
        validate_shape(m, ds)
        check_model(m.model)
    bar = progress_bar(len(models) * (len(settings) + 1) * args.runs * data["n"], f"sweep {args.over}")
    results = []
    t0 = time.time()
    for m in models:
        net = prepare(m.model)
        base = evaluate_cell(net, ds, sigma=sigma, rho=None, batch_size=max(args.batch_size, 2), runs=args.runs,
                             seed=args.seed, indices=indices, progress=bar)
        cells = [evaluate_cell(net, ds, sigma=sigma, rho=r, batch_size=b, runs=args.runs, seed=args.seed,
                               indices=indices, progress=bar) for r, b in settings]
        results.append({"model": m.source, "no_adaptation": base.as_dict(),
                        "settings": [{"rho": r, "batch_size": b, **c.as_dict()} for (r, b), c in zip(settings, cells)]})
    bar.close()
    label = "rho" if args.over == "rho" else "batch"
    header = ["model", "-"] + [f"{label}={v:g}" for v in values]
    rows = [[m.card.get("name") or m.source, f"{100 * r['no_adaptation']['mean']:.1f} ± {100 * r['no_adaptation']['two_sd']:.2f}"]
            + [f"{100 * s['mean']:.1f} ± {100 * s['two_sd']:.2f}" for s in r["settings"]] for m, r in zip(models, results)]
    fixed = f"batch {args.batch_size}" if args.over == "rho" else f"rho={args.rho}"
    print(f"Top-1 accuracy (%) at sigma={sigma:g}, {fixed}, mean ± 2 sd over {args.runs} runs; '-' = no adaptation")
    table = format_table(header, rows)
    print(table)
    if out:
        write_json(out, {
            "experiment": f"sweep_{args.over}", "provenance": provenance(wall_s=round(time.time() - t0, 2)),
            "models": [model_desc(m) for m in models], "data": data,
            "params": {"over": args.over, "values": values, "sigma": sigma, "batch_size": args.batch_size,
                       "rho": args.rho, "runs": args.runs, "seed": args.seed},
            "results": results, "table": table,
        })
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- adapt (deployment)
def cmd_adapt(args) -> int:
    from bnadapt.adapt import adapt_then_freeze, check_model, check_rho, to_plain
    from bnadapt.models import save_checkpoint
    from bnadapt.noise import batch_slices, check_sigma, run_generator
    from bnadapt.results import atomic_write_bytes, provenance

    rho = check_rho(args.rho)
    sigma = check_sigma(args.sigma)
    check(args.batch_size >= 2, f"--batch-size must be >= 2 to estimate statistics (got {args.batch_size})")
    out = check_output_path(args.out)
    check(out is not None and out.suffix in (".safetensors", ""), "--out must be a .safetensors path")
    ts = check_output_path(args.torchscript)
    loaded = model_from_args(args)
    check_model(loaded.model)
    check(not str(loaded.card.get("arch", "")).startswith(("torchscript",)),
          "cannot write an adapted checkpoint for a TorchScript model")
    ds, indices, data = data_from_args(args)
    validate_shape(loaded, ds)
    idx = np.arange(len(ds)) if indices is None else indices
    gen = run_generator(args.seed, 0)
    idx = idx[torch.randperm(len(idx), generator=gen).numpy()]

    def batches():
        for sl in batch_slices(len(idx), args.batch_size):
            x, _ = ds.get(idx[sl])
            yield x + sigma * torch.randn(x.shape, generator=gen) if sigma > 0 else x

    frozen = adapt_then_freeze(loaded.model, batches(), rho)
    plain = to_plain(frozen)
    card = dict(loaded.card)
    card.pop("weights_sha256", None)
    card.pop("weights_bytes", None)
    card["adaptation"] = {
        "method": "adaptive BN, adapt-then-freeze", "source_model": loaded.source, "source_sha256": loaded.sha256,
        "data": data, "sigma": sigma, "rho": rho, "interpolate": "std", "images": int(len(idx)),
        "batch_size": args.batch_size, "seed": args.seed, "provenance": provenance(),
    }
    card.pop("metrics", None)  # the source model's metrics do not describe the adapted one
    path = save_checkpoint(out, plain, card)
    print(f"wrote {path} and {path.with_suffix('.json')} (adapted on {len(idx)} images, sigma={sigma}, rho={rho})")
    if ts is not None:
        import io

        shape = tuple(ds.image_shape)
        traced = torch.jit.trace(plain.eval(), torch.rand(2, *shape), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        atomic_write_bytes(ts, buf.getvalue())
        print(f"wrote TorchScript {ts} (runs with plain torch.jit.load)")
    return 0


# ----------------------------------------------------------------------------- zoo
def cmd_zoo(args) -> int:
    from bnadapt.models import ZOO_DIR, zoo_names

    entries = []
    for name in zoo_names():
        path = ZOO_DIR / f"{name}.safetensors"
        card = json.loads(path.with_suffix(".json").read_text())
        entries.append({"name": name, "path": str(path), "bytes": path.stat().st_size,
                        "metrics": card.get("metrics", {}), "recipe": card.get("recipe", {}).get("name")})
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("the zoo is empty")
        return 0
    from bnadapt.noise import format_table

    keys = sorted({k for e in entries for k in e["metrics"]})
    rows = [[e["name"], str(e["recipe"]), f"{e['bytes'] / 1e6:.2f} MB"]
            + [f"{100 * e['metrics'][k]:.1f}" if k in e["metrics"] else "" for k in keys] for e in entries]
    print(format_table(["name", "recipe", "size"] + [f"{k} %" for k in keys], rows))
    print("use any of them as --model zoo:NAME")
    return 0


def register(sub) -> None:
    p = sub.add_parser("noise", help="accuracy under Gaussian noise with and without adaptive BN (Table 1)")
    add_model_args(p, multiple=True)
    add_data_args(p)
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS), help="noise levels in pixel units")
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum rho in [0, 1] (default 1)")
    p.add_argument("--batch-size", type=int, default=512, help="test batch size (default 512)")
    p.add_argument("--runs", type=int, default=5, help="repeated runs (reshuffle + resample noise; default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result file")
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("sweep", help="sweep rho (Table 4) or test batch size (Table 5) under Gaussian noise")
    p.add_argument("over", choices=["rho", "batch-size"], help="what to sweep")
    add_model_args(p, multiple=True)
    add_data_args(p)
    p.add_argument("--values", default=None, help="comma-separated values (default: the paper's grid)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.add_argument("--rho", type=float, default=1.0, help="rho when sweeping batch size (default 1)")
    p.add_argument("--batch-size", type=int, default=512, help="batch size when sweeping rho (default 512)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result file")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("adapt", help="adapt-then-freeze a model on data and write it as an ordinary checkpoint")
    add_model_args(p)
    add_data_args(p, default_n=None)
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise added to the adaptation images (default 0)")
    p.add_argument("--rho", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=512, help="adaptation batch size (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors; card written beside it)")
    p.add_argument("--torchscript", default=None, help="also write a TorchScript file here")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("zoo", help="list the shipped models and their metrics")
    p.add_argument("--json", action="store_true", help="print a JSON list (name, path, bytes, metrics)")
    p.set_defaults(func=cmd_zoo)
