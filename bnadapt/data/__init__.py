"""Datasets: the :class:`ImageDataset` protocol, the loaders, and :func:`load_dataset` (spec strings).

Every loader returns an :class:`ImageDataset` whose ``get`` yields float32 NCHW images in [0, 1]
and int64 labels, and whose ``name`` is readable (it is written into result files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnadapt.data.arrays import load_arrays
from bnadapt.data.base import ImageDataset, TensorImageDataset, subset_indices
from bnadapt.data.cifar10 import load_cifar10
from bnadapt.data.fashion_mnist import load_fashion_mnist
from bnadapt.data.folder import ImageFolderDataset, list_dir, load_image_folder
from bnadapt.errors import BnadaptError, check, check_count, check_seed

__all__ = [
    "ImageDataset", "TensorImageDataset", "ImageFolderDataset", "Selection", "subset_indices", "select",
    "load_fashion_mnist", "load_cifar10", "load_image_folder", "load_arrays", "load_dataset", "SPEC_FORMS",
]

SPEC_FORMS = (
    "fashion-mnist", "fashion-mnist:ROOT", "cifar10:DIR", "folder:DIR", "npz:FILE.npz", "npy:FILE.npy",
    "FILE.npz", "FILE.npy", "cifar10-c:DIR:CORRUPTION:SEVERITY", "imagenet-c:DIR:CORRUPTION:SEVERITY",
    "DIR (holding cifar-10-batches-bin, Fashion-MNIST idx files, or class subfolders)",
)
_FMNIST = ("fashion-mnist", "fashion_mnist", "fmnist")


def _unknown(spec: str, why: str) -> BnadaptError:
    return BnadaptError(f"unknown dataset spec {spec!r} ({why}); use one of: {', '.join(SPEC_FORMS)}")


def _from_dir(path: Path, spec: str, split: str, resize, crop) -> ImageDataset:
    """Guess the format of a bare directory: CIFAR-10 binary, Fashion-MNIST idx files, or class folders."""
    if (path / "cifar-10-batches-bin").is_dir() or (path / "test_batch.bin").is_file() \
            or (path / "data_batch_1.bin").is_file():
        return load_cifar10(path, split)
    stems = ("t10k-images-idx3-ubyte", "train-images-idx3-ubyte")
    if any((path / f"{s}{ext}").is_file() for s in stems for ext in ("", ".gz")):
        return load_fashion_mnist(split, root=path)
    if any(d.is_dir() and not d.name.startswith(".") for d in list_dir(path)):
        return load_image_folder(path, resize=resize, crop=crop)
    raise _unknown(spec, "directory holds no CIFAR-10 batches, Fashion-MNIST files or class subfolders")


def load_dataset(spec: str, split: str = "test", *, npz_keys: tuple[str, str] | None = None,
                 resize: int | None | str = "auto", crop: int | None | str = "auto") -> ImageDataset:
    """Load the dataset named by ``spec`` (see :data:`SPEC_FORMS`).

    ``fashion-mnist[:ROOT]`` and ``cifar10:DIR`` honour ``split`` ("train" or "test"); folders and
    array files are a single split, so ``split`` is ignored for them (``has_splits`` is False).
    ``npz_keys=(images_key, labels_key)`` names the arrays of an ``.npz`` file; ``resize``/``crop``
    apply to image folders (see :func:`load_image_folder`). ``cifar10-c:DIR:CORRUPTION:SEVERITY`` and
    ``imagenet-c:DIR:CORRUPTION:SEVERITY`` are one corrupted set (:mod:`bnadapt.data.corrupted`; used as
    stored unless resize/crop are given). Prefixes are case-insensitive;
    anything else is taken as a path (``~`` expanded). Unknown forms raise a one-line
    :class:`BnadaptError` listing the accepted ones. The result's ``name`` is readable, e.g.
    "fashion-mnist/test", "cifar10/test", "folder/val", "arrays/x.npz".
    """
    check(isinstance(spec, str) and spec.strip() != "", f"empty dataset spec; use one of: {', '.join(SPEC_FORMS)}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    key = prefix.lower()
    keys = tuple(npz_keys) if npz_keys else (None, None)
    if key in _FMNIST:
        return load_fashion_mnist(split, root=rest or None)
    if sep and key in ("cifar10-c", "imagenet-c"):  # one corruption and severity of a corrupted set
        from bnadapt.data.corrupted import load_corrupted_spec

        return load_corrupted_spec(key, rest, resize=None if resize == "auto" else resize,
                                   crop=None if crop == "auto" else crop)
    if sep and key in ("cifar10", "cifar-10", "folder", "npz", "npy", "arrays"):
        check(rest != "", f"dataset spec {spec!r} needs a path after the colon, e.g. {key}:/data/{key}")
        if key in ("cifar10", "cifar-10"):
            return load_cifar10(rest, split)
        if key == "folder":
            return load_image_folder(rest, resize=resize, crop=crop)
        return load_arrays(rest, *keys)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".npz", ".npy"):
        return load_arrays(path, *keys)
    if path.is_dir():
        return _from_dir(path, spec, split, resize, crop)
    raise _unknown(spec, "not a known prefix, and no such directory" if not path.exists() else "unsupported file type")


@dataclass
class Selection:
    """The images an experiment runs on: a dataset, the chosen indices (in ascending order), and how
    they were chosen. :meth:`describe` is the ``data`` entry of every result file."""

    dataset: ImageDataset
    indices: np.ndarray
    spec: str
    split: str | None
    images: int | None = None
    per_class: int | None = None
    subset_seed: int = 0

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.image_shape)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def describe(self) -> dict:
        """Spec, loader name, split (``None`` for data without splits), set size, the subset's rule and
        index hash, the content hash, and the loader's preprocessing."""
        from bnadapt.runs import indices_sha256

        kind, sha = self.dataset.content_sha256()
        return {"spec": self.spec, "name": self.dataset.name, "split": self.split if self.dataset.has_splits else None,
                "size": len(self.dataset), "n": len(self), "images": self.images, "per_class": self.per_class,
                "subset_seed": self.subset_seed, "indices_sha256": indices_sha256(self.indices),
                "content_sha256": sha, "content_hash_of": kind, "image_shape": list(self.image_shape),
                "preprocessing": self.dataset.preprocessing}


def select(spec: str, split: str | None = "test", *, images: int | None = None, per_class: int | None = None,
           subset_seed: int = 0, npz_keys: tuple[str, str] | None = None, resize: int | None | str = "auto",
           crop: int | None | str = "auto", dataset: ImageDataset | None = None) -> Selection:
    """Load ``spec`` (or use ``dataset``) and choose the images: all of them, or ``images`` of them
    with at most ``per_class`` per class, chosen with ``subset_seed`` (:func:`subset_indices`).
    ``per_class`` alone caps every class. A ``split`` other than test on data without splits is an error."""
    if images is not None:
        images = check_count(images, "--images")
    if per_class is not None:
        per_class = check_count(per_class, "--per-class")
    subset_seed = check_seed(subset_seed, "--subset-seed")
    ds = dataset if dataset is not None else load_dataset(spec, split or "test", npz_keys=npz_keys, resize=resize,
                                                          crop=crop)
    check(ds.has_splits or split in (None, "test"),
          f"{ds.name} has no train/test splits; drop --split {split} (the whole file or folder is used)")
    check(len(ds) >= 1, f"{ds.name} holds no images; check --data")
    if images is None and per_class is None:
        idx = np.arange(len(ds), dtype=np.int64)
    else:
        n = images if images is not None else len(ds)
        if images is None:  # --per-class alone: every class capped
            n = int(sum(min(int((ds.labels == c).sum()), per_class) for c in ds.labels.unique()))
        idx = subset_indices(ds.labels, n, per_class, seed=subset_seed)
    return Selection(ds, idx, spec, split if ds.has_splits else None, images, per_class, subset_seed)
