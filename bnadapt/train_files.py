"""The files of a training run: the checkpoint path for ``--out``, the resume state beside it (written
atomically, read with ``weights_only=True``, refused when it belongs to another run), and the output
checks made before the first epoch (:func:`bnadapt.train.train`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from bnadapt.errors import BnadaptError, check

RESUME_FORMAT = "bnadapt-train-resume/1"


def weights_path(out: str | os.PathLike) -> Path:
    """The checkpoint file for ``--out``: ``PATH.safetensors`` (``.safetensors`` appended unless present;
    dots inside names such as ``gaussian-0.5`` are kept)."""
    p = Path(out)
    if p.suffix == ".safetensors":
        return p
    if p.suffix == ".json":
        return p.with_suffix(".safetensors")
    return p.with_name(p.name + ".safetensors")


def resume_path(out: str | os.PathLike) -> Path:
    """``PATH.resume.pt`` beside the checkpoint ``PATH.safetensors``."""
    w = weights_path(out)
    return w.with_name(w.name[: -len(".safetensors")] + ".resume.pt")


def save_resume(path: Path, state: dict[str, Any]) -> None:
    from bnadapt.results import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_resume(path: Path, cfg) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise BnadaptError(f"cannot read resume state {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           f"delete it to start over") from None
    check(isinstance(state, dict) and state.get("format") == RESUME_FORMAT,
          f"{path} is not a bnadapt training resume state; delete it to start over")
    want, have = cfg.identity(), state.get("identity", {})
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        k = diff[0]
        raise BnadaptError(
            f"resume state {path} is from a different run ({k}: {have.get(k)!r} in the file, {want.get(k)!r} now"
            f"{f'; {len(diff) - 1} more' if len(diff) > 1 else ''}); rerun with the same recipe, seed and "
            f"training options, or delete it to start over")
    return state


def check_outputs(out, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    from bnadapt.results import check_output

    wpath = weights_path(out)
    check(not Path(out).is_dir(), f"--out {out} is a folder; give a checkpoint path such as models/NAME.safetensors")
    check_output(wpath)
    check_output(wpath.with_suffix(".json"))
    check(overwrite or not (wpath.exists() and wpath.with_suffix(".json").exists()),
          f"{wpath} is a finished checkpoint; pass --overwrite to replace it, or choose another --out")
    rpath = resume_path(out)
    check(resume or not rpath.exists(),
          f"found resume state {rpath} from an earlier run; pass --resume to continue it or delete it to start over")
    return wpath, rpath
