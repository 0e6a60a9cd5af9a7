"""The on-disk cache of a generated corrupted set, in the CIFAR-10-C layout, with a manifest.

Layout of a cache folder (readable as ``cifar10-c:DIR`` by :mod:`bnadapt.data.corrupted`)::

    DIR/manifest.json             what was asked for (identity) and what is finished (checksums)
    DIR/labels.npy                the N labels tiled 5 times (5N,), as CIFAR-10-C's labels.npy
    DIR/<corruption>.npy          uint8 (5N, H, W) for gray, (5N, H, W, 3) for RGB; severity-major:
                                  rows [(s-1)N, sN) are severity s, in the source's index order
    DIR/.parts/<c>.s<k>.npy       one finished (corruption, severity) of an unfinished corruption

Every file is written to a temporary name and renamed, so a file that exists is complete. A
corruption file appears only once its five parts are done (then the parts go); an interrupted run
leaves parts behind and the next run with the same request completes them. The manifest's
``identity`` (library and version or torch engine, parameter table, seed, source data with its
content hash, image shape, protocol) must equal the request's, else a one-line error.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from bnadapt.errors import BnadaptError, check
from bnadapt.results import atomic_write_bytes, file_sha256, jsonable, utc_now, write_json

FORMAT = "bnadapt-corrupted/1"
MANIFEST = "manifest.json"
PARTS = ".parts"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder`` (None when there is none); a foreign or damaged file is an error."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BnadaptError(f"{p} is not a readable manifest ({type(e).__name__}); remove the folder and generate "
                           "again") from None
    check(isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("identity"), dict),
          f"{p} is not a bnadapt corrupted-set manifest (format {FORMAT}); choose another --out folder")
    m.setdefault("corruptions", {})
    return m


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest["updated_utc"] = utc_now()
    write_json(Path(folder) / MANIFEST, manifest)


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: cache has {json.dumps(a)[:80]}, request has {json.dumps(b)[:80]}"


def check_identity(folder: Path, manifest: dict, identity: dict) -> None:
    """One-line error unless the cache in ``folder`` was made for the same request."""
    want = jsonable(identity)
    if manifest["identity"] != want:
        raise BnadaptError(f"cache {folder} was made for another request ({_first_difference(manifest['identity'], want)}); "
                           "use the same options, or another --out folder")


def new_manifest(identity: dict) -> dict:
    return {"format": FORMAT, "identity": jsonable(identity), "created_utc": utc_now(), "complete": False,
            "requested": [], "labels": None, "corruptions": {}}


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy atomically; returns the file's SHA-256."""
    import hashlib

    data = npy_bytes(arr)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def part_path(folder: Path, corruption: str, severity: int) -> Path:
    return Path(folder) / PARTS / f"{corruption}.s{severity}.npy"


def save_part(folder: Path, corruption: str, severity: int, arr: np.ndarray) -> None:
    """Write one finished (corruption, severity) atomically (the unit an interrupted run keeps)."""
    save_npy(part_path(folder, corruption, severity), arr)


def load_part(folder: Path, corruption: str, severity: int, shape: tuple) -> np.ndarray | None:
    """A finished part of the expected shape and dtype, else None (a wrong one is removed)."""
    p = part_path(folder, corruption, severity)
    if not p.is_file():
        return None
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        arr = None
    if arr is None or arr.dtype != np.uint8 or tuple(arr.shape) != tuple(shape):
        p.unlink(missing_ok=True)
        return None
    return arr


def assemble(folder: Path, corruption: str, parts: list[np.ndarray]) -> dict:
    """Write ``<corruption>.npy`` (severities 1..5 stacked, severity-major) and remove its parts;
    returns the manifest entry (file, shape, sha256)."""
    arr = np.concatenate(parts, axis=0)
    sha = save_npy(Path(folder) / f"{corruption}.npy", arr)
    for s in range(1, len(parts) + 1):
        part_path(folder, corruption, s).unlink(missing_ok=True)
    return {"file": f"{corruption}.npy", "shape": list(arr.shape), "dtype": "uint8", "sha256": sha}


def finished(folder: Path, manifest: dict, corruption: str) -> bool:
    """Whether ``corruption`` is finished: in the manifest, and its file present with that size."""
    entry = manifest["corruptions"].get(corruption)
    if not entry:
        return False
    return _size_ok(Path(folder) / entry["file"], entry)


def _size_ok(p: Path, entry: dict) -> bool:
    """The file exists and holds at least the payload's bytes (the checksum is verified when read)."""
    return p.is_file() and p.stat().st_size >= int(np.prod(entry["shape"]))


def remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary files an interrupted write left behind (``.<name>.*.tmp``)."""
    for d in (Path(folder), Path(folder) / PARTS):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def verify_file(path: Path, sha256: str) -> None:
    """One-line error unless ``path`` has the checksum the manifest recorded."""
    check(file_sha256(path) == sha256, f"{path} does not match the checksum in its manifest (damaged or edited); "
                                       "delete it and run `bnadapt corruptions generate` again to rebuild it")


def clean_parts_dir(folder: Path) -> None:
    d = Path(folder) / PARTS
    if d.is_dir() and not any(d.iterdir()):
        os.rmdir(d)
