"""Corrupted sets on disk: ONE reader for bnadapt's cache and the released CIFAR-10-C and ImageNet-C.

- ``cifar10-c:DIR``: ``DIR/<corruption>.npy`` uint8 (5N, H, W[, C]) severity-major (rows
  ``[(s-1)N, sN)`` are severity ``s``) and ``DIR/labels.npy`` (5N labels, as CIFAR-10-C, or N).
  bnadapt's cache (:mod:`bnadapt.corruptions.cache`) has this layout plus ``manifest.json``, whose
  checksums are verified when a corruption is first read and whose parameter table is reported.
- ``imagenet-c:DIR``: ``DIR/<corruption>/<severity>/<class>/<image>`` (ImageNet-C's layout; images
  are used as stored, 224 x 224, unless resize/crop are given).

A data spec ``cifar10-c:DIR:CORRUPTION:SEVERITY`` (or ``imagenet-c:...``) is one corrupted set as an
ordinary :class:`ImageDataset` for any command; ``bnadapt corruptions evaluate`` takes ``DIR`` and
iterates over every corruption and severity. Missing files, wrong shapes or dtypes: one-line errors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bnadapt.data.arrays import _np_load, to_labels, to_nchw
from bnadapt.data.base import ImageDataset, TensorImageDataset
from bnadapt.errors import BnadaptError, check

LAYOUTS = ("cifar10-c", "imagenet-c")
SEVERITIES = (1, 2, 3, 4, 5)
RELEASED_PARAMS = {"cifar10-c": "cifar", "imagenet-c": "imagenet"}


def _names():
    from bnadapt.corruptions import names  # lazy: bnadapt.corruptions imports bnadapt.data

    return names


def parse_spec(layout: str, rest: str) -> tuple[Path, str | None, int | None]:
    """``DIR`` or ``DIR:CORRUPTION:SEVERITY`` (the folder may itself contain colons)."""
    names = _names()
    check(rest.strip() != "", f"dataset spec {layout}: needs a folder, e.g. {layout}:/data/{layout.upper()}")
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and not Path(rest).expanduser().exists():
        folder, corruption, sev = parts
        names.check_corruption(corruption)
        try:
            severity = int(sev)
        except ValueError:
            raise BnadaptError(f"severity {sev!r} in {layout}:{rest} is not an integer; use 1..5") from None
        return Path(folder).expanduser(), corruption, names.check_severity(severity)
    if len(parts) >= 2 and parts[-1] in names.ALL and not Path(rest).expanduser().exists():
        raise BnadaptError(f"{layout}:{rest} names a corruption but no severity; use {layout}:DIR:{parts[-1]}:SEVERITY")
    return Path(rest).expanduser(), None, None


class CorruptedSet:
    """A corrupted set on disk (see the module doc): ``available`` corruptions, ``n`` images per
    severity, ``labels`` (N,), ``params`` (the severity table, or None when unknown) and
    :meth:`dataset` for one (corruption, severity)."""

    def __init__(self, root: str | Path, layout: str = "cifar10-c", *, resize=None, crop=None):
        from bnadapt.corruptions.cache import read_manifest

        names = _names()
        check(layout in LAYOUTS, f"unknown corrupted-set layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.root, self.layout = Path(root).expanduser(), layout
        check(self.root.is_dir(), f"corrupted set folder not found: {self.root}; check the path")
        self.resize, self.crop = resize, crop
        self.manifest = read_manifest(self.root) if layout == "cifar10-c" else None
        self._verified: set[str] = set()
        if layout == "cifar10-c":
            self._open_npy(names)
        else:
            self._open_folders(names)
        ident = (self.manifest or {}).get("identity", {})
        self.params = ident.get("params", {}).get("name") if self.manifest else None
        self.params_source = (ident.get("params", {}).get("label") if self.manifest else
                              f"not recorded (no manifest; the released {layout.upper()} uses the "
                              f"{RELEASED_PARAMS[layout]} table)")

    # ------------------------------------------------------------------------------- cifar10-c
    def _open_npy(self, names) -> None:
        lpath = self.root / "labels.npy"
        check(lpath.is_file(), f"{self.root} has no labels.npy; a cifar10-c:DIR set needs <corruption>.npy files and "
                               "labels.npy")
        labels = _np_load(lpath)
        check(isinstance(labels, np.ndarray) and labels.ndim == 1,
              f"{lpath} must be a 1-D label array (got shape {getattr(labels, 'shape', None)}); save it with np.save")
        if self.manifest is not None:
            self.available = [c for c in names.ALL if c in self.manifest["corruptions"]
                              and (self.root / f"{c}.npy").is_file()]
        else:
            self.available = [c for c in names.ALL if (self.root / f"{c}.npy").is_file()]
        check(bool(self.available), f"{self.root} holds no finished corruption files (<corruption>.npy for "
                                    f"{', '.join(names.ALL[:3])} ...); generate them or fix the path")
        first = np.load(self.root / f"{self.available[0]}.npy", mmap_mode="r", allow_pickle=False)
        total = int(first.shape[0]) if first.ndim else 0
        check(total % 5 == 0 and total > 0, f"{self.root / self.available[0]}.npy has {total} images, not 5 x N "
                                            "(severities 1..5 stacked); the file is not a corrupted set")
        self.n = total // 5
        check(len(labels) in (self.n, 5 * self.n),
              f"{lpath} has {len(labels)} labels but the corruption files hold 5 x {self.n} images; "
              f"give {5 * self.n} (as CIFAR-10-C) or {self.n} labels")
        lab = to_labels(labels, len(labels), str(lpath))
        if len(lab) == 5 * self.n:
            blocks = lab.reshape(5, self.n)
            check(bool((blocks == blocks[0]).all()), f"{lpath}: the 5 severity blocks of labels differ; "
                                                     "labels.npy must repeat the N labels for every severity")
            lab = blocks[0].clone()
        self.labels = lab
        self._shape = tuple(first.shape[1:])
        for c in self.available:
            self._check_npy(c)
        h, w = self._shape[:2]
        ch = 1 if len(self._shape) == 2 else self._shape[2]
        self.image_shape = (ch, h, w)
        names_ = (self.manifest or {}).get("class_names")
        self.class_names = list(names_) if names_ else [str(i) for i in range(int(self.labels.max()) + 1)]

    def _check_npy(self, c: str) -> None:
        p = self.root / f"{c}.npy"
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise BnadaptError(f"{p}: cannot read ({str(e).splitlines()[0]}); re-download or regenerate it") from None
        want = (5 * self.n, *self._shape)
        check(arr.dtype == np.uint8 and tuple(arr.shape) == want and len(want) in (3, 4)
              and (len(want) == 3 or want[3] in (1, 3)),
              f"{p} is {arr.dtype} {tuple(arr.shape)}, expected uint8 {want} (5 x N images, HxW or HxWxC with "
              "C in 1, 3); the file is damaged or from another set")

    # ------------------------------------------------------------------------------- imagenet-c
    def _open_folders(self, names) -> None:
        self.available = [c for c in names.ALL if (self.root / c).is_dir()]
        check(bool(self.available), f"{self.root} has no corruption folders (<corruption>/<severity>/<class>/<image>, "
                                    f"e.g. {self.root}/gaussian_noise/1/...); check the path")
        first = self._folder(self.available[0], 1)
        self.n, self.labels, self.class_names = len(first), first.labels.clone(), list(first.class_names)
        self.image_shape = tuple(first.image_shape)
        for c in self.available:
            for s in SEVERITIES:
                check((self.root / c / str(s)).is_dir(), f"{self.root / c} lacks severity folder {s}; an ImageNet-C "
                                                         "corruption has folders 1..5")

    def _folder(self, corruption: str, severity: int):
        from bnadapt.data.folder import load_image_folder

        return load_image_folder(self.root / corruption / str(severity), resize=self.resize, crop=self.crop)

    # ------------------------------------------------------------------------------- access
    def dataset(self, corruption: str, severity: int) -> ImageDataset:
        """The images of ``corruption`` at ``severity`` (float32 NCHW in [0, 1] per batch), in the
        set's index order, as an :class:`ImageDataset`."""
        names = _names()
        names.check_corruption(corruption)
        severity = names.check_severity(severity)
        check(corruption in self.available, f"{self.root} has no {corruption} (it holds {', '.join(self.available)}); "
                                            "pick one of those, or generate it")
        if self.layout == "imagenet-c":
            ds = self._folder(corruption, severity)
            check(len(ds) == self.n and ds.class_names == self.class_names,
                  f"{self.root / corruption / str(severity)} holds {len(ds)} images in {len(ds.class_names)} classes, "
                  f"unlike {self.n} in {len(self.class_names)} of the first set; every set must hold the same images")
            ds.name = f"imagenet-c/{self.root.name}/{corruption}/{severity}"
            return ds
        p = self.root / f"{corruption}.npy"
        entry = (self.manifest or {}).get("corruptions", {}).get(corruption)
        if entry and corruption not in self._verified:
            from bnadapt.corruptions.cache import verify_file

            verify_file(p, entry["sha256"])
            self._verified.add(corruption)
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        block = np.array(arr[(severity - 1) * self.n: severity * self.n])
        x = to_nchw(block, str(p))
        return TensorImageDataset(x, self.labels.clone(), class_names=self.class_names,
                                  name=f"cifar10-c/{self.root.name}/{corruption}/{severity}")

    def describe(self) -> dict:
        """Folder, layout, image count, corruptions, parameter table and the manifest's checksums."""
        return {"dir": str(self.root), "layout": self.layout, "n": self.n, "image_shape": list(self.image_shape),
                "corruptions": list(self.available), "params": self.params, "params_source": self.params_source,
                "manifest_identity": (self.manifest or {}).get("identity"),
                "checksums": {c: e["sha256"] for c, e in (self.manifest or {}).get("corruptions", {}).items()}}


@lru_cache(maxsize=4)
def _cached_set(root: str, layout: str, resize, crop, stamp) -> CorruptedSet:
    return CorruptedSet(root, layout, resize=resize, crop=crop)


def open_corrupted(layout: str, folder: str | Path, *, resize=None, crop=None) -> CorruptedSet:
    """A :class:`CorruptedSet` (opened once per process and folder state)."""
    folder = Path(folder).expanduser()
    check(folder.is_dir(), f"corrupted set folder not found: {folder}; check the path")
    m = folder / "manifest.json"
    stamp = (m.stat().st_mtime_ns if m.is_file() else 0, folder.stat().st_mtime_ns)
    return _cached_set(str(folder), layout, resize, crop, stamp)


def load_corrupted_spec(layout: str, rest: str, *, resize=None, crop=None) -> ImageDataset:
    """The data set of spec ``<layout>:DIR:CORRUPTION:SEVERITY`` (one corruption and severity)."""
    folder, corruption, severity = parse_spec(layout, rest)
    check(corruption is not None, f"{layout}:{rest} is a whole corrupted set; select one with "
                                  f"{layout}:DIR:CORRUPTION:SEVERITY (`bnadapt corruptions evaluate` takes the whole set)")
    ds = open_corrupted(layout, folder, resize=resize, crop=crop).dataset(corruption, severity)
    return ds


def clean_labels_match(cset: CorruptedSet, labels: torch.Tensor) -> bool:
    return labels.shape == cset.labels.shape and bool((labels == cset.labels).all())
