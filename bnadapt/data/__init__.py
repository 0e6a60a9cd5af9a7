"""Datasets: the :class:`ImageDataset` protocol, the loaders, and :func:`load_dataset` (spec strings).

Every loader returns an :class:`ImageDataset` whose ``get`` yields float32 NCHW images in [0, 1]
and int64 labels, and whose ``name`` is readable (it is written into result files).
"""

from __future__ import annotations

from pathlib import Path

from bnadapt.data.arrays import load_arrays
from bnadapt.data.base import ImageDataset, TensorImageDataset, subset_indices
from bnadapt.data.cifar10 import load_cifar10
from bnadapt.data.fashion_mnist import load_fashion_mnist
from bnadapt.data.folder import ImageFolderDataset, list_dir, load_image_folder
from bnadapt.errors import BnadaptError, check

__all__ = [
    "ImageDataset", "TensorImageDataset", "ImageFolderDataset", "subset_indices",
    "load_fashion_mnist", "load_cifar10", "load_image_folder", "load_arrays", "load_dataset", "SPEC_FORMS",
]

SPEC_FORMS = (
    "fashion-mnist", "fashion-mnist:ROOT", "cifar10:DIR", "folder:DIR", "npz:FILE.npz", "npy:FILE.npy",
    "FILE.npz", "FILE.npy", "DIR (holding cifar-10-batches-bin, Fashion-MNIST idx files, or class subfolders)",
)
_FMNIST = ("fashion-mnist", "fashion_mnist", "fmnist")


def _unknown(spec: str, why: str) -> BnadaptError:
    return BnadaptError(f"unknown dataset spec {spec!r} ({why}); use one of: {', '.join(SPEC_FORMS)}")


def _from_dir(path: Path, spec: str, split: str) -> ImageDataset:
    """Guess the format of a bare directory: CIFAR-10 binary, Fashion-MNIST idx files, or class folders."""
    if (path / "cifar-10-batches-bin").is_dir() or (path / "test_batch.bin").is_file() \
            or (path / "data_batch_1.bin").is_file():
        return load_cifar10(path, split)
    stems = ("t10k-images-idx3-ubyte", "train-images-idx3-ubyte")
    if any((path / f"{s}{ext}").is_file() for s in stems for ext in ("", ".gz")):
        return load_fashion_mnist(split, root=path)
    if any(d.is_dir() and not d.name.startswith(".") for d in list_dir(path)):
        return load_image_folder(path)
    raise _unknown(spec, "directory holds no CIFAR-10 batches, Fashion-MNIST files or class subfolders")


def load_dataset(spec: str, split: str = "test") -> ImageDataset:
    """Load the dataset named by ``spec`` (see :data:`SPEC_FORMS`).

    ``fashion-mnist[:ROOT]`` and ``cifar10:DIR`` honour ``split`` ("train" or "test"); folders and
    array files are a single split, so ``split`` is ignored for them. Prefixes are case-insensitive;
    anything else is taken as a path (``~`` expanded). Unknown forms raise a one-line
    :class:`BnadaptError` listing the accepted ones. The result's ``name`` is readable, e.g.
    "fashion-mnist/test", "cifar10/test", "folder/val", "arrays/x.npz".
    """
    check(isinstance(spec, str) and spec.strip() != "", f"empty dataset spec; use one of: {', '.join(SPEC_FORMS)}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    key = prefix.lower()
    if key in _FMNIST:
        return load_fashion_mnist(split, root=rest or None)
    if sep and key in ("cifar10", "cifar-10", "folder", "npz", "npy", "arrays"):
        check(rest != "", f"dataset spec {spec!r} needs a path after the colon, e.g. {key}:/data/{key}")
        if key in ("cifar10", "cifar-10"):
            return load_cifar10(rest, split)
        if key == "folder":
            return load_image_folder(rest)
        return load_arrays(rest)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".npz", ".npy"):
        return load_arrays(path)
    if path.is_dir():
        return _from_dir(path, spec, split)
    raise _unknown(spec, "not a known prefix, and no such directory" if not path.exists() else "unsupported file type")
