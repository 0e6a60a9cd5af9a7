"""The one result format, atomic writes, hashes and output-path checks.

Every experiment (noise, sweeps, certification summaries, predict, attacks, corruptions, streams,
gradients) writes one JSON file of this shape::

    {"format": "bnadapt-result/1",
     "experiment": "noise_table",
     "inputs": {"models": [{"spec", "name", "sha256", "tensors_sha256", "arch"}],
                "data": {"spec", "name", "split", "size", "n", "per_class", "subset_seed",
                         "indices_sha256", "content_sha256", ...},
                "params": {...}, "seed": 0, "device": "cpu", "precision": "fp32"},
     "inputs_sha256": "<sha256 of the canonical JSON of inputs>",
     "versions": {"python", "torch", "numpy", "scipy", "bnadapt", ...},
     "run": {"created_utc", "wall_s", "threads", "argv", ...},
     "results": {... numbers, lists and dicts; never a formatted table ...}}

``inputs_sha256`` identifies what was asked for (``reproduce`` skips a stage whose file has the same
hash); ``run`` says how and when it ran and is not hashed. Files are written to a temporary name in the
same folder and renamed, so a result file that exists is complete; they get the permissions of the
process umask. :func:`read_result` refuses files of another format with a one-line error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bnadapt.errors import BnadaptError, check, write_error

FORMAT = "bnadapt-result/1"


# ----------------------------------------------------------------------------------------- hashes
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state: dict) -> str:
    """SHA-256 of a state dict's content (keys sorted; name, dtype, shape and bytes of every tensor).

    Equal weights give equal hashes whatever the file format or its metadata order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys (the form that is hashed)."""
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def inputs_sha256(inputs: dict) -> str:
    """The hash of an experiment's inputs (what ``reproduce`` compares to skip finished stages)."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays, tuples and paths turned into JSON types; NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return jsonable(float(obj))
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    Parent folders are created. The file gets mode ``0666 & ~umask`` like any ``open()``-created file.
    A failure of the file system (read-only, full, not allowed) is a one-line :class:`BnadaptError`
    naming the path and the cause; the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------- provenance
def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape results."""
    import numpy
    import scipy
    import torch

    import bnadapt

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "bnadapt": bnadapt.__version__,
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_ARGV: list[str] | None = None


def set_argv(argv: list[str] | None) -> None:
    """Record the command line that results of this process come from (the CLI calls this)."""
    global _ARGV
    _ARGV = None if argv is None else [str(a) for a in argv]


def run_info(wall_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """The ``run`` block: when, how long, threads, command line (not part of the inputs hash)."""
    import torch

    info = {"created_utc": utc_now(), "wall_s": None if wall_s is None else round(float(wall_s), 3),
            "threads": torch.get_num_threads(), "argv": list(_ARGV if _ARGV is not None else sys.argv)}
    info.update(extra)
    return info


# ----------------------------------------------------------------------------------------- the format
def runs_cell(values: Iterable[float | None]) -> dict | None:
    """The one repeated-runs cell every table reports: ``{"mean", "two_sd", "se", "runs"}`` with the
    paper's ``±`` (two sample standard deviations, ddof=1; 0 for one run) and the standard error of the
    mean (sd / sqrt(runs)). None when a run's value is undefined (None); no runs: mean None."""
    vals = list(values)
    if any(v is None for v in vals):
        return None
    a = [float(v) for v in vals]
    sd = float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(np.mean(a)) if a else None, "two_sd": 2 * sd, "se": sd / math.sqrt(len(a)) if a else 0.0,
            "runs": a}


def make_inputs(*, models: list[dict] | None = None, data: dict | None = None, params: dict | None = None,
                seed: int | None = None, device: Any = "cpu", precision: str = "fp32", **more: Any) -> dict:
    """The ``inputs`` block of a result (everything that determines the numbers)."""
    inputs = {"models": models or [], "data": data, "params": params or {}, "seed": seed,
              "device": str(device), "precision": precision}
    inputs.update(more)
    return jsonable(inputs)


@dataclass
class Result:
    """An experiment's outcome in the one format: ``experiment``, ``inputs``, ``results`` (+ run info)."""

    experiment: str
    inputs: dict
    results: dict
    wall_s: float | None = None
    run: dict = field(default_factory=dict)

    @property
    def inputs_sha256(self) -> str:
        return inputs_sha256(self.inputs)

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "experiment": self.experiment,
            "inputs": jsonable(self.inputs),
            "inputs_sha256": self.inputs_sha256,
            "versions": library_versions(),
            "run": run_info(self.wall_s, **self.run),
            "results": jsonable(self.results),
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the result file atomically; returns its path."""
        write_json(path, self.as_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        run = dict(d.get("run") or {})
        wall = run.pop("wall_s", None)
        return cls(d["experiment"], d["inputs"], d["results"], wall, run)


def write_result(path: str | os.PathLike, experiment: str, inputs: dict, results: dict, *,
                 wall_s: float | None = None, run: dict | None = None) -> Path:
    """Write one result file (see the module docstring) atomically; returns its path."""
    return Result(experiment, inputs, results, wall_s, dict(run or {})).write(path)


def read_result(path: str | os.PathLike, experiment: str | Iterable[str] | None = None) -> dict:
    """A result file as a dict; ``experiment`` (a name or several) checks what it holds.

    An unreadable file, a file of another format (e.g. written by bnadapt 0.1 or another tool), or
    one holding another experiment is a one-line :class:`BnadaptError`."""
    p = Path(path)
    check(p.is_file(), f"result file {p} not found; run the experiment that writes it, or fix the path")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BnadaptError(f"{p} is not a readable JSON result file ({type(e).__name__}); rerun the experiment") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else None
        raise BnadaptError(f"{p} is not a bnadapt result file of format {FORMAT} (found {found!r}); "
                           "rerun the experiment with this version of bnadapt")
    for key in ("experiment", "inputs", "results"):
        check(key in d, f"{p} lacks its {key!r} entry; the file is damaged, rerun the experiment")
    if experiment is not None:
        names = [experiment] if isinstance(experiment, str) else list(experiment)
        check(d["experiment"] in names, f"{p} holds a {d['experiment']!r} result, not {' or '.join(map(repr, names))}; "
                                        "pass the file that experiment wrote")
    return d


# ----------------------------------------------------------------------------------------- output paths
def check_output(path: str | os.PathLike | None, what: str = "--out", *, suffixes: Iterable[str] | None = None,
                 exists_ok: bool = True) -> Path | None:
    """Validate an output path before any work: not a folder, the right suffix, and writable (its
    folder, or the nearest existing ancestor when folders will be created, must be a folder that takes
    a probe write: a read-only file system, a full disk or a folder that refuses files is a one-line
    error naming the cause). Returns the path (``None`` passes through). Leaves nothing behind."""
    if path is None:
        return None
    p = Path(path).expanduser()
    check(str(path).strip() != "", f"{what} is empty; give a file path")
    check(not p.is_dir(), f"{what} {p} is a folder; give a file path")
    if suffixes is not None:
        sfx = tuple(suffixes)
        check(p.name.endswith(sfx), f"{what} {p} must end in {' or '.join(sfx)}")
    check(exists_ok or not p.exists(), f"{what} {p} already exists; choose another path or remove it")
    if p.exists():
        check(os.access(p, os.W_OK), f"{what} {p} is not writable; check its permissions or choose another path")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    check(anc.is_dir(), f"{what} {p}: {anc} is not a folder; choose another path")
    probe_write(anc, p, what)
    return p


def probe_write(folder: Path, path: Path, what: str = "--out") -> None:
    """Write and remove a small temporary file in ``folder`` (where ``path`` will go), so a read-only
    file system, a full disk or a folder that refuses new files is a one-line error before any work."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bnadapt-probe.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e, what) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Refuse two outputs that resolve to the same file (e.g. a summary that would overwrite its rows)."""
    seen: dict[str, str] = {}
    for what, p in paths.items():
        if p is None:
            continue
        key = str(Path(os.path.abspath(p)))
        check(key not in seen, f"{what} and {seen.get(key)} would both write {p}; give them different paths")
        seen[key] = what


def locate(folder: Path, file: str) -> Path:
    """Where a file that a result in ``folder`` records as ``file`` (a reproduce manifest's stage files)
    is now. Files are recorded as the run named them: absolute, or relative to the run's working
    directory (``--out results`` gives ``results/noise/table1.json``). A relative or vanished one is
    looked up inside ``folder`` (its path below the run's ``--out``), then relative to the working
    directory, so the report finds the stages from any working directory and after the folder was
    moved. Returns the first candidate when none exists."""
    p = Path(file)
    if p.is_absolute() and p.exists():
        return p
    parts = p.parts
    cands = [folder / Path(*parts[i:]) for i in range(len(parts))] + [p]
    return next((c for c in cands if c.exists()), cands[0])
