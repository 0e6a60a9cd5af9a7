"""CIFAR-10 from the official binary version (``cifar-10-batches-bin``).

Each record is 1 label byte followed by 3072 pixel bytes: the R, G and B planes of a 32x32 image,
row-major. Images stay uint8 NCHW (N, 3, 32, 32) in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bnadapt.data.base import TensorImageDataset
from bnadapt.errors import BnadaptError, check

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
RECORD = 1 + 3 * 32 * 32
FOLDER = "cifar-10-batches-bin"
_FIX = "download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there"


def cifar10_dir(root: str | os.PathLike) -> Path:
    """``root/cifar-10-batches-bin`` when that folder exists, else ``root`` itself."""
    root = Path(root).expanduser()
    return root / FOLDER if (root / FOLDER).is_dir() else root


def read_cifar_bin(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (images uint8 (N, 3, 32, 32), labels uint8 (N,)).

    Guarantees: the file is a non-empty multiple of 3073 bytes and every label is < 10; otherwise
    a :class:`BnadaptError` names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise BnadaptError(f"CIFAR-10 file not found: {path}; {_FIX}")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BnadaptError(f"{path}: cannot read ({e}); check permissions or re-download it") from None
    check(raw.size > 0 and raw.size % RECORD == 0,
          f"{path}: {raw.size} bytes is not a positive multiple of the {RECORD}-byte record; "
          f"the file is truncated or corrupt, re-download it")
    rec = raw.reshape(-1, RECORD)
    labels = rec[:, 0].copy()
    bad = np.flatnonzero(labels >= 10)
    if bad.size:
        raise BnadaptError(f"{path}: record {bad[0]} has label {labels[bad[0]]} (must be < 10); "
                           f"the file is corrupt or not CIFAR-10 (CIFAR-100?), re-download it")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def read_class_names(folder: Path) -> list[str]:
    """Names from ``batches.meta.txt`` (one per line, blanks ignored) if present, else the standard ones."""
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return list(CLASS_NAMES)
    names = [ln.strip() for ln in meta.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    check(len(names) == 10, f"{meta}: expected 10 class names, found {len(names)}; fix or delete the file")
    return names


def load_cifar10(root: str | os.PathLike, split: str = "test") -> TensorImageDataset:
    """CIFAR-10 ``split`` ("train": data_batch_1..5, "test": test_batch) as a :class:`TensorImageDataset`.

    ``root`` is ``cifar-10-batches-bin`` itself or its parent. Guarantees: images uint8
    (N, 3, 32, 32) in memory, labels int64 in 0..9, batches concatenated in file order,
    ``name`` "cifar10/<split>".
    """
    check(split in FILES, f"unknown CIFAR-10 split {split!r}; use 'train' or 'test'")
    folder = cifar10_dir(root)
    check(folder.is_dir(), f"CIFAR-10 folder not found: {folder}; {_FIX}")
    parts = [read_cifar_bin(folder / f) for f in FILES[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0].copy()
    labels = np.concatenate([p[1] for p in parts])
    ds = TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                            class_names=read_class_names(folder), name=f"cifar10/{split}")
    ds.has_splits = True
    return ds
