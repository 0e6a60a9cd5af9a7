"""Test streams: which image comes when, and what happens to it (docs/stream.md, "Scenarios").

A :class:`Stream` is a seeded, reproducible sequence of ``length`` positions over the images of a
:class:`~bnadapt.data.Selection`; position ``t`` holds a dataset index and a *domain*: a transform of
that image. Today a domain is Gaussian pixel noise of a standard deviation ``sigma[t]`` (0 = clean;
``x + sigma * z``, no clipping, ``z`` a unit normal fixed per position); a corruption at a severity
(issue 10) is the next domain type: it adds ``corruption``/``severity`` arrays beside ``sigma`` and a
branch in :func:`apply_domain`.

Scenarios (:data:`SCENARIOS`):

- ``iid``: images in a seeded random order, one noise level ``sigma``.
- ``class-sorted``: label-correlated order controlled by a Dirichlet concentration (RoTTA's temporal
  sampler, Yuan et al. 2023): the stream is cut into K slots (K = number of classes); each class's images
  are split over the slots in proportions drawn from ``Dir(concentration)``, and each slot plays its
  classes one after another, each as a contiguous run, in a random order. Smaller concentration => a
  class falls into fewer slots => longer same-class runs (-> 0: sorted by class; large: every class in
  every slot, runs of about n_c / K). Needs labels.
- ``gradual``: i.i.d. order; sigma drifts linearly from ``sigma_start`` (first image) to ``sigma`` (last).
- ``mixed``: i.i.d. order; each position's sigma drawn uniformly from ``sigmas`` (domains interleaved).
- ``shift``: i.i.d. order; ``sigma_start`` before position ``round(change_at * length)``, ``sigma`` after.

The images: the selection in seeded random orders, pass after pass, cut at ``length`` (default: the
selection's size); a stream longer than the selection repeats images (with fresh noise). Everything is
drawn from ``(seed, run)`` (:func:`bnadapt.runs.derive_seed`), so equal arguments give equal streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bnadapt.errors import check, check_choice, check_count, check_float, check_seed, check_sigma, check_unique
from bnadapt.runs import derive_seed, indices_sha256

SCENARIOS = ("iid", "class-sorted", "gradual", "mixed", "shift")
NEEDS_LABELS = ("class-sorted",)
ORDER_KEY, NOISE_KEY = 0x5743, 0x5744  # stream keys of (seed, run, key, ...)
NOISE_BLOCK = 256  # unit noise is drawn per block of positions: the same noise whatever the batch size


@dataclass
class Stream:
    """One stream: dataset ``indices`` and per-position ``sigma`` (both length ``len(stream)``), the
    ``labels`` at those positions (None for data without labels) and how it was made."""

    indices: np.ndarray
    sigma: np.ndarray
    labels: np.ndarray | None
    scenario: str
    params: dict = field(default_factory=dict)
    seed: int = 0
    run: int = 0

    def __len__(self) -> int:
        return int(len(self.indices))

    def describe(self) -> dict:
        """The stream's identity and measured structure (mean same-class run length, sigma range)."""
        d = {"scenario": self.scenario, "params": self.params, "length": len(self), "seed": self.seed,
             "run": self.run, "indices_sha256": indices_sha256(self.indices),
             "sigma_min": float(self.sigma.min()), "sigma_max": float(self.sigma.max())}
        if self.labels is not None:
            d["mean_label_run"] = float(np.mean(run_lengths(self.labels)))
        return d


def run_lengths(values: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of equal consecutive values (e.g. same-class runs of a label stream)."""
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.flatnonzero(v[1:] != v[:-1]) + 1
    return np.diff(np.concatenate([[0], cuts, [v.size]]))


def dataset_labels(dataset) -> np.ndarray | None:
    """The dataset's labels as an array, or None for a dataset without labels (``has_labels`` False or
    ``labels`` None)."""
    if not getattr(dataset, "has_labels", True) or getattr(dataset, "labels", None) is None:
        return None
    return np.asarray(dataset.labels)


def check_scenario(scenario: str, *, labeled: bool = True, what: str = "scenario") -> str:
    """A known scenario, and one that can run on this data (``class-sorted`` needs labels)."""
    check_choice(scenario, SCENARIOS, what)
    check(labeled or scenario not in NEEDS_LABELS,
          f"{what} {scenario} orders images by their labels, but the data has none; use iid, gradual, mixed or shift")
    return scenario


def make_stream(
    sel,
    *,
    scenario: str = "iid",
    length: int | None = None,
    sigma: float = 0.5,
    sigma_start: float = 0.0,
    sigmas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
    change_at: float = 0.5,
    concentration: float = 0.1,
    seed: int = 0,
    run: int = 0,
) -> Stream:
    """The stream of ``scenario`` over the images of ``sel`` (a :class:`~bnadapt.data.Selection`) for
    run ``run`` (module docstring). Deterministic for equal arguments; different runs give different
    orders (and, in :func:`stream_batches`, different noise)."""
    labels_all = dataset_labels(sel.dataset)
    check_scenario(scenario, labeled=labels_all is not None)
    n = len(sel)
    check(n >= 1, "the selection holds no images; select some with --images or --data")
    length = n if length is None else check_count(length, "stream length")
    sigma = check_sigma(sigma)
    seed = check_seed(seed)
    params: dict = {"sigma": sigma}
    rng = np.random.default_rng(derive_seed(seed, run, ORDER_KEY))
    passes = -(-length // n)
    base = np.concatenate([rng.permutation(np.asarray(sel.indices, dtype=np.int64)) for _ in range(passes)])[:length]
    labels = None if labels_all is None else labels_all[base]
    sig = np.full(length, sigma, dtype=np.float64)
    if scenario == "class-sorted":
        concentration = check_float(concentration, "concentration", min=0.0, min_open=True,
                                    hint="the Dirichlet concentration: small = long same-class runs, e.g. 0.1")
        order = _dirichlet_order(labels, concentration, rng)
        base, labels = base[order], labels[order]
        params["concentration"] = concentration
    elif scenario == "gradual":
        sigma_start = check_sigma(sigma_start, "sigma_start")
        sig = np.linspace(sigma_start, sigma, length) if length > 1 else sig
        params["sigma_start"] = sigma_start
    elif scenario == "mixed":
        levels = check_unique([check_sigma(s, "sigmas") for s in sigmas], "sigmas")
        sig = np.asarray(levels, dtype=np.float64)[rng.integers(0, len(levels), size=length)]
        params = {"sigmas": levels}
    elif scenario == "shift":
        sigma_start = check_sigma(sigma_start, "sigma_start")
        change_at = check_float(change_at, "change_at", min=0.0, max=1.0,
                                hint="the fraction of the stream before the shift changes, e.g. 0.5")
        sig[: int(round(change_at * length))] = sigma_start
        params.update(sigma_start=sigma_start, change_at=change_at)
    return Stream(base, sig, labels, scenario, params, seed, run)


def _dirichlet_order(labels: np.ndarray, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """RoTTA's label-Dirichlet temporal order (module docstring) as a permutation of positions."""
    classes = np.unique(labels)
    k = len(classes)
    slots: list[list[np.ndarray]] = [[] for _ in range(k)]
    props = rng.dirichlet([concentration] * k, size=k)
    for c, p in zip(classes, props):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(len(pos))]
        for s, part in enumerate(np.split(pos, (np.cumsum(p)[:-1] * len(pos)).astype(int))):
            if len(part):
                slots[s].append(part)
    out = [part for slot in slots for i in rng.permutation(len(slot)) for part in [slot[i]]]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def unit_noise(shape: tuple[int, ...], seed: int, run: int, start: int, stop: int) -> torch.Tensor:
    """Unit normal noise of stream positions ``[start, stop)``, shape ``(stop - start, *shape)``: drawn
    per block of :data:`NOISE_BLOCK` positions from ``(seed, run, NOISE_KEY, block)`` on the CPU, so a
    position's noise is the same whatever the batch size or device."""
    out = []
    for blk in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
        g = torch.Generator().manual_seed(derive_seed(seed, run, NOISE_KEY, blk))
        z = torch.randn((NOISE_BLOCK, *shape), generator=g)
        a, b = max(start - blk * NOISE_BLOCK, 0), min(stop - blk * NOISE_BLOCK, NOISE_BLOCK)
        out.append(z[a:b])
    return torch.cat(out) if len(out) > 1 else out[0]


def apply_domain(x: torch.Tensor, stream: Stream, start: int, stop: int, noise: torch.Tensor | None) -> torch.Tensor:
    """The images of positions ``[start, stop)`` after their domains (today: ``x + sigma_t * z_t``; the
    place where a corruption domain plugs in)."""
    sig = stream.sigma[start:stop]
    if noise is None or not np.any(sig > 0):
        return x
    s = torch.as_tensor(sig, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + s * noise


class NoiseCache:
    """Sequential access to :func:`unit_noise` without redrawing a block per batch."""

    def __init__(self, shape: tuple[int, ...], seed: int, run: int):
        self.shape, self.seed, self.run = tuple(shape), seed, run
        self._blk, self._z = -1, None

    def get(self, start: int, stop: int) -> torch.Tensor:
        if start // NOISE_BLOCK == (stop - 1) // NOISE_BLOCK:
            blk = start // NOISE_BLOCK
            if blk != self._blk:
                self._blk, self._z = blk, unit_noise(self.shape, self.seed, self.run, blk * NOISE_BLOCK,
                                                     (blk + 1) * NOISE_BLOCK)
            return self._z[start - blk * NOISE_BLOCK: stop - blk * NOISE_BLOCK]
        return unit_noise(self.shape, self.seed, self.run, start, stop)


def stream_batches(dataset, stream: Stream, slices, *, device: torch.device, noise: NoiseCache | None = None):
    """``(start, stop, x, y)`` for each slice of stream positions: images after their domains on
    ``device`` (channels_last for 4-D) and labels (CPU; None without labels)."""
    from bnadapt.runs import to_device

    noise = noise or NoiseCache(dataset.image_shape, stream.seed, stream.run)
    noisy = bool(np.any(stream.sigma > 0))
    for sl in slices:
        a, b = sl.start, sl.stop
        x, y = dataset.get(stream.indices[a:b])
        x = apply_domain(x, stream, a, b, noise.get(a, b) if noisy else None)
        yield a, b, to_device(x, device), (y if stream.labels is not None else None)
