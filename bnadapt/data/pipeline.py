"""Batches for the model: decoding in worker processes with prefetch, and the process's loading settings.

:func:`batches` is the one way an experiment reads its test batches (the accuracy loop behind ``noise``,
``sweep`` and ``corruptions evaluate``; the stream). Guarantees:

- the batches come in the order asked, each exactly ``dataset.get_raw(indices)``, whatever the number
  of workers: results do not depend on ``--workers`` (tested bit for bit);
- a dataset that decodes files (an image folder without a decoded cache) is read by ``workers`` worker
  processes (``torch.utils.data.DataLoader``; default: one per core) that decode the next batches while
  the model runs on the current one; everything else is read in this process;
- memory stays a few batches whatever the data set size: at most ``2 * workers`` batches are in flight;
- images come as stored (uint8 for folders and caches, else float32); :func:`to_float` turns them into
  float32 in [0, 1] on the device they are on (a uint8 batch crosses to a GPU at a quarter of the bytes).

The settings (:func:`set_loading`: workers, decoded cache folder) belong to the process, like torch's
thread count: the CLI sets them once from ``--workers`` and ``--cache``; they never change a number,
so they are not part of any inputs hash.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from bnadapt.errors import check, check_count

PREFETCH = 2
"""Batches each worker decodes ahead of the model."""


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Loading:
    """How this process reads images: ``workers`` decoding processes (0: decode in this process) and
    ``cache``, the folder of decoded caches (``None``: decode every pass)."""

    workers: int
    cache: Path | None = None


_loading = Loading(workers=default_workers())


def loading() -> Loading:
    """The process's current loading settings."""
    return _loading


def set_loading(*, workers: int | None = None, cache: str | os.PathLike | None = None,
                names: tuple[str, str] = ("workers", "cache")) -> Loading:
    """Set the loading settings (``workers=None``: one per core; ``cache=None``: no cache) and return the
    previous ones. The cache folder is created if missing and probed with a small write, so an unusable
    folder is a one-line error before any work. ``names`` are the option names the errors use."""
    from bnadapt.results import probe_write

    global _loading
    n = default_workers() if workers is None else check_count(workers, names[0], min=0)
    folder = None
    if cache is not None:
        folder = Path(cache).expanduser()
        check(not folder.exists() or folder.is_dir(), f"{names[1]} {folder} is a file; give a folder for decoded caches")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from bnadapt.errors import write_error

            raise write_error(folder, e, names[1]) from None
        probe_write(folder, folder / "cache", names[1])
    previous, _loading = _loading, Loading(workers=n, cache=folder)
    return previous


@contextmanager
def using(**kw):
    """``with using(workers=2, cache=dir): ...`` sets the loading settings for the block."""
    global _loading
    previous = set_loading(**kw)
    try:
        yield _loading
    finally:
        _loading = previous


def to_float(x: torch.Tensor) -> torch.Tensor:
    """A batch as float32 in [0, 1], where it is: uint8 is divided by 255 (the value every loader's
    ``get`` returns), float32 is returned as is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class WaitClock:
    """Seconds the consumer of :func:`batches` spent waiting for the next batch (data wait time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0


class _Batches(torch.utils.data.Dataset):
    """Item ``k`` is the ``k``-th requested batch (what a worker decodes)."""

    def __init__(self, dataset, index_batches: Sequence[np.ndarray]):
        self.dataset, self.index_batches = dataset, index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, k: int):
        return raw(self.dataset, self.index_batches[k])


def raw(dataset, idx):
    """``dataset.get_raw(idx)`` where the dataset has it, else ``dataset.get(idx)``."""
    get_raw = getattr(dataset, "get_raw", None)
    return get_raw(idx) if get_raw is not None else dataset.get(idx)


def decodes(dataset) -> bool:
    """Whether reading ``dataset`` means decoding files (then worker processes pay)."""
    flag = getattr(dataset, "decodes", False)
    return bool(flag() if callable(flag) else flag)


def batches(dataset, index_batches: Sequence[Sequence[int] | np.ndarray], *, workers: int | None = None,
            pin: bool = False, clock: WaitClock | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` for each index array in ``index_batches``, in that order: ``x`` as stored (see the
    module's guarantees; :func:`to_float` converts), ``y`` int64 labels. ``workers`` defaults to the
    process's setting; ``pin`` pins the batches for a fast copy to a GPU; ``clock`` accumulates the
    time spent waiting for each batch."""
    index_batches = [np.asarray(b, dtype=np.int64).reshape(-1) for b in index_batches]
    n = loading().workers if workers is None else check_count(workers, "workers", min=0)
    n = min(n, len(index_batches))
    if n > 0 and decodes(dataset):
        loader = torch.utils.data.DataLoader(_Batches(dataset, index_batches), batch_size=None, shuffle=False,
                                             num_workers=n, prefetch_factor=PREFETCH, pin_memory=pin,
                                             multiprocessing_context="fork")
        source: Iterator = iter(loader)
    else:
        source = (raw(dataset, b) for b in index_batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(source)
        except StopIteration:
            return
        if clock is not None:
            clock.seconds += time.perf_counter() - t0
            clock.batches += 1
        yield item
