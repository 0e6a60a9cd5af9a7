"""Decoded caches: an image folder decoded once into a raw uint8 file, reused by every later pass.

A cache lives in the folder given by ``--cache`` as two files named by its key, the SHA-256 of what
the pixels depend on: the folder's file listing (class/name, size and modification time of every
image), the preprocessing (resize, crop, interpolation, color), the image shape and this format's
version. ``<key>.npy`` holds the images as uint8 NCHW, a plain NumPy array file
(``numpy.load(path, mmap_mode="r")`` opens it); ``<key>.json`` says what it was made from. Guarantees:

- a cached image is bit for bit the image the folder decodes to, so results are the same with or
  without a cache (tested);
- the cache is written once, atomically (a temporary file renamed into place after it is complete):
  an interrupted build leaves no cache, and every later pass, run, sigma, model and stage of the same
  folder and preprocessing reads it; another preprocessing or a changed folder gets its own key;
- a cache whose description or size does not match its key (damaged, or made by something else) is
  refused with one line naming the file and the fix;
- building and reading hold a few batches in memory, never the whole set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bnadapt.errors import BnadaptError, write_error

FORMAT = "bnadapt-decoded/1"
CHUNK = 64


def cache_identity(ds) -> dict:
    """What the decoded pixels of folder dataset ``ds`` depend on."""
    h = hashlib.sha256()
    for p in ds.paths:
        st = p.stat()
        h.update(f"{p.parent.name}/{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"format": FORMAT, "root": str(ds.root), "images": len(ds.paths), "listing_sha256": h.hexdigest(),
            "preprocessing": ds.preprocessing, "image_shape": list(ds.image_shape)}


def cache_key(identity: dict) -> str:
    ident = {k: v for k, v in identity.items() if k != "root"}  # a moved folder with the same files reuses it
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class DecodedCache:
    """Read access to one complete cache: :meth:`read` returns uint8 NCHW rows by positional reads
    (``os.preadv`` into the batch's own buffer), so this process holds the batch and nothing more,
    whatever the set's size (a memory map would count every row it touched as resident)."""

    def __init__(self, path: Path, shape: tuple[int, ...], offset: int):
        self.path, self.shape, self.offset = path, shape, offset
        self.row = int(np.prod(shape[1:]))
        self._fd: int | None = None
        self._pid = -1

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked process opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, idx: np.ndarray) -> torch.Tensor:
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        fd, flat = self._file(), out.reshape(len(idx), -1)
        for k, i in enumerate(np.asarray(idx, dtype=np.int64)):
            if os.preadv(fd, [memoryview(flat[k])], self.offset + int(i) * self.row) != self.row:
                raise BnadaptError(f"decoded cache {self.path} is truncated; delete it (it is rebuilt on the next run)")
        return torch.from_numpy(out)

    def __getstate__(self):
        return {"path": self.path, "shape": self.shape, "offset": self.offset, "row": self.row, "_fd": None, "_pid": -1}


def _header_offset(path: Path) -> tuple[tuple[int, ...], int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or dtype != np.uint8:
            raise ValueError("not a C-ordered uint8 array")
        return tuple(shape), f.tell()


def open_cache(folder: Path, ds) -> DecodedCache | None:
    """The complete cache of ``ds`` in ``folder``, or ``None`` when there is none yet; a file that does not
    match its key is a one-line error."""
    ident = cache_identity(ds)
    key = cache_key(ident)
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if not data.exists():
        return None
    fix = f"delete {data} and {meta.name} (the cache is rebuilt on the next run) or choose another --cache"
    try:
        stored = json.loads(meta.read_text())
        shape, offset = _header_offset(data)
    except (OSError, ValueError) as e:
        raise BnadaptError(f"decoded cache {data} is unreadable or has no description ({type(e).__name__}); {fix}") from None
    want = {k: v for k, v in ident.items() if k != "root"}
    have = {k: stored.get(k) for k in want} if isinstance(stored, dict) else {}
    if have != want or shape != (len(ds), *ds.image_shape) \
            or data.stat().st_size != offset + int(np.prod(shape)):
        diff = [k for k in want if have.get(k) != want[k]] or ["size"]
        raise BnadaptError(f"decoded cache {data} does not match {ds.root} with this preprocessing "
                           f"({', '.join(diff)} differ); {fix}")
    return DecodedCache(data, shape, offset)


class _Decoding:
    """``ds`` read by decoding its files, whatever the cache setting (what a cache is built from)."""

    decodes = True

    def __init__(self, ds):
        self.ds = ds

    def get_raw(self, idx):
        return self.ds.decode(idx), self.ds.labels[torch.from_numpy(np.asarray(idx, dtype=np.int64))]


def build_cache(folder: Path, ds, *, quiet: bool = False) -> DecodedCache:
    """Decode every image of ``ds`` once (with the process's decoding workers) into ``folder`` and
    return the cache; written atomically. Another process building the same cache at the same time
    writes the same bytes; the last rename wins."""
    from bnadapt.data.pipeline import batches

    ident = cache_identity(ds)
    key = cache_key(ident)
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    shape = (len(ds), *ds.image_shape)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunks = [np.arange(a, min(a + CHUNK, len(ds))) for a in range(0, len(ds), CHUNK)]
            done = 0
            for x, _ in batches(_Decoding(ds), chunks):
                f.write(np.ascontiguousarray(x.numpy()).data)
                done += len(x)
                if not quiet and sys.stderr.isatty():
                    print(f"\rdecoding {ds.root} into {folder}: {done}/{len(ds)}", end="", file=sys.stderr, flush=True)
            f.flush()
            os.fsync(f.fileno())
        if not quiet:
            print(f"{'' if not sys.stderr.isatty() else chr(13)}decoded {len(ds)} images of {ds.root} into "
                  f"{data}", file=sys.stderr, flush=True)
        tmp_meta = Path(tmp + ".json")
        tmp_meta.write_text(json.dumps(ident, indent=1, sort_keys=True) + "\n")
        os.replace(tmp_meta, meta)
        os.replace(tmp, data)
        tmp = None
    except OSError as e:
        raise write_error(data, e, "--cache") from None
    finally:
        if tmp is not None:
            for p in (tmp, tmp + ".json"):
                if os.path.exists(p):
                    os.unlink(p)
    out = open_cache(folder, ds)
    assert out is not None
    return out
