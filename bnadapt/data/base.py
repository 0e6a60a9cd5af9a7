"""The dataset protocol every loader returns, and deterministic subsets.

A dataset maps integer indices to ``(x, y)``: ``x`` float32 NCHW in [0, 1], ``y`` int64 labels.
It exposes all labels up front (``labels``) so that subsets can be chosen without loading images.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from bnadapt.errors import BnadaptError, check, check_batch_size, check_count


class ImageDataset:
    """Base class: ``len(ds)``, ``ds.labels`` (int64 tensor), ``ds.get(idx) -> (x, y)``.

    Subclasses implement :meth:`_load` (images for an index array, float32 NCHW in [0, 1]).
    """

    name: str = "dataset"
    class_names: list[str]
    labels: torch.Tensor
    image_shape: tuple[int, int, int]
    has_splits: bool = False
    """Whether the source has train/test splits (Fashion-MNIST, CIFAR-10); array files and folders are one set."""
    preprocessing: dict | None = None
    """What the loader does to the stored images besides scaling to [0, 1] (e.g. resize and crop)."""

    def content_sha256(self) -> tuple[str, str]:
        """``(kind, sha256)`` identifying the data's content: by default the pixels and labels of every
        image; loaders override it when that would be slow (folders hash their file listing)."""
        import hashlib

        h = hashlib.sha256()
        for start in range(0, len(self), 1024):
            x, _ = self.get(np.arange(start, min(start + 1024, len(self))))
            h.update(x.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return "pixels and labels", h.hexdigest()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def _load(self, idx: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_raw(self, idx: np.ndarray) -> torch.Tensor:
        """Images as stored (uint8, or float32 in [0, 1]); by default :meth:`_load`."""
        return self._load(idx)

    def _indices(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise BnadaptError(f"index out of range for {self.name} with {len(self)} images")
        return idx

    def get(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32 NCHW in [0, 1]) and labels (int64) for the given indices, in that order."""
        idx = self._indices(idx)
        return self._load(idx), self.labels[torch.from_numpy(idx)]

    def get_raw(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`get`, with the images as stored: uint8 NCHW where the loader holds uint8 (folders,
        decoded caches; ``x / 255`` is then exactly what :meth:`get` returns), else float32."""
        idx = self._indices(idx)
        return self._load_raw(idx), self.labels[torch.from_numpy(idx)]

    def batches(
        self,
        batch_size: int,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches over ``indices`` (default: all), optionally shuffled with ``seed``."""
        check_batch_size(batch_size)
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            idx = np.random.default_rng(seed).permutation(idx)
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.get(idx[start : start + batch_size])


class TensorImageDataset(ImageDataset):
    """Images held in memory, as uint8 NCHW (converted per batch, /255) or float32 NCHW in [0, 1]."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str] | None = None,
        name: str = "arrays",
    ):
        check(images.ndim == 4, f"{name}: images must be 4-D NCHW, got shape {tuple(images.shape)}")
        check(labels.ndim == 1 and labels.numel() == images.shape[0],
              f"{name}: {images.shape[0]} images but {labels.numel()} labels; give one label per image")
        if images.dtype != torch.uint8:
            images = images.float()
            if images.numel():
                lo, hi = float(images.min()), float(images.max())
                check(lo >= 0.0 and hi <= 1.0,
                      f"{name}: float images must lie in [0, 1] (found [{lo:.3g}, {hi:.3g}]); rescale them")
        self.images = images.contiguous()
        self._content = None
        self.labels = labels.long()
        n_cls = int(self.labels.max()) + 1 if self.labels.numel() else 0
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_cls)]
        self.name = name
        self.image_shape = tuple(images.shape[1:])  # type: ignore[assignment]

    def content_sha256(self) -> tuple[str, str]:
        """SHA-256 of the stored images (their dtype and bytes) and labels; cached."""
        if getattr(self, "_content", None) is None:
            import hashlib

            h = hashlib.sha256(f"{self.images.dtype}|{tuple(self.images.shape)}|".encode())
            h.update(self.images.numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._content = ("pixels and labels", h.hexdigest())
        return self._content

    def _load(self, idx: np.ndarray) -> torch.Tensor:
        x = self.images[torch.from_numpy(idx)]
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.clone()


def subset_indices(labels: torch.Tensor | np.ndarray, n: int, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Deterministic subset: ``n`` indices with at most ``per_class`` per class, chosen with ``seed``.

    Classes are visited round-robin in a seeded order, each contributing its images in a seeded
    order, so the subset is as balanced as the caps allow (the paper: 500 images, at most 1 per class;
    2,000 images, 2 per class). The returned indices are sorted. Raises when fewer than ``n`` images
    satisfy the cap.
    """
    labels = np.asarray(labels).reshape(-1)
    n = check_count(n, "--images (the subset size)")
    if per_class is not None:
        per_class = check_count(per_class, "--per-class")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    cap = per_class if per_class is not None else max(len(p) for p in pools.values())
    available = sum(min(len(p), cap) for p in pools.values())
    check(n <= available,
          f"cannot pick {n} images with at most {cap} per class: only {available} qualify; lower --images or raise "
          "--per-class")
    order = rng.permutation(classes)
    chosen: list[int] = []
    for round_ in range(cap):
        for c in order:
            if len(chosen) == n:
                break
            if round_ < len(pools[c]):
                chosen.append(int(pools[c][round_]))
        if len(chosen) == n:
            break
    return np.sort(np.asarray(chosen, dtype=np.int64))
