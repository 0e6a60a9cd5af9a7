"""Accuracy under Gaussian noise, with and without adaptive BN (paper Table 1, Tables 4 and 5).

Protocol (one run): the evaluated images are shuffled with the run's seed, cut into test batches of
``batch_size`` in that order, and each batch gets fresh noise ``N(0, sigma^2 I)`` in pixel space (no
clipping). Without adaptation the model is used as given (eval mode). With adaptation each noisy batch
is classified by the per-batch adapted model (:func:`bnadapt.adapt.adapt`), i.e. normalized with its
own statistics mixed at ``rho``. A last batch of a single image is merged into the one before it
(a batch of one cannot be normalized). ``runs`` repeats reshuffle and resample; tables report the
mean and two sample standard deviations (ddof=1), as the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bnadapt.adapt import adapt, check_rho
from bnadapt.data.base import ImageDataset
from bnadapt.errors import check


def check_sigma(sigma: float, *, positive: bool = False) -> float:
    """Validate a noise level in pixel units."""
    sigma = float(sigma)
    if positive:
        check(sigma > 0 and math.isfinite(sigma), f"sigma must be > 0 (got {sigma})")
    else:
        check(sigma >= 0 and math.isfinite(sigma), f"sigma must be >= 0 (got {sigma})")
    return sigma


def run_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ``keys`` (runs, images, sigmas)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``batch_size`` covering ``n`` items; a trailing single item joins the previous batch."""
    check(batch_size >= 1, f"batch size must be >= 1 (got {batch_size})")
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def prepare(model: nn.Module, *, compile: bool = False) -> nn.Module:
    """Eval-mode model in channels_last memory format (faster convolutions on CPU), optionally
    wrapped by ``torch.compile`` (static shapes). Converts ``model`` in place; returns it (or its
    compiled wrapper, which shares its parameters and buffers)."""
    model = model.eval().to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
    return model


@torch.inference_mode()
def accuracy_under_noise(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    sigma: float,
    rho: float | None = None,
    batch_size: int = 512,
    indices: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    run: int = 0,
    interpolate: str = "std",
    progress=None,
) -> float:
    """Top-1 accuracy on ``dataset`` (or ``indices``) under Gaussian noise ``sigma`` for one run.

    ``rho=None`` evaluates the model as given (standard inference); a number evaluates the per-batch
    adapted model at that rho. Deterministic for a given (seed, run). ``model`` is never modified.
    """
    sigma = check_sigma(sigma)
    if rho is not None:
        rho = check_rho(rho)
        check(batch_size >= 2, f"per-batch adaptation needs batch size >= 2 (got {batch_size})")
        net = adapt(model, rho, interpolate=interpolate)
    else:
        net = model
    was_training = net.training
    net.eval()
    gen = run_generator(seed, run)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = idx[torch.randperm(len(idx), generator=gen).numpy()]
    correct = 0
    try:
        for sl in batch_slices(len(order), batch_size):
            x, y = dataset.get(order[sl])
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=gen)
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            correct += int((net(x).argmax(1) == y).sum())
            if progress is not None:
                progress.update(len(y))
    finally:
        net.train(was_training)
    return correct / max(len(order), 1)


@dataclass
class Cell:
    """Accuracies of repeated runs for one setting, with the paper's mean +- 2 sd."""

    accs: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def two_sd(self) -> float:
        return float(2 * np.std(self.accs, ddof=1)) if len(self.accs) > 1 else 0.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "two_sd": self.two_sd, "runs": list(self.accs)}

    def fmt(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.two_sd:.2f}"


def evaluate_cell(model, dataset, *, sigma, rho, batch_size, runs, seed, indices=None, interpolate="std", progress=None) -> Cell:
    """``runs`` repetitions of :func:`accuracy_under_noise` (run r uses seed stream (seed, r))."""
    check(runs >= 1, f"runs must be >= 1 (got {runs})")
    return Cell([
        accuracy_under_noise(model, dataset, sigma=sigma, rho=rho, batch_size=batch_size, indices=indices,
                             seed=seed, run=r, interpolate=interpolate, progress=progress)
        for r in range(runs)
    ])


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    cols = [header] + [list(r) for r in rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
