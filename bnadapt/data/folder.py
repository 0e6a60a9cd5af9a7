"""Image folders laid out as ``root/<class>/<image>`` (the ImageNet validation layout).

Only paths live in memory; images are decoded with Pillow when a batch is requested, converted to
RGB, resized so the shorter side is ``resize`` (bilinear, as torchvision's ``Resize(256)``) and
center-cropped to ``crop`` x ``crop`` (as ``CenterCrop(224)``). The default (``"auto"``) is the
paper's 256 / 224 for images whose shorter side is at least 224 pixels, and neither step for smaller
images (e.g. a 32x32 CIFAR-style folder), decided from the first image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bnadapt.data.base import ImageDataset
from bnadapt.errors import BnadaptError, check

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
DEFAULT_RESIZE, DEFAULT_CROP = 256, 224
AUTO = "auto"


def _open_error(path: Path, e: Exception) -> BnadaptError:
    msg = str(e).replace("\n", " ")
    return BnadaptError(f"cannot read image {path} ({type(e).__name__}: {msg}); remove or replace the file")


def list_dir(folder: Path) -> list[Path]:
    """Entries of ``folder``; an unreadable folder is a one-line error."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise BnadaptError(f"cannot list {folder} ({e.strerror or e}); check the path and permissions") from None


def resized_size(width: int, height: int, resize: int | None) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resize`` (torchvision's rounding: truncate)."""
    if resize is None:
        return width, height
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


class ImageFolderDataset(ImageDataset):
    """Lazy ``root/<class>/<image>`` dataset; see :func:`load_image_folder`."""

    def __init__(self, root: str | os.PathLike, resize: int | None | str = AUTO, crop: int | None | str = AUTO):
        root = Path(root).expanduser()
        check(root.is_dir(), f"image folder not found: {root}; give a folder holding one subfolder per class")
        for what, v in (("resize", resize), ("crop", crop)):
            check(v is None or v == AUTO or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                  f"--{what} must be a positive integer, none or auto (got {v!r})")
        self.root = root
        self.class_names = sorted(d.name for d in list_dir(root) if d.is_dir() and not d.name.startswith("."))
        check(bool(self.class_names), f"{root} has no class subfolders; lay images out as {root}/<class>/<image>")
        self.paths: list[Path] = []
        labels: list[int] = []
        for c, name in enumerate(self.class_names):
            files = sorted(p for p in list_dir(root / name) if p.is_file() and p.suffix.lower() in EXTENSIONS)
            self.paths += files
            labels += [c] * len(files)
        check(bool(self.paths), f"no images ({'/'.join(EXTENSIONS)}) found under {root}/<class>/; check the path")
        if resize == AUTO or crop == AUTO:
            try:
                with Image.open(self.paths[0]) as im:
                    large = min(im.size) >= DEFAULT_CROP
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                raise _open_error(self.paths[0], e) from None
            if resize == AUTO:
                resize = DEFAULT_RESIZE if large else None
            if crop == AUTO:
                crop = DEFAULT_CROP if large else None
        check(resize is None or crop is None or crop <= resize,
              f"crop {crop} exceeds resize {resize}; use --crop <= --resize")
        self.resize, self.crop = resize, crop
        self.preprocessing = {"resize_shorter_side": resize, "center_crop": crop, "interpolation": "bilinear",
                              "color": "RGB"}
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.name = f"folder/{root.name}"
        if crop is not None:
            self.image_shape = (3, crop, crop)
        else:  # without a crop every image must end up the same size: check headers now
            sizes: dict[tuple[int, int], Path] = {}
            for p in self.paths:
                try:
                    with Image.open(p) as im:
                        sizes.setdefault(resized_size(*im.size, resize), p)
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
                    raise _open_error(p, e) from None
                if len(sizes) > 1:
                    (s1, p1), (s2, p2) = sizes.items()
                    raise BnadaptError(f"images differ in size without a crop ({p1}: {s1[0]}x{s1[1]}, "
                                       f"{p2}: {s2[0]}x{s2[1]}); set crop (and resize)")
            (w, h), = sizes
            self.image_shape = (3, h, w)

    def content_sha256(self) -> tuple[str, str]:
        """SHA-256 of the file listing (class/file name and size of every image), not of the pixels:
        hashing every image of an ImageNet-sized folder would take minutes."""
        import hashlib

        h = hashlib.sha256()
        for p in self.paths:
            h.update(f"{p.parent.name}/{p.name}|{p.stat().st_size}\n".encode())
        return "file listing (class/name, size)", h.hexdigest()

    def load_image(self, path: Path) -> np.ndarray:
        """One image as uint8 HWC RGB after resize and center crop; errors name the file."""
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = resized_size(*im.size, self.resize)
                if (w, h) != im.size:
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                if self.crop is not None:
                    c = self.crop
                    check(w >= c and h >= c, f"image {path} is {w}x{h}, smaller than crop {c}; set resize >= crop")
                    top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
                    im = im.crop((left, top, left + c, top + c))
                arr = np.asarray(im, dtype=np.uint8)
        except BnadaptError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            raise _open_error(path, e) from None
        check(arr.shape == (self.image_shape[1], self.image_shape[2], 3),
              f"image {path} is {arr.shape[1]}x{arr.shape[0]} after resizing, expected "
              f"{self.image_shape[2]}x{self.image_shape[1]}; set crop so all images share one size")
        return arr

    def decode(self, idx) -> torch.Tensor:
        """The images at ``idx`` decoded from their files: uint8 NCHW."""
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.load_image(self.paths[int(i)]).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def _cache(self):
        """The decoded cache of this folder in the process's ``--cache`` folder (built on first use), or
        ``None`` without one."""
        from bnadapt.data.cache import build_cache, open_cache
        from bnadapt.data.pipeline import loading

        folder = loading().cache
        if folder is None:
            return None
        caches = self.__dict__.setdefault("_caches", {})
        if folder not in caches:
            caches[folder] = open_cache(folder, self) or build_cache(folder, self)
        return caches[folder]

    def decodes(self) -> bool:
        """True unless a decoded cache serves the images (then reading is a copy, not a decode)."""
        from bnadapt.data.pipeline import loading

        return loading().cache is None

    def _load_raw(self, idx: np.ndarray) -> torch.Tensor:
        cache = self._cache()
        return cache.read(idx) if cache is not None else self.decode(idx)

    def _load(self, idx: np.ndarray) -> torch.Tensor:
        return self._load_raw(idx).float().div_(255.0)


def load_image_folder(root: str | os.PathLike, resize: int | None | str = AUTO,
                      crop: int | None | str = AUTO) -> ImageFolderDataset:
    """A lazy dataset over ``root/<class>/<image>``.

    Guarantees: classes are the sorted subfolder names (hidden ones skipped; label = position);
    images are files with extensions jpg/jpeg/png/bmp/ppm/webp (any case), sorted per class; only
    paths are held in memory. ``get`` returns float32 (N, 3, H, W) in [0, 1]: RGB, shorter side
    resized to ``resize`` (bilinear), center crop ``crop`` x ``crop``; ``None`` skips a step, ``"auto"``
    (default) is 256 / 224 for images of at least 224 pixels and neither step for smaller ones, and
    without a crop all images must share one output size (checked up front). An unreadable image
    raises :class:`BnadaptError` naming the file. ``name`` is "folder/<root folder name>".
    """
    return ImageFolderDataset(root, resize=resize, crop=crop)
