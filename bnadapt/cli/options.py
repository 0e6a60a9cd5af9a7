"""Options every command shares, spelled once: models, data, device/precision/threads, seed, output,
progress; and the helpers that turn them into library objects (validated before any work)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bnadapt.errors import BnadaptError, check

MODEL_HELP = ("zoo:NAME, a .safetensors checkpoint (card beside it), a .pt/.pth state dict (a robustness-library, "
              "torchvision, Rice et al. or RobustBench layout is recognised; others need --arch), "
              "a TorchScript file (evaluated and certified as a fixed model; adaptation needs the eager model), "
              "or package.module:factory")
DATA_HELP = ("fashion-mnist[:ROOT] (default), cifar10:DIR, folder:DIR (root/<class>/<image>), an .npz/.npy file, "
             "a folder holding one of these, or one corrupted set: cifar10-c:DIR:CORRUPTION:SEVERITY "
             "(our cache or CIFAR-10-C), imagenet-c:DIR:CORRUPTION:SEVERITY")


# ----------------------------------------------------------------------------------------- options
def add_model(p: argparse.ArgumentParser, *, multiple: bool = False, required: bool = True) -> None:
    if multiple:
        p.add_argument("--model", action="append", required=required, help=MODEL_HELP + " (repeatable)")
    else:
        p.add_argument("--model", required=required, help=MODEL_HELP)
    add_arch(p)


def add_arch(p: argparse.ArgumentParser) -> None:
    """--arch, --arch-args and --normalize: how to build a checkpoint's model (``add_model`` adds them)."""
    p.add_argument("--arch", default=None,
                   help="architecture of a .pt/.pth state dict when its keys do not name it (`bnadapt inspect` "
                        "shows what was detected): preact_resnet, resnet18..resnet152, wide_resnet50_2, "
                        "preact_resnet18, wrn_28_10, wrn_34_10, wrn_70_16, wide_resnet, ...")
    p.add_argument("--arch-args", default=None,
                   help='JSON object of architecture arguments, e.g. \'{"in_channels": 3, "num_classes": 10}\'')
    p.add_argument("--normalize", default=None, metavar="imagenet|cifar10|none|M1,M2,M3/S1,S2,S3",
                   help="input normalization the checkpoint was trained with outside the model (it becomes the "
                        "model's first layer; default: the file's normalizer, else the architecture's)")


def add_data(p: argparse.ArgumentParser, *, default_images: int | None = None, images_help: str | None = None) -> None:
    p.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="split of data that has one (fashion-mnist, cifar10); default test")
    p.add_argument("--images", type=int, default=default_images,
                   help=images_help or (f"use a deterministic subset of N images (default {default_images})"
                                        if default_images else "use a deterministic subset of N images (default: all)"))
    p.add_argument("--per-class", type=int, default=None, help="at most K images per class in the subset")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset choice (default 0)")
    p.add_argument("--npz-keys", default=None, metavar="IMAGES,LABELS",
                   help="array names in an .npz file (default: the first of x/images/data and y/labels/targets)")
    p.add_argument("--resize", default="auto", metavar="N|none|auto",
                   help="folder: shorter side resized to N (auto: 256 for images >= 224 px, else none)")
    p.add_argument("--crop", default="auto", metavar="N|none|auto",
                   help="folder: center crop N x N (auto: 224 for images >= 224 px, else none)")


def add_device(p: argparse.ArgumentParser, *, precision: bool = False, loading: bool = True) -> None:
    """--device, --threads (and --precision); with ``loading`` also --workers and --cache (how images are
    read: :mod:`bnadapt.data.pipeline`)."""
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    if loading:
        p.add_argument("--workers", type=int, default=None,
                       help="processes decoding image folders ahead of the model (default: one per core; 0: decode "
                            "in this process); results do not depend on it")
        p.add_argument("--cache", default=None, metavar="DIR",
                       help="folder of decoded caches: each image folder is decoded once into a uint8 file there "
                            "(keyed by its file listing and preprocessing) and read from it by every later pass and "
                            "run; results are the same with or without it")
    if precision:
        p.add_argument("--precision", default="fp32", choices=None, metavar="fp32|bf16|fp16",
                       help="inference precision (default fp32; fp16 needs CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per core; idle threads sleep, so a shared machine "
                        "does not collapse)")


def add_seed(p: argparse.ArgumentParser, help: str = "seed of every random draw (default 0)") -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: a bar on a terminal, a plain line every 10 s otherwise)")


# ----------------------------------------------------------------------------------------- parsing
def float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise BnadaptError(f"{what} must be comma-separated numbers (got {text!r})") from None
    check(len(vals) > 0, f"{what} is empty; give comma-separated numbers")
    return vals


def int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise BnadaptError(f"{what} must be comma-separated integers (got {text!r})") from None
    check(len(vals) > 0, f"{what} is empty; give comma-separated integers")
    return vals


def _size_option(text: str, what: str) -> int | None | str:
    t = str(text).strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    try:
        v = int(t)
    except ValueError:
        raise BnadaptError(f"{what} must be a positive integer, none or auto (got {text!r})") from None
    check(v >= 1, f"{what} must be >= 1 (got {v})")
    return v


# ----------------------------------------------------------------------------------------- objects
def arch_args(args) -> dict | None:
    if not getattr(args, "arch_args", None):
        return None
    try:
        a = json.loads(args.arch_args)
    except json.JSONDecodeError as e:
        raise BnadaptError(f"--arch-args is not valid JSON ({e.msg} at column {e.colno}); "
                           'write a JSON object such as \'{"num_classes": 10}\'') from None
    check(isinstance(a, dict), "--arch-args must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return a


def load_models(args, specs: list[str] | str | None = None) -> list:
    """``LoadedModel``s for ``--model`` (one or several)."""
    from bnadapt.models import load_model

    specs = specs if specs is not None else args.model
    specs = [specs] if isinstance(specs, str) else list(specs)
    norm = normalize(args)
    return [load_model(s, arch=getattr(args, "arch", None), arch_args=arch_args(args), normalize=norm) for s in specs]


def normalize(args) -> dict | None:
    """``--normalize`` validated (``None`` when not given)."""
    from bnadapt.models.formats import check_normalize

    return check_normalize(getattr(args, "normalize", None), "--normalize")


def selection(args, *, images: int | None | str = "args"):
    """The ``Selection`` named by the data options (``images`` overrides ``--images``)."""
    from bnadapt.data import select

    keys = None
    if getattr(args, "npz_keys", None):
        keys = tuple(k.strip() for k in args.npz_keys.split(","))
        check(len(keys) == 2 and all(keys), f"--npz-keys must be two names IMAGES,LABELS (got {args.npz_keys!r})")
    return select(args.data, args.split, images=args.images if images == "args" else images,
                  per_class=args.per_class, subset_seed=args.subset_seed, npz_keys=keys,
                  resize=_size_option(getattr(args, "resize", "auto"), "--resize"),
                  crop=_size_option(getattr(args, "crop", "auto"), "--crop"))


def device(args):
    """Resolve ``--device`` (and set ``--threads``), and print the line ``device: ...`` on stdout (the
    device, precision and thread count every result file also records)."""
    from bnadapt.runs import check_precision, resolve_device, set_threads

    threads = set_threads(getattr(args, "threads", None))
    if hasattr(args, "workers") and hasattr(args, "cache"):
        from bnadapt.data.pipeline import set_loading

        set_loading(workers=args.workers, cache=args.cache, names=("--workers", "--cache"))
    dev = resolve_device(getattr(args, "device", "auto"))
    extra = ""
    if hasattr(args, "precision"):
        extra = f", {check_precision(args.precision, dev, '--precision')}"
    if dev.type == "cuda":
        import torch

        extra += f", {torch.cuda.get_device_name(dev)}"
    say(f"device: {dev}{extra}, {threads} CPU thread{'s' if threads != 1 else ''}")
    return dev


def output(args, attr: str = "out", *, suffixes=None, what: str | None = None) -> Path | None:
    from bnadapt.results import check_output

    return check_output(getattr(args, attr, None), what or f"--{attr.replace('_', '-')}", suffixes=suffixes)


def say(*parts: Any) -> None:
    """Print a line to stdout (results and 'wrote ...' lines; progress goes to stderr)."""
    print(*parts, flush=True)
