"""Images and labels from NumPy files (``.npz``, or a ``.npy`` pair), loaded without pickle.

Accepted images: uint8 NHWC (C in 1 or 3) or uint8 NHW (grayscale), or float NCHW (C in 1 or 3)
with values in [0, 1]. Labels: a 1-D integer array of non-negative class indices.

* ``.npz``: images under ``images_key`` (default: the first of ``x``, ``images``, ``data``),
  labels under ``labels_key`` (default: the first of ``y``, ``labels``, ``targets``); an optional
  string array ``class_names`` (or ``classes``) names the classes.
* ``.npy``: ``<stem>.npy`` holds the images and the sibling ``<stem>_labels.npy`` the labels.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from bnadapt.data.base import TensorImageDataset
from bnadapt.errors import BnadaptError, check

IMAGE_KEYS = ("x", "images", "data")
LABEL_KEYS = ("y", "labels", "targets")
CLASS_KEYS = ("class_names", "classes")


def _np_load(path: Path):
    """``np.load(path, allow_pickle=False)`` with every failure turned into a one-line error."""
    check(path.is_file(), f"array file not found: {path}; check the path")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise BnadaptError(f"{path}: cannot read ({e.strerror or e}); check permissions") from None
    check(magic.startswith(b"PK") or magic == b"\x93NUMPY",
          f"{path}: not a NumPy .npy/.npz file (bad magic bytes); save it with np.save/np.savez")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        msg = str(e).replace("\n", " ")
        raise BnadaptError(f"{path}: cannot load ({msg}); save it with np.save/np.savez (no object arrays)") from None


def _pick(npz, path: Path, key: str | None, candidates: tuple[str, ...], what: str) -> np.ndarray:
    keys = list(npz.files)
    if key is None:
        key = next((k for k in candidates if k in keys), None)
        check(key is not None, f"{path}: no {what} array (looked for {', '.join(candidates)}; found "
                               f"{', '.join(keys) or 'none'}); pass the {what} key explicitly")
    check(key in keys, f"{path}: no array named {key!r} (found {', '.join(keys) or 'none'}); pass an existing key")
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        msg = str(e).replace("\n", " ")
        raise BnadaptError(f"{path}: cannot read array {key!r} ({msg}); re-save it without object arrays") from None


def to_nchw(images: np.ndarray, where: str) -> torch.Tensor:
    """uint8 NHWC / NHW -> uint8 NCHW tensor, float NCHW in [0, 1] -> float32 tensor; else an error."""
    shape = tuple(images.shape)
    if images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and shape[3] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        else:
            raise BnadaptError(f"{where}: uint8 images must be NHWC with C in 1 or 3, or NHW (got shape {shape}); "
                               f"transpose them to NHWC")
        return torch.from_numpy(np.ascontiguousarray(images))
    if np.issubdtype(images.dtype, np.floating):
        check(images.ndim == 4 and shape[1] in (1, 3),
              f"{where}: float images must be NCHW with C in 1 or 3 (got shape {shape}); transpose them to NCHW")
        images = images.astype(np.float32)
        if images.size:
            check(bool(np.isfinite(images).all()), f"{where}: float images contain NaN or inf; clean them")
            lo, hi = float(images.min()), float(images.max())
            check(lo >= 0.0 and hi <= 1.0,
                  f"{where}: float images must lie in [0, 1] (found [{lo:.3g}, {hi:.3g}]); rescale them")
        return torch.from_numpy(images)
    raise BnadaptError(f"{where}: images have dtype {images.dtype}; use uint8 NHWC (0..255) or float NCHW in [0, 1]")


def to_labels(labels: np.ndarray, n: int, where: str) -> torch.Tensor:
    """A 1-D (or N x 1) non-negative integer array with ``n`` entries -> int64 tensor; else an error."""
    check(np.issubdtype(labels.dtype, np.integer),
          f"{where}: labels have dtype {labels.dtype}; store integer class indices (e.g. labels.astype(np.int64))")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    check(labels.ndim == 1, f"{where}: labels must be 1-D (got shape {tuple(labels.shape)}); store class indices, "
                            f"not one-hot vectors")
    check(labels.shape[0] == n, f"{where}: {n} images but {labels.shape[0]} labels; give one label per image")
    if labels.size:
        check(int(labels.min()) >= 0, f"{where}: negative label {int(labels.min())}; labels must be class indices >= 0")
    return torch.from_numpy(labels.astype(np.int64))


def load_arrays(path: str | os.PathLike, images_key: str | None = None,
                labels_key: str | None = None) -> TensorImageDataset:
    """A :class:`TensorImageDataset` from an ``.npz`` file or a ``.npy`` pair (see the module doc).

    Guarantees: pickle is never enabled; uint8 images stay uint8 NCHW in memory, float images become
    float32 NCHW checked to lie in [0, 1]; labels are int64 >= 0, one per image; ``name`` is
    "arrays/<file name>". Any unreadable file or wrong shape/dtype/range raises :class:`BnadaptError`.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    class_names = None
    if suffix == ".npz":
        npz = _np_load(path)
        check(isinstance(npz, np.lib.npyio.NpzFile), f"{path}: not an .npz archive; save it with np.savez")
        with npz:
            images = _pick(npz, path, images_key, IMAGE_KEYS, "images")
            labels = _pick(npz, path, labels_key, LABEL_KEYS, "labels")
            ckey = next((k for k in CLASS_KEYS if k in npz.files), None)
            if ckey is not None:
                names = _pick(npz, path, ckey, CLASS_KEYS, "class names")
                check(names.ndim == 1 and names.dtype.kind == "U",
                      f"{path}: {ckey!r} must be a 1-D string array; save it as np.array(names)")
                class_names = [str(s) for s in names]
    elif suffix == ".npy":
        check(images_key is None and labels_key is None,
              f"{path}: images_key/labels_key apply to .npz files only; drop them for a .npy pair")
        lpath = path.with_name(f"{path.stem}_labels.npy")
        check(lpath.is_file(), f"labels file not found: {lpath}; save the labels of {path.name} there")
        images, labels = _np_load(path), _np_load(lpath)
        check(isinstance(images, np.ndarray), f"{path}: not a .npy array; save it with np.save")
        check(isinstance(labels, np.ndarray), f"{lpath}: not a .npy array; save it with np.save")
    else:
        raise BnadaptError(f"{path}: unsupported array file type {suffix or '(none)'}; use .npz or .npy")
    x = to_nchw(images, str(path))
    y = to_labels(labels, x.shape[0], str(path))
    if class_names is not None and y.numel():
        check(len(class_names) > int(y.max()),
              f"{path}: {len(class_names)} class names but label {int(y.max())}; give a name for every class")
    return TensorImageDataset(x, y, class_names=class_names, name=f"arrays/{path.name}")
