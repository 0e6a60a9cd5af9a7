"""Robust per-channel location and scale (MedBN-style; beyond the paper), for adaptive BN.

Two estimators, each a location with its matching scale, both *consistent for a Gaussian*: on clean
normally distributed values they estimate the mean and the (biased) variance, so switching them on
changes little on clean data, while a few outlying values (poisoned images, a corrupted pixel region)
move them only boundedly.

- ``"median"``: location = the median (torch's lower median for an even count); scale =
  ``1.4826 * MAD`` (median absolute deviation from the median; ``1.4826 = 1 / Phi^-1(3/4)``), so the
  variance returned is ``(1.4826 * MAD)^2``. Breakdown point 50%. Park et al. (MedBN, 2024) use the
  median and the median of squared deviations (without the consistency factor). A channel whose MAD
  is 0 (more than half its values equal, e.g. the constant background of clean Fashion-MNIST images)
  would be normalized by ``sqrt(eps)``; it gets ``sqrt(pi/2)`` times the mean absolute deviation from
  the median instead (Gaussian-consistent, not 50%-robust).
- ``"trimmed"``: the :data:`TRIM` fraction of the smallest and of the largest values is dropped; location =
  the mean of the rest; variance = their biased variance divided by the variance of a standard normal
  truncated to the same central ``1 - 2*TRIM`` mass (:data:`TRIM_VAR_FACTOR`, about 0.438). Breakdown
  point :data:`TRIM`.

Functions take values along one dimension and return float tensors without host synchronization.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

ROBUST = ("median", "trimmed")
MAD_TO_SD = 1.0 / NormalDist().inv_cdf(0.75)  # 1.4826
MEAN_AD_TO_SD = (math.pi / 2) ** 0.5  # E|X - mu| = sd * sqrt(2 / pi) for a Gaussian
TRIM = 0.1
_z = NormalDist().inv_cdf(1.0 - TRIM)
TRIM_VAR_FACTOR = 1.0 - 2.0 * _z * NormalDist().pdf(_z) / (1.0 - 2.0 * TRIM)


def robust_mean_var(v: torch.Tensor, kind: str, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust ``(location, variance)`` of the values of ``v`` along ``dim`` (``kind`` in :data:`ROBUST`).

    Differentiable (sub-gradients through the order statistics). On Gaussian values both kinds agree
    with the mean and the biased variance up to sampling error."""
    n = v.shape[dim]
    if kind == "median":
        loc = v.median(dim=dim, keepdim=True).values
        dev = (v - loc).abs()
        mad = dev.median(dim=dim).values
        # More than half the values equal (e.g. a constant image background): the MAD is 0. Such a
        # channel gets the Gaussian-consistent mean absolute deviation from the median instead.
        scale = torch.where(mad > 0, MAD_TO_SD * mad, MEAN_AD_TO_SD * dev.mean(dim))
        return loc.squeeze(dim), scale * scale
    if kind == "trimmed":
        k = int(TRIM * n)
        s = v.sort(dim=dim).values.narrow(dim, k, n - 2 * k) if k > 0 else v
        var, loc = torch.var_mean(s, dim=dim, correction=0)
        return loc, var / TRIM_VAR_FACTOR if k > 0 else var
    raise ValueError(f"unknown robust statistic {kind!r}; choose one of {', '.join(ROBUST)}")


def robust_center(v: torch.Tensor, kind: str, dim: int = 0) -> torch.Tensor:
    """Robust location alone (median, or mean after trimming :data:`TRIM` per tail) along ``dim``."""
    n = v.shape[dim]
    if kind == "median":
        return v.median(dim=dim).values
    k = int(TRIM * n)
    return (v.sort(dim=dim).values.narrow(dim, k, n - 2 * k) if k > 0 else v).mean(dim)


def channel_values(x: torch.Tensor) -> torch.Tensor:
    """A BN input ``(N, C, *)`` as ``(C, N * prod(*))``: every value of each channel in one row."""
    c = x.shape[1]
    return x.transpose(0, 1).reshape(c, -1)


def robust_batch_stats(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust per-channel ``(mean, variance)`` of a BN input over all its values (images x positions):
    the robust counterpart of the batch statistics that per-batch adaptation uses."""
    return robust_mean_var(channel_values(x), kind, dim=1)
