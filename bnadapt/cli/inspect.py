"""``bnadapt inspect MODEL``: what a checkpoint holds and how bnadapt reads it (format, architecture,
parameters, BN layers, normalization, input shape, classes), before running anything on it."""

from __future__ import annotations

import json

from bnadapt.cli import options as opt


def _lines(s: dict) -> list[tuple[str, str]]:
    fmt = s["format"]
    details = [f"container '{s['container']}'" if s["container"] else "",
               f"epoch {s['epoch']}" if s["epoch"] is not None else "",
               f"dropped {', '.join(s['dropped'])}" if s["dropped"] else ""]
    details = [d for d in details if d]
    if details:
        fmt += f" ({'; '.join(details)})"
    arch = str(s["arch"])
    if s["arch_args"]:
        shown = {k: v for k, v in s["arch_args"].items() if k not in ("mean", "std")}
        if shown:
            arch += " " + json.dumps(shown)
    if s["format"] not in ("TorchScript", "Python model factory") and not s["spec"].endswith(".safetensors"):
        arch += " (detected from the keys)" if s["arch_detected"] else " (from --arch)"
    norm = s["normalization"]
    if norm:
        norm_text = (f"mean {norm['mean']}, std {norm['std']} "
                     f"({norm['source']}; inside the model, pixels in [0, 1])")
    else:
        norm_text = "no Normalize layer found (the model takes whatever it was given)"
    shape = "unknown" if not s["input_shape"] else "x".join("any" if d is None else str(d) for d in s["input_shape"])
    return [("model", s["spec"]), ("format", fmt), ("architecture", arch), ("parameters", f"{s['parameters']:,}"),
            ("BN layers", str(s["bn_layers"])), ("normalization", norm_text), ("input shape", shape),
            ("classes", "unknown" if s["classes"] is None else str(s["classes"])),
            ("tensors sha256", str(s["tensors_sha256"]))]


def cmd_inspect(args) -> int:
    from bnadapt.models.checkpoint import summarize

    loaded, = opt.load_models(args, args.model)
    s = summarize(loaded)
    if args.json:
        opt.say(json.dumps(s, indent=2))
        return 0
    for key, value in _lines(s):
        opt.say(f"{key + ':':<16}{value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show how a checkpoint is read: format, architecture, normalization, classes")
    p.add_argument("model", metavar="MODEL", help=opt.MODEL_HELP)
    opt.add_arch(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)
