"""Checkpoints and model loading.

Our format is a pair of files with one stem: ``NAME.safetensors`` (weights) and ``NAME.json`` (the
model card: ``arch``, ``arch_args``, ``input_shape``, ``normalization``, ``class_names``, and when
known ``recipe``, ``metrics``, ``adaptation``, ``weights_sha256``). Nothing is ever unpickled: weights
come from safetensors or ``torch.load(weights_only=True)``.

Model specs accepted by :func:`load_model`:

- ``zoo:NAME``: a model shipped in ``bnadapt/zoo/``;
- ``path/NAME.safetensors`` (card beside it) or ``path/NAME.json``;
- ``path.pt`` / ``path.pth`` state dict (:mod:`bnadapt.models.formats`): a plain state dict, one nested
  under ``model`` / ``state_dict`` (Rice et al.'s files), or a MadryLab ``robustness`` checkpoint (its
  attacker's copy dropped, its normalizer moved into the model's :class:`~bnadapt.models.arch.Normalize`).
  The architecture comes from the keys where they decide it (torchvision ResNets, Rice et al.'s
  PreActResNets, RobustBench WideResNets), else from ``arch=``;
- a TorchScript archive (``.ts``/``.pt``/``.pth`` made by ``torch.jit.save``);
- ``package.module:factory``: a Python callable returning an ``nn.Module``.

``normalize=`` (``imagenet``, ``cifar10``, ``none``, ``M1,M2,M3/S1,S2,S3``) sets the input normalization of
a checkpoint trained with it outside the model; the card's ``normalization`` records what was used and
where it came from, and :meth:`LoadedModel.describe` (hence every inputs hash) includes it.
"""

from __future__ import annotations

import importlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnadapt.errors import BnadaptError, check
from bnadapt.models.arch import ARCHITECTURES, DEFAULT_NORMALIZATION, input_shape_for
from bnadapt.models.formats import (check_normalize, detect_arch, float32_values, per_channel, read_torch_file,
                                    unwrap)
from bnadapt.results import atomic_write_bytes, file_sha256, tensors_sha256, write_json

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


@dataclass
class LoadedModel:
    """A model in eval mode plus what is known about it (``card``) and where it came from."""

    model: nn.Module
    card: dict[str, Any]
    source: str
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tensors_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.tensors_sha256 is None:
            self.tensors_sha256 = tensors_sha256(self.model.state_dict())

    @property
    def name(self) -> str:
        """The card's name, else the file stem (or the factory spec)."""
        if self.card.get("name"):
            return str(self.card["name"])
        p = Path(self.source)
        return p.stem if p.suffix else self.source

    @property
    def is_torchscript(self) -> bool:
        return isinstance(self.model, torch.jit.ScriptModule)

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """(C, H, W) the model expects; ``None`` entries are free (e.g. any spatial size)."""
        s = self.card.get("input_shape")
        return tuple(s) if s else None

    def describe(self) -> dict[str, Any]:
        """The model's entry in result files: spec, name, file hash, tensor hash, architecture, and the
        input normalization (mean, std) where the loader chose it (state dicts, ``normalize=``): its
        buffers are not in the tensor hash. Where it came from is in the card, not in the hash."""
        recipe = self.card.get("recipe") or {}
        d = {"spec": self.source, "name": self.name, "sha256": self.sha256, "tensors_sha256": self.tensors_sha256,
             "arch": self.card.get("arch"), "arch_args": self.card.get("arch_args") or None,
             "recipe": recipe.get("name"), "threat_model": recipe.get("threat_model"), "eps": recipe.get("eps"),
             "sigma": recipe.get("sigma"), "adapted_from": (self.card.get("adaptation") or {}).get("source_name")}
        norm = self.card.get("normalization") or {}
        if norm.get("source"):  # cards written before (the zoo's) keep their inputs hashes
            d["normalization"] = {"mean": norm.get("mean"), "std": norm.get("std")}
        return d

    @property
    def num_classes(self) -> int | None:
        names = self.card.get("class_names")
        if names:
            return len(names)
        return self.card.get("arch_args", {}).get("num_classes")


def build_model(arch: str, arch_args: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a named architecture with its arguments (``python:module:factory`` calls the factory)."""
    if arch.startswith("python:"):
        return _from_factory(arch[len("python:"):])
    check(arch in ARCHITECTURES,
          f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[arch](**(arch_args or {}))
    except TypeError as e:
        raise BnadaptError(f"bad arguments for architecture {arch!r}: {e}") from None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s state dict as safetensors and ``card`` as JSON beside it (both atomically).

    ``path`` may end in ``.safetensors`` or be a stem. The card gains ``weights_sha256``; it is
    written last, so a card that exists always describes complete weights. Returns the weights path.
    """
    from safetensors.torch import save

    check("arch" in card, "model card needs an 'arch' entry")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors orders a multi-key metadata map arbitrarily, which made
    # identical weights hash differently.
    data = save(state, metadata={"format": "pt"})
    atomic_write_bytes(path, data)
    card = dict(card)
    card["weights_sha256"] = file_sha256(path)
    card["tensors_sha256"] = tensors_sha256(state)
    card["weights_bytes"] = path.stat().st_size
    write_json(path.with_suffix(".json"), card)
    return path


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise BnadaptError(f"model card {path} not found; a .safetensors checkpoint needs its .json card beside it "
                           "(or pass --arch)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BnadaptError(f"model card {path} is not valid JSON ({e}); restore it from the checkpoint's source") from None
    check(isinstance(card, dict) and "arch" in card, f"model card {path} has no 'arch' entry")
    return card


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BnadaptError(f"cannot read weights {path}: {str(e).splitlines()[0]}; the file is corrupt or not safetensors") from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly; a mismatch is a one-line error listing a few offending keys."""
    state = _strip_prefixes(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise BnadaptError(
            f"weights in {source} do not fit the architecture: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; check --arch and its arguments")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    check(not bad, f"weights in {source} have wrong shapes for {bad[:3]}; check --arch and its arguments")
    model.load_state_dict(state, strict=True)
    return model


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def zoo_names() -> list[str]:
    """Names of the shipped zoo models."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.safetensors"))


def _normalization(arch: str, arch_args: dict[str, Any] | None, *, requested: dict | None,
                   from_file: dict | None, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture arguments with the input normalization to build, and the card's ``normalization``.

    Order: ``normalize=`` (which must agree with a normalizer stored in the file), else the file's
    normalizer, else ``mean``/``std`` in the architecture arguments, else the architecture's default
    (written into the arguments too, so a saved or adapted copy rebuilds it)."""
    args = dict(arch_args or {})
    in_args = "mean" in args or "std" in args
    shape = input_shape_for(arch, args)
    channels = shape[0] if shape else None

    def same(a: dict, b: dict) -> bool:
        ma, sa = per_channel(a["mean"], a["std"], channels)
        mb, sb = per_channel(b["mean"], b["std"], channels)
        return len(ma) == len(mb) and all(abs(x - y) <= 1e-6 for x, y in zip(ma + sa, mb + sb))

    if requested is not None:
        check(not in_args, "the normalization is given twice (--normalize and mean/std in --arch-args); give it once")
        if from_file is not None:
            check(same(requested, from_file),
                  f"{source} stores its normalizer (mean {from_file['mean']}, std {from_file['std']}) but --normalize "
                  f"{requested['spec']} says otherwise; drop --normalize")
        chosen, origin = requested, f"--normalize {requested['spec']}"
    elif from_file is not None:
        if in_args:
            check(same({"mean": args.get("mean", [0.0]), "std": args.get("std", [1.0])}, from_file),
                  f"{source} stores its normalizer (mean {from_file['mean']}, std {from_file['std']}) but --arch-args "
                  "gives another mean/std; drop them from --arch-args")
        chosen, origin = from_file, "checkpoint (robustness normalizer)"
    elif in_args:
        chosen, origin = {"mean": args.get("mean", [0.0]), "std": args.get("std", [1.0])}, "--arch-args"
    else:
        mean, std, what = DEFAULT_NORMALIZATION.get(arch, (None, None, None))
        if mean is None:
            return args, {}
        chosen, origin = {"mean": list(mean), "std": list(std)}, f"default of {arch}: {what}"
    mean, std = per_channel(chosen["mean"], chosen["std"], channels)
    check(channels is None or len(mean) == channels,
          f"the normalization has {len(mean)} values per statistic but {arch} takes {channels}-channel images; "
          f"give {channels} means and {channels} standard deviations (or one of each)")
    args["mean"], args["std"] = mean, std  # the card rebuilds it; equal normalizations hash equal
    return args, {"mean": mean, "std": std, "source": origin, "inside_model": True, "pixels": "[0, 1]"}


def _no_normalize(norm: dict | None, what: str) -> None:
    check(norm is None, f"--normalize sets the input normalization of bnadapt's architectures, but {what}; "
                        "build the normalization into the model instead")


def load_model(spec: str, *, arch: str | None = None, arch_args: dict[str, Any] | None = None,
               normalize: Any = None) -> LoadedModel:
    """Load a model from any accepted spec (see module docstring); returned in eval mode on CPU.

    ``normalize`` (``"imagenet"``, ``"cifar10"``, ``"none"``, ``"M1,M2,M3/S1,S2,S3"`` or a ``(mean, std)``
    pair) sets the input normalization of a checkpoint trained with it outside the model."""
    check(bool(spec), "no model given; pass a model spec such as zoo:adv-l2-1.5")
    norm = check_normalize(normalize, "normalize")
    if spec.startswith("zoo:"):
        name = spec[4:]
        path = ZOO_DIR / f"{name}.safetensors"
        check(path.exists(), f"no zoo model {name!r}; available: {', '.join(zoo_names()) or 'none'} (see `bnadapt zoo`)")
        return load_model(str(path), normalize=norm)
    p = Path(spec)
    if p.suffix == ".json" and p.exists():
        p = p.with_suffix(".safetensors")
    if p.suffix == ".safetensors":
        check(p.exists(), f"model file {p} not found")
        state = _load_safetensors(p)
        if arch is not None:
            card = {"arch": arch, "arch_args": arch_args or {}, "input_shape": input_shape_for(arch, arch_args)}
        else:
            card = _read_card(p.with_suffix(".json"))
        if norm is not None:
            check(card["arch"] in ARCHITECTURES, f"{p} is a {card['arch']} model; --normalize applies to bnadapt's "
                                                 "architectures only")
            card = dict(card)
            given = dict(card.get("arch_args") or {})
            if arch is None:  # the card's own mean/std give way to the explicit --normalize
                given = {k: v for k, v in given.items() if k not in ("mean", "std")}
            card["arch_args"], card["normalization"] = _normalization(
                card["arch"], given, requested=norm, from_file=None, source=str(p))
        model = build_model(card["arch"], card.get("arch_args"))
        load_state_into(model, state, str(p))
        sha = file_sha256(p)
        if card.get("weights_sha256") and card["weights_sha256"] != sha:
            raise BnadaptError(f"weights {p} do not match the hash in its card; the file changed or is corrupt")
        return LoadedModel(model.eval(), card, str(p), sha)
    if p.exists():
        check(p.is_file(), f"model path {p} is a folder; give a checkpoint file")
        sha = file_sha256(p)
        if _is_torchscript(p):
            _no_normalize(norm, f"{p} is TorchScript")
            try:
                model = torch.jit.load(str(p), map_location="cpu")
            except Exception as e:  # noqa: BLE001 - any TorchScript failure is a bad file
                raise BnadaptError(f"cannot load TorchScript {p}: {str(e).splitlines()[0]}") from None
            card = {"arch": "torchscript", "arch_args": {}}
            return LoadedModel(model.eval(), card, str(p), sha)
        state, info = unwrap(read_torch_file(p), str(p))
        return _from_state_dict(state, info, p, sha, arch=arch, arch_args=arch_args, norm=norm)
    if ":" in spec and not spec.startswith(("/", ".")):
        _no_normalize(norm, f"{spec} is a model factory")
        model = _from_factory(spec)
        card = {"arch": f"python:{spec}", "arch_args": {}}
        return LoadedModel(model.eval(), card, spec, None)
    raise BnadaptError(f"model {spec!r} not found; give zoo:NAME, a .safetensors/.pt/.pth/TorchScript file, or module:factory")


def _from_state_dict(state: dict[str, torch.Tensor], info: dict[str, Any], p: Path, sha: str, *, arch: str | None,
                     arch_args: dict[str, Any] | None, norm: dict | None) -> LoadedModel:
    """A state dict (already unwrapped) into its architecture: ``arch`` or the one its keys name."""
    detected = None
    try:
        detected = detect_arch(_strip_prefixes(state), str(p))
    except BnadaptError:
        if arch is None:
            raise
    if arch is None:
        arch, args = detected[0], {**detected[1], **(arch_args or {})}
    elif detected is not None and detected[0] == arch:  # the weights' num_classes etc. unless given
        args = {**detected[1], **(arch_args or {})}
    else:
        args = dict(arch_args or {})
    if arch.startswith("python:"):
        _no_normalize(norm, f"--arch {arch} is a model factory")
        model = build_model(arch, args)
        card: dict[str, Any] = {"arch": arch, "arch_args": args, "input_shape": None}
    else:
        args, normalization = _normalization(arch, args, requested=norm, from_file=info.get("normalization"),
                                             source=str(p))
        model = build_model(arch, args)
        card = {"arch": arch, "arch_args": args, "input_shape": input_shape_for(arch, args)}
        if normalization:
            card["normalization"] = normalization
    load_state_into(model, state, str(p))
    extra = {"format": info, "arch_detected": detected is not None and detected[0] == arch}
    return LoadedModel(model.eval(), card, str(p), sha, extra=extra)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _from_factory(spec: str) -> nn.Module:
    """``module:attr`` -> the module's ``attr`` called (or taken, if it is already an ``nn.Module``).

    Any failure (missing module, syntax error, a factory that raises) is one line naming the spec and
    the exception; the original traceback stays attached (``--debug`` prints it)."""
    modname, _, attr = spec.partition(":")
    check(modname != "" and attr != "", f"bad model factory {spec!r}; write it as package.module:function")
    try:
        factory = getattr(importlib.import_module(modname), attr)
    except Exception as e:  # noqa: BLE001 - ImportError, SyntaxError, AttributeError, errors at import
        raise BnadaptError(f"cannot import model factory {spec!r} ({_one_line(e)}); check the module path and "
                           "function name (--debug shows the traceback)") from e
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as e:  # noqa: BLE001 - whatever the user's factory raises
        raise BnadaptError(f"model factory {spec!r} raised {_one_line(e)}; fix the factory (--debug shows the traceback)") from e
    check(isinstance(model, nn.Module), f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    return model


def check_input_shape(loaded: LoadedModel, shape: tuple[int, ...]) -> None:
    """Error when data of per-image ``shape`` cannot feed the model (as far as its card says; ``None``
    entries of the card's shape are free)."""
    want = loaded.input_shape
    if want:
        ok = len(want) == len(shape) and all(w is None or int(w) == int(s) for w, s in zip(want, shape))
        pretty = tuple("any" if w is None else w for w in want)
        check(ok, f"data images have shape {tuple(shape)} but model {loaded.name} expects {pretty}; "
                  "pick matching data or model")


def check_model_on_data(loaded: LoadedModel, shape: tuple[int, ...], num_classes: int, device=None) -> int:
    """Validate ``loaded`` against data of per-image ``shape`` and ``num_classes`` labels before any
    work: the card's shape, then one forward of two images (eval mode, no gradients, model unchanged).
    Returns the model's number of outputs. Any failure is a one-line error naming both shapes."""
    check_input_shape(loaded, shape)
    model = loaded.model
    dev = device if device is not None else next((t.device for t in model.parameters()), torch.device("cpu"))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode():
            out = model(torch.full((2, *shape), 0.5, device=dev))
    except Exception as e:  # noqa: BLE001 - any failure of the user's model on this input
        raise BnadaptError(f"model {loaded.name} cannot take data images of shape {tuple(shape)} "
                           f"({_one_line(e)[:200]}); pick data that matches the model") from e
    finally:
        for m, t in flags:
            m.training = t
    check(isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 2,
          f"model {loaded.name} returned {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} "
          f"for 2 images of shape {tuple(shape)}; a classifier must return logits of shape (batch, classes)")
    outputs = int(out.shape[1])
    check(outputs >= num_classes,
          f"model {loaded.name} has {outputs} outputs but the data has {num_classes} classes; pick matching data or model")
    return outputs


FORMAT_NAMES = {"state_dict": "state dict", "robustness": "robustness library checkpoint (AttackerModel)"}


def summarize(loaded: LoadedModel) -> dict[str, Any]:
    """What was loaded, for ``bnadapt inspect``: the file's format (container, epoch, dropped keys), the
    architecture (and whether its keys named it), parameter and BN-layer counts, the normalization the
    model applies (read from its :class:`~bnadapt.models.arch.Normalize` layer) and where it came from,
    the input shape and the number of classes."""
    from bnadapt.models.arch import Normalize

    model, card = loaded.model, loaded.card
    info = dict(loaded.extra.get("format") or {})
    if loaded.is_torchscript:
        fmt = "TorchScript"
    elif str(card.get("arch", "")).startswith("python:") and "format" not in info:
        fmt = "Python model factory"
    elif loaded.source.endswith(".safetensors"):
        fmt = "bnadapt checkpoint (safetensors + card)"
    else:
        fmt = FORMAT_NAMES.get(info.get("format"), str(info.get("format")))

    def kind(m) -> str:
        return str(getattr(m, "original_name", type(m).__name__))

    mods = list(model.modules())
    bn = sum(1 for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm) or kind(m).startswith("BatchNorm"))
    norm_layer = next((m for m in mods if isinstance(m, Normalize) or kind(m) == "Normalize"), None)
    normalization = None
    if norm_layer is not None and hasattr(norm_layer, "mean") and hasattr(norm_layer, "std"):
        recorded = card.get("normalization") or {}
        normalization = {"mean": float32_values(norm_layer.mean), "std": float32_values(norm_layer.std),
                         "source": recorded.get("source") or ("model card" if recorded else "the model's Normalize layer")}
    linears = [m for m in mods if isinstance(m, nn.Linear) or kind(m) == "Linear"]
    weight = getattr(linears[-1], "weight", None) if linears else None
    classes = loaded.num_classes or (int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None)
    return {"spec": loaded.source, "name": loaded.name, "format": fmt, "container": info.get("container"),
            "epoch": info.get("epoch"), "dropped": info.get("dropped") or [],
            "arch": card.get("arch"), "arch_args": card.get("arch_args") or {},
            "arch_detected": bool(loaded.extra.get("arch_detected")),
            "parameters": int(sum(p.numel() for p in model.parameters())), "bn_layers": bn,
            "normalization": normalization, "input_shape": list(loaded.input_shape) if loaded.input_shape else None,
            "classes": classes, "sha256": loaded.sha256, "tensors_sha256": loaded.tensors_sha256}
