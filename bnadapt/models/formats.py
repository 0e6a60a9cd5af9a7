"""Checkpoints made by other code: reading them safely, unwrapping their containers, telling their
architecture from their keys, and the input normalization they were trained with.

- :func:`read_torch_file`: ``torch.load(weights_only=True)`` and nothing else, torch's warnings kept
  off stderr; a file it refuses is one line naming the pickled object and the safe way out.
- :func:`unwrap`: the state dict inside a file: nested ``model`` / ``state_dict`` / ``model_state_dict``
  entries, ``module.`` prefixes, and the MadryLab ``robustness`` library's ``AttackerModel`` (``model.*``
  kept, the attacker's second copy ``attacker.*`` dropped, ``normalizer.new_mean`` / ``new_std`` read as
  the model's normalization).
- :func:`detect_arch`: the architecture and its arguments from the keys and shapes, where they decide it.
- :func:`check_normalize`: the one validator of a normalization spec (``imagenet``, ``cifar10``, ``none``
  or ``M1,M2,M3/S1,S2,S3``).
"""

from __future__ import annotations

import io
import math
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from bnadapt.errors import BnadaptError, check
from bnadapt.models.arch import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RICE_PREACT_RESNETS,
    TORCHVISION_RESNETS,
    WIDE_RESNETS,
)

NAMED_NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
NORMALIZE_FORMS = "imagenet, cifar10, none or MEAN/STD such as 0.5,0.5,0.5/0.25,0.25,0.25"


# ----------------------------------------------------------------------------------------- normalization
def check_normalize(value: Any, name: str = "normalize") -> dict[str, Any] | None:
    """A normalization spec as ``{"mean": [...], "std": [...], "spec": str}`` (``None`` stays ``None``).

    Accepts a name (``imagenet``, ``cifar10``: Rice et al.'s training-set statistics, ``none``), the text
    ``M1,M2,M3/S1,S2,S3`` (one value each also works: it applies to every channel), a ``(mean, std)``
    pair or a ``{"mean", "std"}`` dict. Errors name ``name`` (the CLI passes ``"--normalize"``)."""
    if value is None:
        return None
    if isinstance(value, dict) and "mean" in value and "std" in value:
        mean, std, spec = value["mean"], value["std"], value.get("spec")
    elif isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value[0], (int, float)):
        (mean, std), spec = value, None
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in NAMED_NORMALIZATIONS:
            mean, std = NAMED_NORMALIZATIONS[text]
            return {"mean": list(mean), "std": list(std), "spec": text}
        m_text, sep, s_text = text.partition("/")
        check(bool(sep) and "/" not in s_text, f"{name} must be {NORMALIZE_FORMS} (got {value!r})")
        try:
            mean = [float(t) for t in m_text.split(",")]
            std = [float(t) for t in s_text.split(",")]
        except ValueError:
            raise BnadaptError(f"{name} must be {NORMALIZE_FORMS} (got {value!r})") from None
        spec = text
    else:
        raise BnadaptError(f"{name} must be {NORMALIZE_FORMS} (got {value!r})")
    try:
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    except (TypeError, ValueError):
        raise BnadaptError(f"{name} must be {NORMALIZE_FORMS} (got {value!r})") from None
    check(len(mean) == len(std) and len(mean) > 0,
          f"{name} has {len(mean)} means but {len(std)} standard deviations; give one of each per channel")
    check(all(math.isfinite(m) for m in mean), f"{name} means must be finite numbers (got {mean})")
    check(all(math.isfinite(s) and s > 0 for s in std),
          f"{name} standard deviations must be positive numbers (got {std})")
    return {"mean": mean, "std": std,
            "spec": spec or f"{','.join(f'{m:g}' for m in mean)}/{','.join(f'{s:g}' for s in std)}"}


# ----------------------------------------------------------------------------------------- reading
RESAVE_HINT = ("where the file was made, re-save just the weights as a plain state dict "
               "(torch.save(ckpt['model'], 'weights.pt')) or as safetensors, and load that")


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, dicts, lists, numbers and strings
    only; no pickled code ever runs. Torch's warnings are kept off stderr. A file it refuses is one
    line naming what was refused (e.g. ``argparse.Namespace``) and the safe way out."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, KeyError ...
        msg = str(e)
        if "Weights only load failed" not in msg and "WeightsUnpickler" not in msg:
            first = next((line.strip() for line in msg.splitlines() if line.strip()), type(e).__name__)
            raise BnadaptError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {first[:160]}); "
                               "the file is corrupt or not a .pt/.pth checkpoint") from None
        what = _refused_object(msg, path)
        if what is None:
            raise BnadaptError(f"cannot read {path} as a torch checkpoint (it is not a pickle torch can read); "
                               "the file is corrupt or not a .pt/.pth checkpoint") from None
        raise BnadaptError(f"cannot load {path}: {what}, and bnadapt loads weights only "
                           f"(a pickled object could run code); {RESAVE_HINT}") from None


def _refused_object(msg: str, path: Path) -> str | None:
    """What ``weights_only`` refused, as a clause: the global torch names, else the non-allowed globals
    found by reading (never running) the pickle's opcodes; ``None`` when the file is no pickle at all."""
    m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", msg) or re.search(r"Unsupported global: ([\w.]+)", msg)
    if m:
        return f"it pickles {m.group(1)}"
    names, parsed = _pickled_globals(path)
    if not parsed:
        return None
    if names:
        return "it pickles " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    m = re.search(r"Unsupported operand (\d+)", msg)
    if m:
        return f"its pickle uses an instruction (opcode {m.group(1)}) that a safe load does not read"
    return "it pickles Python objects other than tensors"


def _pickled_globals(path: Path) -> tuple[list[str], bool]:
    """Names of the globals (classes, functions) a pickle refers to that torch's weights-only loader does
    not allow, read with :mod:`pickletools` (parsing only: nothing is imported or called), and whether
    at least one whole pickle was read."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private API; without it, list every global but torch's
        allowed = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(pkl) if pkl else b""
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return [], False
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    parsed = False
    try:  # legacy (non-zip) files are several pickles in a row (magic number, version, info, data)
        for _ in range(8):
            if stream.tell() >= len(data):
                break
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "SHORT_BINSTRING", "BINSTRING"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
            parsed = True
    except Exception:  # noqa: BLE001 - raw tensor bytes after the pickles, or a truncated file
        pass
    out = []
    for name in found:
        if name not in allowed and not name.startswith("torch.") and name not in out:
            out.append(name)
    return out, parsed


# ----------------------------------------------------------------------------------------- containers
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")


def unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict inside a loaded file and what was learned on the way (``info``): ``format``
    (``state_dict`` or ``robustness``), ``container`` (the nested key taken), ``epoch``, ``dropped``
    (key prefixes removed) and ``normalization`` (``{"mean", "std"}`` from a robustness normalizer)."""
    info: dict[str, Any] = {"format": "state_dict"}
    outer = obj
    for key in CONTAINER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            info["container"] = key if "container" not in info else f"{info['container']}.{key}"
            obj = obj[key]
    if isinstance(outer, dict) and isinstance(outer.get("epoch"), int) and not isinstance(outer.get("epoch"), bool):
        info["epoch"] = int(outer["epoch"])
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] if isinstance(obj, dict) else None
    check(isinstance(obj, dict) and not bad and len(obj) > 0,
          f"{source} does not hold a state dict of tensors"
          + (f" (entries {bad[:3]} are not tensors)" if bad else "")
          + "; save the model's state_dict() (or give a .safetensors checkpoint)")
    state = {str(k): v for k, v in obj.items()}
    while state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("model.") for k in state) and any(k.startswith(("attacker.", "normalizer.")) for k in state):
        info["format"] = "robustness"
        mean, std = state.get("normalizer.new_mean"), state.get("normalizer.new_std")
        if mean is not None and std is not None:
            info["normalization"] = {"mean": float32_values(mean), "std": float32_values(std)}
        info["dropped"] = sorted({k.split(".")[0] + ".*" for k in state if not k.startswith("model.")})
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state, info


def float32_values(t: torch.Tensor) -> list[float]:
    """A float32 tensor's values as the shortest decimals that give them back (0.485, not 0.48500001430511475)."""
    import numpy as np

    return [float(str(np.float32(v))) for v in t.detach().float().flatten().tolist()]


# ----------------------------------------------------------------------------------------- detection
def _blocks(keys: set[str], prefix: str) -> int:
    """How many blocks ``prefix.N.`` a state dict has."""
    idx = {k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}
    return len({i for i in idx if i.isdigit()})


def _name_for(table: dict[str, tuple], key: tuple) -> str | None:
    return next((n for n, v in table.items() if tuple(v) == key), None)


ALL_FAMILIES = ("torchvision ResNets (resnet18 ... resnet152, wide_resnet50_2, wide_resnet101_2), "
                "Rice et al.'s PreActResNets (preact_resnet18 ...), RobustBench WideResNets (wrn_28_10, "
                "wrn_34_10, wrn_70_16, wide_resnet)")


def detect_arch(state: dict[str, torch.Tensor], source: str) -> tuple[str, dict[str, Any]]:
    """The architecture name and its arguments, told from the keys and shapes of ``state``.

    Raises a one-line error asking for ``--arch`` when the keys do not decide it (bnadapt's own
    ``preact_resnet``, whose stem stride is not in its weights) or match no known layout."""
    keys = set(state)
    args: dict[str, Any] = {}
    if {"conv1.weight", "block1.layer.0.conv1.weight", "bn1.weight", "fc.weight"} <= keys:
        n = _blocks(keys, "block1.layer.")
        depth, widen = 6 * n + 4, int(state["block1.layer.0.conv1.weight"].shape[0]) // 16
        name = _name_for(WIDE_RESNETS, (depth, widen))
        if name is None:
            name, args = "wide_resnet", {"depth": depth, "widen_factor": widen}
        if int(state["fc.weight"].shape[0]) != 10:
            args["num_classes"] = int(state["fc.weight"].shape[0])
        if any(k.startswith("sub_block1.") for k in keys):
            args["sub_block1"] = True
        if "fc.bias" not in keys:
            args["bias_last"] = False
        return name, args
    layers = tuple(_blocks(keys, f"layer{i}.") for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in keys
    block = "bottleneck" if bottleneck else "basic"
    if {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"} <= keys:
        width = int(state["layer1.0.conv1.weight"].shape[0]) if bottleneck else 64
        name = _name_for(TORCHVISION_RESNETS, (block, layers, width))
        check(name is not None,
              f"{source} has torchvision's ResNet layout but {block} blocks {list(layers)} (width {width}) match "
              f"none of {', '.join(TORCHVISION_RESNETS)}; name the architecture with --arch")
        if int(state["fc.weight"].shape[0]) != 1000:
            args["num_classes"] = int(state["fc.weight"].shape[0])
        if int(state["conv1.weight"].shape[1]) != 3:
            args["in_channels"] = int(state["conv1.weight"].shape[1])
        return name, args
    if {"conv1.weight", "layer1.0.bn1.weight", "bn.weight", "linear.weight"} <= keys:
        name = _name_for(RICE_PREACT_RESNETS, (block, layers))
        check(name is not None,
              f"{source} has Rice et al.'s PreActResNet layout but {block} blocks {list(layers)} match none of "
              f"{', '.join(RICE_PREACT_RESNETS)}; name the architecture with --arch")
        if int(state["linear.weight"].shape[0]) != 10:
            args["num_classes"] = int(state["linear.weight"].shape[0])
        return name, args
    if "conv1.weight" in keys and "layers.0.bn1.weight" in keys and "fc.weight" in keys:
        raise BnadaptError(f"{source} has bnadapt's preact_resnet layout, but its stem stride and input "
                           "normalization are not in the weights, so the architecture is ambiguous; pass "
                           "--arch preact_resnet with --arch-args (in_channels, num_classes, widths, depth, stem_stride)")
    if "layer1.0.shortcut.0.weight" in keys and "bn1.weight" in keys and "linear.weight" in keys:
        raise BnadaptError(f"{source} looks like a kuangliu-style CIFAR ResNet (the robustness library's "
                           f"cifar_models), which bnadapt does not build; known layouts: {ALL_FAMILIES}")
    sample = sorted(keys)[:3]
    raise BnadaptError(f"cannot tell the architecture of {source} from its keys ({', '.join(sample)} ...); "
                       f"name it with --arch (known layouts: {ALL_FAMILIES}; or preact_resnet)")


def per_channel(mean: Sequence[float], std: Sequence[float], channels: int | None) -> tuple[list, list]:
    """Single values spread over ``channels``; a per-channel list must have exactly that many."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if channels and len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return mean, std
