"""Fashion-MNIST from its idx files (the Debian package ``dataset-fashion-mnist``).

Files are looked up in ``root`` (argument), else ``$BNADAPT_FASHION_MNIST``, else
``/usr/share/datasets/fashion-mnist``; each may be gzipped (``.gz``) or raw. Images stay uint8
NCHW (N, 1, 28, 28) in memory and become float32 in [0, 1] per batch.
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bnadapt.data.base import TensorImageDataset
from bnadapt.errors import BnadaptError, check

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "BNADAPT_FASHION_MNIST"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder to read: ``root`` if given, else ``$BNADAPT_FASHION_MNIST``, else the Debian path."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def _find(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``, whichever exists (gz first); a one-line error otherwise."""
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand.resolve()
    raise BnadaptError(
        f"Fashion-MNIST file not found: tried {root / stem}.gz and {root / stem}; install it with "
        f"`apt-get install -y dataset-fashion-mnist` or point root / ${ENV_VAR} at the folder holding it")


def read_idx(path: str | os.PathLike, magic: int, ndim: int) -> np.ndarray:
    """Parse an idx file (gzipped if its name ends in ``.gz``) into a read-only uint8 array.

    Guarantees: the magic number equals ``magic`` (0x0803 images, 0x0801 labels), the header has
    ``ndim`` big-endian uint32 dimensions, and the payload holds exactly their product in bytes;
    anything else raises :class:`BnadaptError` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        msg = str(e).replace("\n", " ")
        raise BnadaptError(f"{path}: cannot read/decompress ({msg}); re-download or reinstall the file") from None
    header = 4 + 4 * ndim
    check(len(raw) >= header, f"{path}: truncated idx header ({len(raw)} bytes); the file is corrupt, re-download it")
    head = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    check(int(head[0]) == magic,
          f"{path}: bad idx magic number 0x{int(head[0]):08x} (expected 0x{magic:08x}); not a {ndim}-D uint8 idx file")
    dims = tuple(int(d) for d in head[1:])
    expected = int(np.prod(dims, dtype=np.int64))
    check(len(raw) - header == expected,
          f"{path}: header says {dims} = {expected} bytes but the file holds {len(raw) - header}; "
          f"the file is truncated or corrupt, re-download it")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    arr.flags.writeable = False
    return arr


@lru_cache(maxsize=4)
def _load_pair(images_path: Path, labels_path: Path, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Validated (images N x 28 x 28, labels N) for two resolved paths; cached per process.

    ``stamp`` (mtime and size of both files) is part of the key so a rewritten file is re-read.
    """
    images = read_idx(images_path, IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, LABELS_MAGIC, 1)
    check(images.shape[1:] == (28, 28),
          f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28; not a Fashion-MNIST file")
    check(images.shape[0] == labels.shape[0],
          f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; "
          f"use matching files from the same split")
    if labels.size:
        check(int(labels.max()) <= 9,
              f"{labels_path}: label {int(labels.max())} out of range 0..9; the file is corrupt, re-download it")
    return images, labels


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> TensorImageDataset:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as a :class:`TensorImageDataset`.

    Guarantees: images uint8 (N, 1, 28, 28) in memory (a private copy, so mutating it never affects
    later loads), labels int64 in 0..9, the 10 standard class names, ``name`` "fashion-mnist/<split>".
    Decompressed files are cached per process, so repeated loads are cheap.
    """
    check(split in FILES, f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = fashion_mnist_root(root)
    ipath, lpath = (_find(folder, stem) for stem in FILES[split])
    stamp = tuple((s.st_mtime_ns, s.st_size) for s in (ipath.stat(), lpath.stat()))
    images, labels = _load_pair(ipath, lpath, stamp)
    ds = TensorImageDataset(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)),
                            class_names=CLASS_NAMES, name=f"fashion-mnist/{split}")
    ds.has_splits = True
    return ds


clear_cache = _load_pair.cache_clear
"""Forget the per-process cache of decompressed files (e.g. to time a fresh load)."""
