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

:func:`corrupted_source` is THE match of a set to the clean images it was made from (a
:class:`CorruptedSource`: set position ``k`` is clean image ``indices[k]``), by the manifest's recorded
source selection and hashes, or image ``k`` = image ``k`` for a released set; ``bnadapt stream
--corrupted`` and ``bnadapt corruptions evaluate --clean`` both use it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bnadapt.corruptions import names as corruption_names
from bnadapt.corruptions.cache import read_manifest, verify_file
from bnadapt.data import Selection, load_dataset, select, subset_indices
from bnadapt.data.arrays import _np_load, to_labels, to_nchw
from bnadapt.data.base import ImageDataset, TensorImageDataset
from bnadapt.data.folder import load_image_folder
from bnadapt.errors import BnadaptError, check, check_count, check_seed
from bnadapt.runs import indices_sha256

LAYOUTS = ("cifar10-c", "imagenet-c")
SEVERITIES = (1, 2, 3, 4, 5)
RELEASED_PARAMS = {"cifar10-c": "cifar", "imagenet-c": "imagenet"}


def parse_spec(layout: str, rest: str) -> tuple[Path, str | None, int | None]:
    """``DIR`` or ``DIR:CORRUPTION:SEVERITY`` (the folder may itself contain colons)."""
    check(rest.strip() != "", f"dataset spec {layout}: needs a folder, e.g. {layout}:/data/{layout.upper()}")
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and not Path(rest).expanduser().exists():
        folder, corruption, sev = parts
        corruption_names.check_corruption(corruption)
        try:
            severity = int(sev)
        except ValueError:
            raise BnadaptError(f"severity {sev!r} in {layout}:{rest} is not an integer; use 1..5") from None
        return Path(folder).expanduser(), corruption, corruption_names.check_severity(severity)
    if len(parts) >= 2 and parts[-1] in corruption_names.ALL and not Path(rest).expanduser().exists():
        raise BnadaptError(f"{layout}:{rest} names a corruption but no severity; use {layout}:DIR:{parts[-1]}:SEVERITY")
    return Path(rest).expanduser(), None, None


class CorruptedSet:
    """A corrupted set on disk (see the module doc): ``available`` corruptions, ``n`` images per
    severity, ``labels`` (N,), ``params`` (the severity table, or None when unknown) and
    :meth:`dataset` for one (corruption, severity)."""

    def __init__(self, root: str | Path, layout: str = "cifar10-c", *, resize=None, crop=None):
        check(layout in LAYOUTS, f"unknown corrupted-set layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.root, self.layout = Path(root).expanduser(), layout
        check(self.root.is_dir(), f"corrupted set folder not found: {self.root}; check the path")
        self.resize, self.crop = resize, crop
        self.manifest = read_manifest(self.root) if layout == "cifar10-c" else None
        self._verified: set[str] = set()
        if layout == "cifar10-c":
            self._open_npy()
        else:
            self._open_folders()
        ident = (self.manifest or {}).get("identity", {})
        self.params = ident.get("params", {}).get("name") if self.manifest else None
        self.params_source = (ident.get("params", {}).get("label") if self.manifest else
                              f"not recorded (no manifest; the released {layout.upper()} uses the "
                              f"{RELEASED_PARAMS[layout]} table)")

    # ------------------------------------------------------------------------------- cifar10-c
    def _open_npy(self) -> None:
        lpath = self.root / "labels.npy"
        check(lpath.is_file(), f"{self.root} has no labels.npy; a cifar10-c:DIR set needs <corruption>.npy files and "
                               "labels.npy")
        labels = _np_load(lpath)
        check(isinstance(labels, np.ndarray) and labels.ndim == 1,
              f"{lpath} must be a 1-D label array (got shape {getattr(labels, 'shape', None)}); save it with np.save")
        if self.manifest is not None:
            self.available = [c for c in corruption_names.ALL if c in self.manifest["corruptions"]
                              and (self.root / f"{c}.npy").is_file()]
        else:
            self.available = [c for c in corruption_names.ALL if (self.root / f"{c}.npy").is_file()]
        check(bool(self.available), f"{self.root} holds no finished corruption files (<corruption>.npy for "
                                    f"{', '.join(corruption_names.ALL[:3])} ...); generate them or fix the path")
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
    def _open_folders(self) -> None:
        self.available = [c for c in corruption_names.ALL if (self.root / c).is_dir()]
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
        return load_image_folder(self.root / corruption / str(severity), resize=self.resize, crop=self.crop)

    # ------------------------------------------------------------------------------- access
    def _check(self, corruption: str, severity: int) -> int:
        corruption_names.check_corruption(corruption)
        severity = corruption_names.check_severity(severity)
        check(corruption in self.available, f"{self.root} has no {corruption} (it holds {', '.join(self.available)}); "
                                            "pick one of those, or generate it")
        return severity

    def _array(self, corruption: str) -> tuple[Path, np.ndarray]:
        """The memory-mapped ``<corruption>.npy`` (its manifest checksum verified on first use)."""
        p = self.root / f"{corruption}.npy"
        entry = (self.manifest or {}).get("corruptions", {}).get(corruption)
        if entry and corruption not in self._verified:
            verify_file(p, entry["sha256"])
            self._verified.add(corruption)
        return p, np.load(p, mmap_mode="r", allow_pickle=False)

    def dataset(self, corruption: str, severity: int) -> ImageDataset:
        """The images of ``corruption`` at ``severity`` (float32 NCHW in [0, 1] per batch), in the
        set's index order, as an :class:`ImageDataset`."""
        severity = self._check(corruption, severity)
        if self.layout == "imagenet-c":
            ds = self._folder(corruption, severity)
            check(len(ds) == self.n and ds.class_names == self.class_names,
                  f"{self.root / corruption / str(severity)} holds {len(ds)} images in {len(ds.class_names)} classes, "
                  f"unlike {self.n} in {len(self.class_names)} of the first set; every set must hold the same images")
            ds.name = f"imagenet-c/{self.root.name}/{corruption}/{severity}"
            return ds
        p, arr = self._array(corruption)
        x = to_nchw(np.array(arr[(severity - 1) * self.n: severity * self.n]), str(p))
        return TensorImageDataset(x, self.labels.clone(), class_names=self.class_names,
                                  name=f"cifar10-c/{self.root.name}/{corruption}/{severity}")

    def images(self, corruption: str, severity: int, positions) -> torch.Tensor:
        """The images at set ``positions`` of ``corruption`` at ``severity``, float32 NCHW in [0, 1]:
        exactly ``dataset(corruption, severity).get(positions)[0]``. The cifar10-c layout reads only
        those rows of the memory-mapped file (checksum verified once, as :meth:`dataset`); the
        imagenet-c layout lists the severity's folder on every call (keep its :meth:`dataset` to reuse)."""
        severity = self._check(corruption, severity)
        if self.layout == "imagenet-c":
            return self.dataset(corruption, severity).get(positions)[0]
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise BnadaptError(f"index out of range for cifar10-c/{self.root.name}/{corruption}/{severity} with "
                               f"{self.n} images")
        p, arr = self._array(corruption)
        return to_nchw(arr[(severity - 1) * self.n + pos], str(p)).float().div_(255.0)

    def severity_params(self, params: str | None = None, what: str = "params") -> tuple[str, str]:
        """The severity table (``imagenet`` or ``cifar``) and where it is known from: the manifest's
        (``params``, if given, must agree), else ``params`` as declared, else the released set's own
        (assumed). ``what`` names the option in the messages."""
        if params is not None:
            corruption_names.check_params(params, what)
        if self.params is not None:
            check(params in (None, self.params),
                  f"{self.root} was made with the {self.params} parameter table (manifest), not {params}; drop "
                  f"{what} or pass {what} {self.params}")
            return self.params, "the manifest"
        if params:
            return params, f"declared with {what}"
        return RELEASED_PARAMS[self.layout], f"assumed for a released {self.layout.upper()} set; declare with {what}"

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
    """Whether ``labels`` (of the clean images matched to the set's positions) are the set's."""
    return labels.shape == cset.labels.shape and bool((labels == cset.labels).all())


# ----------------------------------------------------------------------------------- matching to clean images
class CorruptedSource:
    """A corrupted set (:class:`~bnadapt.data.corrupted.CorruptedSet`) matched image by image to the
    clean data it was made from: set position ``k`` is the corrupted version of ``dataset`` image
    ``indices[k]`` (ascending, as the generator's selection). Made by :func:`corrupted_source`, which
    checks the match; ``params`` names the severity table (``imagenet`` or ``cifar``), ``params_label``
    says it in words, ``params_how`` where it is known from (the manifest, declared or assumed);
    ``clean`` is the :class:`~bnadapt.data.Selection` of the matched clean images (the manifest's
    recorded rule rebuilt, or all N images), whose ``describe()`` identifies them in result files."""

    def __init__(self, cset, clean, *, params: str, params_label: str, params_how: str):
        self.cset, self.clean, self.dataset = cset, clean, clean.dataset
        self.indices = np.asarray(clean.indices, dtype=np.int64)
        self.spec, self.split = clean.spec, clean.split if clean.dataset.has_splits else None
        self.params, self.params_label, self.params_how = params, params_label, params_how
        self._sets: dict = {}

    def __len__(self) -> int:
        return int(len(self.indices))

    def positions(self, idx) -> np.ndarray:
        """The set positions of dataset indices ``idx``; every one must be an image of the set."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.indices, idx)
        ok = (pos < len(self.indices)) & (self.indices[np.minimum(pos, len(self.indices) - 1)] == idx)
        if not ok.all():
            raise BnadaptError(f"image {int(idx[~ok][0])} of {self.dataset.name} is not in the corrupted set "
                               f"{self.cset.root} (it holds {len(self)} of its images); stream the set's images "
                               "(CorruptedSource.selection)")
        return pos

    def check_corruptions(self, names, what: str = "corruptions") -> None:
        """One-line error unless every corruption of ``names`` is in the set."""
        missing = [c for c in names if c not in self.cset.available]
        if missing:
            raise BnadaptError(f"{what}: {self.cset.root} has no {', '.join(missing)} (it holds "
                               f"{', '.join(self.cset.available)}); choose from those, or add it with `bnadapt "
                               f"corruptions generate --corruptions {missing[0]}` and the set's other options")

    def images(self, corruption: str, severity: int, positions) -> torch.Tensor:
        """The set's images at ``positions`` of ``corruption`` at ``severity`` (float32 NCHW in [0, 1],
        exactly :meth:`CorruptedSet.dataset` ``(corruption, severity).get(positions)``): only those rows
        of a cifar10-c layout's files (:meth:`CorruptedSet.images`); an imagenet-c layout's folder
        listing is made once per (corruption, severity) and kept."""
        if self.cset.layout != "imagenet-c":
            return self.cset.images(corruption, int(severity), positions)
        key = (corruption, int(severity))
        ds = self._sets.get(key)
        if ds is None:
            ds = self._sets[key] = self.cset.dataset(corruption, int(severity))
        return ds.get(np.asarray(positions, dtype=np.int64))[0]

    def selection(self, *, images: int | None = None, per_class: int | None = None, subset_seed: int = 0,
                  names: tuple[str, str, str] = ("images", "per_class", "subset_seed")):
        """The set's images as a :class:`~bnadapt.data.Selection` of the clean data: all of them, or
        ``images`` of them with at most ``per_class`` per class chosen with ``subset_seed``
        (:func:`~bnadapt.data.subset_indices` over the set's labels, as ``bnadapt corruptions evaluate
        --images``)."""
        subset_seed = check_seed(subset_seed, names[2])
        pos = np.arange(len(self), dtype=np.int64)
        if images is not None or per_class is not None:
            n = check_count(images, names[0]) if images is not None else len(self)
            k = check_count(per_class, names[1]) if per_class is not None else None
            if images is None:  # per_class alone caps every class
                lab = self.cset.labels
                n = int(sum(min(int((lab == c).sum()), k) for c in lab.unique()))
            pos = subset_indices(self.cset.labels, n, k, seed=subset_seed)
        split = self.split if self.dataset.has_splits else None
        return Selection(self.dataset, self.indices[pos], self.spec, split, images, per_class, subset_seed)

    def check_selection(self, sel) -> None:
        """One-line error unless ``sel`` holds images of this set's clean data."""
        same = sel.dataset is self.dataset or sel.dataset.content_sha256() == self.dataset.content_sha256()
        check(same, f"the selection ({sel.dataset.name}) is not the data the corrupted set {self.cset.root} is matched "
                    f"to ({self.dataset.name}); select from CorruptedSource.selection")
        self.positions(sel.indices)

    def describe(self) -> dict:
        """The set (folder, layout, checksums, manifest identity), the severity table, and the clean data
        it is matched to (spec, name, split, index and content hashes)."""
        kind, sha = self.dataset.content_sha256()
        return {"set": self.cset.describe(), "severity_params": self.params, "severity_params_label": self.params_label,
                "severity_params_from": self.params_how,
                "clean": {"spec": self.spec, "name": self.dataset.name, "split": self.split, "n": len(self),
                          "indices_sha256": indices_sha256(self.indices), "content_sha256": sha,
                          "content_hash_of": kind},
                "match": "set position k is the corrupted version of clean image indices[k]"}


def _open_set(corrupted, what: str) -> CorruptedSet:
    """``corrupted`` itself, or the whole set a folder / ``LAYOUT:DIR`` names (a folder: cifar10-c)."""
    if isinstance(corrupted, CorruptedSet):
        return corrupted
    text = str(corrupted)
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in LAYOUTS:
        folder, corruption, _ = parse_spec(prefix.lower(), rest)
        check(corruption is None, f"{what} {text} names one corruption and severity; give the whole set "
                                  f"({prefix}:DIR) and choose with corruptions and severity")
        return open_corrupted(prefix.lower(), folder)
    return open_corrupted("cifar10-c", text)


def corrupted_source(corrupted, data=None, *, split: str | None = None, params: str | None = None,
                     names: dict | None = None) -> CorruptedSource:
    """The corrupted set ``corrupted`` (a :class:`~bnadapt.data.corrupted.CorruptedSet`, a folder in the
    cifar10-c layout, ``cifar10-c:DIR`` or ``imagenet-c:DIR``) matched to its clean images ``data`` (a
    data spec, an :class:`~bnadapt.data.ImageDataset`, or None: the source the manifest records).

    The match: bnadapt's cache records its source selection (spec, split, subset rule, index and content
    hashes); it is rebuilt on ``data`` and both hashes must agree, so set position ``k`` is clean image
    ``indices[k]``. A set without a manifest (the released CIFAR-10-C, ImageNet-C) is position ``k`` =
    clean image ``k``: ``data`` must hold exactly the set's N images (and, for image folders, the same
    class/file names). Labels and image shape must agree. ``params`` declares the severity table of a
    set without a manifest (default: the released set's own) and must agree with a manifest's. Every
    mismatch is a one-line error; ``names`` maps ``data``/``split``/``params``/``corrupted`` to option
    names for the messages."""
    opt = {"data": "data", "split": "split", "params": "params", "corrupted": "corrupted", **(names or {})}
    cset = _open_set(corrupted, opt["corrupted"])
    table, how = cset.severity_params(params, opt["params"])
    src = (cset.manifest or {}).get("identity", {}).get("source")
    if src is not None:
        want = src.get("split")
        check(split is None or want is None or split == want,
              f"{cset.root} was made from the {want} split; drop {opt['split']} or pass {opt['split']} {want}")
        split = want if want is not None else split
    if isinstance(data, ImageDataset):
        ds, spec = data, data.name
    else:
        if data is None:
            check(src is not None, f"{cset.root} has no manifest (a released set), so the clean images it was made "
                                   f"from are unknown; give them with {opt['data']} (for CIFAR-10-C: cifar10:DIR, the "
                                   "CIFAR-10 test set)")
            data = (cset.manifest or {}).get("source_spec")
            check(bool(data), f"the manifest of {cset.root} records no source data spec; give it with {opt['data']}")
        ds, spec = load_dataset(data, split or "test"), str(data)
    check(ds.has_splits or split in (None, "test"), f"{ds.name} has no train/test splits; drop {opt['split']} {split}")
    check(tuple(ds.image_shape) == tuple(cset.image_shape),
          f"{opt['data']} {spec} has images of shape {tuple(ds.image_shape)}, the corrupted set {cset.root} "
          f"{tuple(cset.image_shape)}; give the data the set was made from")
    if src is not None:
        sel = select(spec, split, images=src.get("images"), per_class=src.get("per_class"),
                     subset_seed=src.get("subset_seed", 0), dataset=ds)
        d = sel.describe()
        check(d["content_sha256"] == src.get("content_sha256"),
              f"{opt['data']} {spec} ({ds.name}) is not the data {cset.root} was generated from ({src.get('name')}, "
              f"{src.get('size')} images, content {str(src.get('content_sha256'))[:12]}); give that data with "
              f"{opt['data']}")
        check(d["indices_sha256"] == src.get("indices_sha256"),
              f"the subset rule recorded in {cset.root}'s manifest selects other images of {spec} than the set holds; "
              "the manifest does not describe this data, regenerate the set")
    else:
        check(len(ds) == cset.n, f"{opt['data']} {spec} holds {len(ds)} images but {cset.root} holds {cset.n} per "
                                 "corruption and severity (a released set without manifest is matched image k to "
                                 "image k); give the clean set the corruptions were made from")
        sel = Selection(ds, np.arange(cset.n, dtype=np.int64), spec, split if ds.has_splits else None)
        paths = getattr(ds, "paths", None)
        if cset.layout == "imagenet-c" and paths is not None:
            first = getattr(cset.dataset(cset.available[0], 1), "paths", None)
            if first is not None:
                key = lambda ps: [(p.parent.name, p.stem) for p in ps]  # noqa: E731
                check(key(first) == key(paths), f"the class/file names of {opt['data']} {spec} differ from "
                                                f"{cset.root}'s; give the clean images the set was made from")
    check(clean_labels_match(cset, ds.labels[torch.from_numpy(sel.indices)]),
          f"the labels of {opt['data']} {spec} differ from {cset.root}'s; give the clean data the set was made from")
    return CorruptedSource(cset, sel, params=table, params_label=corruption_names.PARAM_LABELS[table], params_how=how)
