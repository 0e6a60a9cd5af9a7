"""Randomized smoothing (Cohen et al., 2019) for a frozen, adapted base classifier.

The smoothed classifier of a base classifier ``f`` (images in [0, 1] NCHW -> logits) is::

    g(x) = argmax_c  P( f(x + delta) = c ),    delta ~ N(0, sigma^2 I)   (pixel space, no clipping)

and if ``p_A >= P(f(x + delta) = c_A)`` with ``p_A > 1/2`` then ``g`` returns ``c_A`` everywhere within
the L2 ball of radius ``sigma * Phi^-1(p_A)`` around ``x``. :class:`Smooth` estimates this with Monte
Carlo sampling exactly as Cohen et al.'s ``CERTIFY`` and ``PREDICT``; each method's docstring states
its guarantee. In Nandy et al. (section 3, Appendix D) ``f`` is an adversarially trained model whose
BN statistics were re-estimated on noisy test batches at the same ``sigma`` and then frozen; this
module only *consumes* such a model: it never calls ``.train()``/``.eval()``, never writes to it, and
refuses models whose output would depend on the batch (BN or dropout in training mode, per-batch
adaptive BN), because the certificate needs one fixed function ``f`` and i.i.d. samples.

Data-set runs (:func:`certify_run`)
-----------------------------------
``certify_run(smooth_factory, dataset, indices, out_tsv, sigmas=..., n0=..., n=..., alpha=..., seed=...)``
certifies every index at every sigma. ``smooth_factory(sigma)`` returns the :class:`Smooth` for that
sigma (the caller adapts and freezes the model per sigma); it is called once per sigma, sigma by
sigma, and its result is used only until the next call, so it may adapt one model in place.

* **TSV** (tab-separated, one header line, one row per image per sigma; :data:`COLUMNS`)::

      idx label sigma predict radius correct radius_bonf correct_bonf top count time

  ``idx label predict radius correct time`` are Cohen et al.'s columns (``predict`` is -1 when it
  abstains, ``radius`` is 0.0 then; ``time`` is seconds for that image at that sigma). ``top`` is the
  class picked from the ``n0`` selection samples and ``count`` how many of the ``n`` estimation samples
  fell into it, so every radius can be recomputed at any level. Rows are appended, flushed and
  fsync'd one at a time; a crash can leave at most a trailing partial line, which resume drops.
* **Sidecar** ``<out_tsv>.params.json``: the parameters (``params``) and a provenance block.
  ``resume=True`` refuses a file made with different parameters and skips finished (idx, sigma) rows.
* **Seeds**: image ``idx`` at the ``j``-th sigma uses a generator seeded from ``(seed, idx, j)`` only;
  its ``n0`` selection samples are drawn first, then its ``n`` estimation samples. A resumed, sharded
  or distributed run therefore writes exactly the rows of an uninterrupted one (except ``time``;
  same device and batch size assumed: pass the batch size, model hash etc. in ``params`` so that
  resume checks them too).
* **Shards**: ``shard=(i, N)`` certifies ``indices[i::N]``; :func:`merge_shards` joins the shard files.
  :func:`certify_run_distributed` does this under ``torch.distributed`` (torchrun): rank ``r`` writes
  ``<out_tsv>.rank<r>`` and rank 0 merges them into ``out_tsv``.

Several sigmas: Bonferroni
--------------------------
Each per-sigma certificate holds with probability >= 1 - alpha. The paper's envelope (Appendix D,
Fig. 3) keeps, per image, the best radius over the ``k`` sigmas; that is a choice among ``k``
certificates, and "the best of k" fails with probability up to ``k * alpha``. So every row carries two
radii computed from the **same counts** (no extra sampling; only the Clopper-Pearson level differs):
``radius``/``correct`` at ``alpha`` and ``radius_bonf``/``correct_bonf`` at ``alpha / k``. The summary
reports

* ``per_sigma[s].certified_accuracy`` (level ``alpha``; valid for that sigma on its own, as the paper's
  per-sigma curves) and ``per_sigma[s].certified_accuracy_bonf`` (level ``alpha / k``);
* ``envelope``: per image the best ``radius_bonf`` among sigmas with ``correct_bonf``; by the union
  bound each image's envelope radius holds with probability >= 1 - alpha. This is the valid envelope;
* ``envelope_uncorrected``: the same from ``radius``/``correct`` (the paper's construction), which only
  holds with probability >= 1 - k * alpha per image. Labelled as such; do not report it as (1 - alpha).

With one sigma the two coincide.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.stats import beta as _beta
from scipy.stats import binomtest, norm
from torch import nn

from bnadapt.errors import BnadaptError, check
from bnadapt.results import atomic_write_bytes, atomic_write_text, provenance, write_json

__all__ = [
    "ABSTAIN",
    "COLUMNS",
    "DEFAULT_RADII",
    "RunResult",
    "Smooth",
    "certified_accuracy",
    "certified_radius",
    "certify_run",
    "certify_run_distributed",
    "clopper_pearson_lower",
    "envelope_rows",
    "image_seed",
    "merge_shards",
    "parse_shard",
    "plain_sample_counts",
    "plot_certified_accuracy",
    "read_rows",
    "summarize",
]

ABSTAIN = -1
"""Returned as the class when the smoothed classifier abstains."""

COLUMNS = ("idx", "label", "sigma", "predict", "radius", "correct",
           "radius_bonf", "correct_bonf", "top", "count", "time")
"""Columns of a certification TSV, in order."""

_COLUMN_TYPES = (int, int, float, int, float, int, float, int, int, int, float)

DEFAULT_RADII = tuple(0.25 * i for i in range(12))
"""L2 radii 0, 0.25, ..., 2.75: the paper's Table 6 layout (plus 0)."""

_FORMAT = "bnadapt-certify-v1"


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------

def _check_sigma(sigma: Any) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise BnadaptError(f"sigma must be a positive number (got {sigma!r})") from None
    check(math.isfinite(s) and s > 0.0, f"sigma must be > 0 (got {sigma}); use the noise level, e.g. 0.25, 0.5")
    return s


def _check_count(value: Any, name: str) -> int:
    check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
          f"{name} must be an integer >= 1 (got {value!r}); use a positive number of noise samples")
    return int(value)


def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise BnadaptError(f"alpha must be a number in (0, 1) (got {alpha!r})") from None
    check(0.0 < a < 1.0, f"alpha must lie strictly between 0 and 1 (got {alpha}); e.g. 0.001 for 99.9% confidence")
    return a


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    device, dtype = None, None
    for t in list(model.parameters()) + list(model.buffers()):
        if device is None:
            device = t.device
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
    return device or torch.device("cpu"), dtype or torch.float32


def _batch_dependent_layers(model: nn.Module) -> list[str]:
    """Names of layers whose output would depend on the batch or on hidden randomness per call."""
    bad = []
    for name, m in model.named_modules():
        norm_updates = isinstance(m, nn.modules.batchnorm._NormBase) and (
            isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats)
        if m.training and (norm_updates or isinstance(m, nn.modules.dropout._DropoutNd)):
            bad.append(f"{name or type(m).__name__} (training mode)")
        # Duck-typed per-batch adaptive BN (bnadapt.adapt.AdaptiveBatchNorm before freezing).
        elif getattr(m, "frozen", None) is False and float(getattr(m, "rho", 0.0) or 0.0) != 0.0:
            bad.append(f"{name or type(m).__name__} (per-batch adaptive BN)")
    return bad


# --------------------------------------------------------------------------------------------------
# Confidence bounds
# --------------------------------------------------------------------------------------------------

def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    Guarantee: if ``k ~ Binomial(n, p)`` then ``P(clopper_pearson_lower(k, n, alpha) <= p) >= 1 - alpha``.
    Equals ``beta.ppf(alpha, k, n - k + 1)`` and 0 for ``k = 0`` (Cohen et al. use
    ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]``, the same number).
    """
    if k <= 0:
        return 0.0
    return float(_beta.ppf(alpha, k, n - k + 1))


def certified_radius(count: int, n: int, alpha: float, sigma: float) -> float | None:
    """L2 radius certified by ``count`` of ``n`` samples in the top class at level ``alpha``.

    Returns ``sigma * Phi^-1(p_lower)`` with ``p_lower`` = :func:`clopper_pearson_lower`, or ``None``
    (abstain) when ``p_lower < 1/2``. Guarantee: with probability >= 1 - alpha over the ``n`` samples,
    a returned radius is <= the true radius ``sigma * Phi^-1(p_A)``.
    """
    p_lower = clopper_pearson_lower(count, n, alpha)
    if p_lower < 0.5:
        return None
    return float(sigma * norm.ppf(p_lower))


def image_seed(seed: int, idx: int, sigma_index: int) -> int:
    """The 64-bit generator seed for image ``idx`` at the ``sigma_index``-th sigma of a run seeded ``seed``."""
    words = np.random.SeedSequence([int(seed), int(idx), int(sigma_index)]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


# --------------------------------------------------------------------------------------------------
# The smoothed classifier
# --------------------------------------------------------------------------------------------------

class Smooth:
    """The smoothed classifier ``g`` of a frozen base classifier ``f`` at noise level ``sigma``.

    ``base_classifier`` maps images in [0, 1] NCHW to logits ``(batch, num_classes)``. It is used as
    given: nothing here calls ``.train()``/``.eval()`` or writes to it, and forwards run under
    ``torch.inference_mode()``. Models whose predictions depend on the batch (BN or dropout left in
    training mode, per-batch adaptive BN) are refused, since the certificate assumes one fixed ``f``.
    Noise is added in pixel space without clipping; ``batch_size`` noisy copies go through ``f`` at once.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *, batch_size: int = 1000):
        check(isinstance(base_classifier, nn.Module),
              f"base_classifier must be a torch.nn.Module (got {type(base_classifier).__name__})")
        check(isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool) and num_classes >= 2,
              f"num_classes must be an integer >= 2 (got {num_classes!r})")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = _check_sigma(sigma)
        self.batch_size = _check_count(batch_size, "batch_size")
        self.device, self.dtype = _model_device_dtype(base_classifier)
        # Feed noisy batches in the memory format of the model's convolutions (faster on CPU).
        self.channels_last = any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in base_classifier.parameters())
        self._check_fixed()

    def __repr__(self) -> str:
        return (f"Smooth({type(self.base_classifier).__name__}, num_classes={self.num_classes}, "
                f"sigma={self.sigma}, batch_size={self.batch_size}, device={self.device})")

    # -- helpers -----------------------------------------------------------------------------------

    def _check_fixed(self) -> None:
        bad = _batch_dependent_layers(self.base_classifier)
        check(not bad, f"base classifier is not a fixed function: {', '.join(bad[:3])}"
                       f"{' ...' if len(bad) > 3 else ''}; adapt and freeze it, then call .eval() before smoothing")

    def _prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        check(isinstance(x, torch.Tensor), f"x must be a torch.Tensor (got {type(x).__name__})")
        check(x.is_floating_point(), f"x must be a float image in [0, 1] (got dtype {x.dtype}); convert it, e.g. x.float() / 255")
        check(x.dim() == 3, f"x must be one image of shape (C, H, W) (got shape {tuple(x.shape)}); pass x[i], not a batch")
        if generator is not None:
            check(generator.device.type == self.device.type,
                  f"generator is on {generator.device} but the model is on {self.device}; "
                  f"create it with torch.Generator(device='{self.device.type}')")
        self._check_fixed()
        return x.detach().to(device=self.device, dtype=self.dtype)

    # -- sampling ----------------------------------------------------------------------------------

    def sample_counts(self, x: torch.Tensor, num: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Counts of ``argmax f(x + delta)`` over ``num`` draws of ``delta ~ N(0, sigma^2 I)``.

        Returns an int64 array of length ``num_classes`` summing to ``num``. The draws are i.i.d.
        (``generator``, or the global RNG of the model's device when None), so the count of any class
        ``c`` is ``Binomial(num, P(f(x + delta) = c))``; every guarantee below rests on that.
        Noise is written into one preallocated buffer of ``min(batch_size, num)`` images, ``x`` added
        in place, and the counts accumulate on the device (one host transfer at the end).
        """
        num = _check_count(num, "num")
        x = self._prepare(x, generator)
        b = min(self.batch_size, num)
        with torch.inference_mode():
            counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
            buf = torch.empty((b, *x.shape), dtype=self.dtype, device=self.device)
            if self.channels_last:
                buf = buf.contiguous(memory_format=torch.channels_last)
            remaining = num
            while remaining > 0:
                m = min(b, remaining)
                batch = buf[:m]
                batch.normal_(0.0, self.sigma, generator=generator)
                batch.add_(x)
                logits = self.base_classifier(batch)
                if remaining == num:
                    check(logits.dim() == 2 and logits.shape == (m, self.num_classes),
                          f"base classifier returned shape {tuple(logits.shape)} for {m} images; "
                          f"expected ({m}, {self.num_classes}): check num_classes")
                counts += torch.bincount(logits.argmax(1), minlength=self.num_classes)
                remaining -= m
            return counts.cpu().numpy().astype(np.int64)

    def certify_counts(self, x: torch.Tensor, n0: int, n: int,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
        """The sampling half of :meth:`certify`: ``(c_A, n_A)``.

        ``c_A`` is the most frequent class among ``n0`` selection samples; ``n_A`` counts ``c_A`` among
        ``n`` fresh estimation samples, so given ``c_A``, ``n_A ~ Binomial(n, p_{c_A})``.
        """
        n0 = _check_count(n0, "n0")
        n = _check_count(n, "n")
        counts0 = self.sample_counts(x, n0, generator)
        c_a = int(counts0.argmax())
        counts = self.sample_counts(x, n, generator)
        return c_a, int(counts[c_a])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: ``(prediction, L2 radius)``, or ``(ABSTAIN, 0.0)``.

        Picks ``c_A`` from ``n0`` samples, counts it in ``n`` fresh samples, takes the one-sided
        Clopper-Pearson lower bound ``p_lower`` at level ``alpha`` and returns
        ``(c_A, sigma * Phi^-1(p_lower))`` if ``p_lower >= 1/2``, else abstains.

        Guarantee: with probability >= 1 - alpha over the sampling, if a class is returned then the
        smoothed classifier ``g`` returns that class at every point within the returned L2 radius of
        ``x`` (in particular ``g(x)`` is that class).
        """
        alpha = _check_alpha(alpha)
        c_a, n_a = self.certify_counts(x, n0, n, generator)
        radius = certified_radius(n_a, n, alpha, self.sigma)
        if radius is None:
            return ABSTAIN, 0.0
        return c_a, radius

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: ``g(x)`` or ``ABSTAIN``.

        Takes the two most frequent classes among ``n`` samples (counts ``n_A >= n_B``) and returns the
        first unless the two-sided binomial test of ``n_A`` out of ``n_A + n_B`` against 1/2 has
        p-value > ``alpha``, in which case it abstains (Hung & Fithian, 2019).

        Guarantee: the probability of returning a class other than ``g(x)`` is at most ``alpha``
        (abstaining is not an error).
        """
        alpha = _check_alpha(alpha)
        n = _check_count(n, "n")
        counts = self.sample_counts(x, n, generator)
        top2 = np.argsort(-counts, kind="stable")[:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])


def plain_sample_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, batch_size: int,
                        num_classes: int) -> np.ndarray:
    """Reference: the published sampling loop (Cohen et al., ``Smooth._sample_noise``), for benchmarks.

    ``x.repeat`` per batch, ``randn_like * sigma`` from the global RNG, ``argmax`` and counting on the
    host with numpy. Same distribution as :meth:`Smooth.sample_counts`, slower.
    """
    device, dtype = _model_device_dtype(model)
    x = x.detach().to(device=device, dtype=dtype)
    counts = np.zeros(num_classes, dtype=np.int64)
    with torch.no_grad():
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# TSV files
# --------------------------------------------------------------------------------------------------

_HEADER = "\t".join(COLUMNS) + "\n"


def _format_row(row: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return repr(float(v)) if isinstance(v, float) else str(int(v))
    return "\t".join(fmt(row[c]) for c in COLUMNS) + "\n"


def _parse_line(line: str, path: Any, lineno: int) -> dict[str, Any]:
    fields = line.rstrip("\n").split("\t")
    check(len(fields) == len(COLUMNS),
          f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated fields, got {len(fields)}; the file is corrupt")
    try:
        return {c: t(f) for c, t, f in zip(COLUMNS, _COLUMN_TYPES, fields)}
    except ValueError:
        raise BnadaptError(f"{path}:{lineno}: unparsable row {line.strip()!r}; the file is corrupt") from None


def _read_complete_lines(path: Path) -> tuple[list[str], int]:
    """Complete lines of ``path`` (a trailing line without newline is left out) and their byte length."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(keepends=True), end


def read_rows(tsv_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a certification TSV as dicts (typed per :data:`COLUMNS`); a trailing partial line is ignored."""
    path = Path(tsv_path)
    check(path.is_file(), f"no certification file at {path}; run certify_run first or fix the path")
    lines, _ = _read_complete_lines(path)
    if not lines:
        return []
    check(lines[0] == _HEADER, f"{path} does not start with the certification header; pass a certify_run TSV")
    return [_parse_line(line, path, i + 2) for i, line in enumerate(lines[1:])]


def _params_path(tsv_path: Path) -> Path:
    return Path(str(tsv_path) + ".params.json")


def _indices_sha256(indices: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------

def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"i/N"`` into ``(i, N)`` with ``0 <= i < N`` (shard ``i`` certifies ``indices[i::N]``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    check(m is not None, f"bad shard spec {spec!r}; write it as i/N with 0 <= i < N, e.g. 0/4")
    i, count = int(m.group(1)), int(m.group(2))
    check(count >= 1 and 0 <= i < count, f"bad shard spec {spec!r}: need 0 <= i < N; e.g. 0/{max(count, 2)}")
    return i, count


def _check_shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        return parse_shard(shard)
    check(isinstance(shard, (tuple, list)) and len(shard) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard),
          f"shard must be (i, N) or 'i/N' (got {shard!r})")
    return parse_shard(f"{int(shard[0])}/{int(shard[1])}")


# --------------------------------------------------------------------------------------------------
# Runs over a data set
# --------------------------------------------------------------------------------------------------

def _get_item(dataset: Any, idx: int) -> tuple[torch.Tensor, int]:
    if hasattr(dataset, "get"):  # bnadapt.data ImageDataset: get(indices) -> (NCHW, labels)
        x, y = dataset.get([idx])
        return x[0], int(y[0])
    x, y = dataset[idx]
    return x, int(y)


@dataclass
class RunResult:
    """What :func:`certify_run` did: ``written`` new rows, ``skipped`` rows already in the file."""

    out: Path
    written: int
    skipped: int


def _run_params(dataset: Any, indices: list[int], sigmas: list[float], n0: int, n: int, alpha: float,
                seed: int, shard: tuple[int, int] | None, extra: dict | None) -> dict[str, Any]:
    return _jsonable({
        "format": _FORMAT,
        "sigmas": sigmas,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "alpha_bonf": alpha / len(sigmas),
        "seed": seed,
        "num_indices": len(indices),
        "indices_sha256": _indices_sha256(indices),
        "dataset": getattr(dataset, "name", None),
        "shard": list(shard) if shard is not None else None,
        "extra": extra or {},
    })


def _params_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {b.get(k)!r} in file vs {a.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")


def _validate_run_args(indices: Iterable[int], sigmas: Sequence[float], n0: int, n: int, alpha: float,
                       seed: int) -> tuple[list[int], list[float], int, int, float, int]:
    indices = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
    check(len(indices) >= 1, "indices is empty; give at least one image index")
    check(min(indices) >= 0, "indices must be >= 0")
    check(len(set(indices)) == len(indices), "indices contain duplicates; give each image once")
    check(isinstance(sigmas, (list, tuple, np.ndarray)) and len(sigmas) >= 1,
          f"sigmas must be a non-empty list of noise levels (got {sigmas!r})")
    sigmas = [_check_sigma(s) for s in sigmas]
    check(len(set(sigmas)) == len(sigmas), f"sigmas contain duplicates ({sigmas}); give each once")
    n0 = _check_count(n0, "n0")
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    check(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0,
          f"seed must be an integer >= 0 (got {seed!r})")
    return indices, sigmas, n0, n, alpha, int(seed)


def _open_for_run(out: Path, params: dict, resume: bool) -> set[tuple[int, float]]:
    """Prepare ``out`` (header, sidecar); return the finished (idx, sigma) pairs when resuming."""
    ppath = _params_path(out)
    sidecar = {"params": params, "provenance": provenance()}
    if not out.exists():
        write_json(ppath, sidecar)
        atomic_write_text(out, _HEADER)
        return set()
    check(resume, f"{out} already exists; pass resume=True to continue it, or choose another output path")
    lines, end = _read_complete_lines(out)
    if not lines:  # empty or a partial header only
        write_json(ppath, sidecar)
        atomic_write_text(out, _HEADER)
        return set()
    check(lines[0] == _HEADER, f"{out} is not a certification TSV (unexpected header); choose another output path")
    check(ppath.is_file(), f"{out} has no {ppath.name}, so its parameters cannot be checked; "
                           "restore it or start a new output path")
    try:
        stored = json.loads(ppath.read_text())["params"]
    except (ValueError, KeyError, TypeError):
        raise BnadaptError(f"{ppath} is unreadable; restore it or start a new output path") from None
    check(stored == params, f"cannot resume {out}: it was made with different parameters "
                            f"({_params_diff(params, stored)}); use the same parameters or a new output path")
    if end != out.stat().st_size:  # drop the trailing partial row of a killed run
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows = [_parse_line(line, out, i + 2) for i, line in enumerate(lines[1:])]
    return {(r["idx"], r["sigma"]) for r in rows}


def certify_run(
    smooth_factory: Callable[[float], Smooth],
    dataset: Any,
    indices: Iterable[int],
    out_tsv: str | os.PathLike,
    *,
    sigmas: Sequence[float],
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
    params: dict | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Certify ``dataset`` images ``indices`` (or the shard ``indices[i::N]``) at every sigma into ``out_tsv``.

    ``dataset`` is a bnadapt ``ImageDataset`` (``get``) or anything with ``dataset[idx] -> (x, y)``.
    ``smooth_factory(sigma)`` supplies the :class:`Smooth` at each sigma (called once per sigma with
    work left). Each row holds the result of :meth:`Smooth.certify` at ``alpha`` (``predict``,
    ``radius``, ``correct``) and at ``alpha / len(sigmas)`` (``radius_bonf``, ``correct_bonf``) from the
    same samples (see the module docstring). ``params`` are extra caller parameters (model hash,
    adaptation settings, batch size...) recorded in the sidecar and checked on resume. ``callback`` is
    called with each row after it is safely on disk. Guarantee per row: with probability >= 1 - alpha
    (``radius``) and >= 1 - alpha/k (``radius_bonf``) the smoothed classifier at that sigma is robust
    within the radius at that image.
    """
    indices, sigmas, n0, n, alpha, seed = _validate_run_args(indices, sigmas, n0, n, alpha, seed)
    shard = _check_shard(shard)
    check(params is None or isinstance(params, dict), "params must be a dict of extra run parameters")
    out = Path(out_tsv)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_params = _run_params(dataset, indices, sigmas, n0, n, alpha, seed, shard, params)
    done = _open_for_run(out, run_params, resume)

    todo = indices[shard[0]::shard[1]] if shard is not None else indices
    alpha_bonf = alpha / len(sigmas)
    work = [(j, s, [i for i in todo if (i, s) not in done]) for j, s in enumerate(sigmas)]
    total = sum(len(w) for _, _, w in work)
    written = 0
    from tqdm import tqdm

    with open(out, "a", encoding="utf-8", newline="") as f, \
            tqdm(total=total, disable=not progress, desc="certify", unit="img") as bar:
        for j, sigma, pending in work:
            if not pending:
                continue
            smooth = smooth_factory(sigma)
            check(isinstance(smooth, Smooth), f"smooth_factory({sigma}) returned {type(smooth).__name__}; return a Smooth")
            check(smooth.sigma == sigma, f"smooth_factory({sigma}) returned a Smooth with sigma {smooth.sigma}; "
                                         "build it with the sigma it is given")
            bar.set_postfix(sigma=sigma)
            for idx in pending:
                x, label = _get_item(dataset, idx)
                gen = torch.Generator(device=smooth.device)
                gen.manual_seed(image_seed(seed, idx, j))
                t0 = time.perf_counter()
                top, count = smooth.certify_counts(x, n0, n, gen)
                r = certified_radius(count, n, alpha, sigma)
                r_bonf = certified_radius(count, n, alpha_bonf, sigma)
                elapsed = time.perf_counter() - t0
                predict = top if r is not None else ABSTAIN
                row = {
                    "idx": idx, "label": label, "sigma": sigma,
                    "predict": predict, "radius": r if r is not None else 0.0, "correct": int(predict == label),
                    "radius_bonf": r_bonf if r_bonf is not None else 0.0,
                    "correct_bonf": int(r_bonf is not None and top == label),
                    "top": top, "count": count, "time": elapsed,
                }
                f.write(_format_row(row))
                f.flush()
                os.fsync(f.fileno())
                written += 1
                bar.update(1)
                if callback is not None:
                    callback(row)
    return RunResult(out=out, written=written, skipped=len(todo) * len(sigmas) - written)


def merge_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike, indices: Iterable[int]) -> Path:
    """Merge shard TSVs into ``out``, ordered as a single uninterrupted run writes them: by sigma, then by position in ``indices``.

    Each shard needs its ``.params.json``; all must come from the same run (equal parameters except
    ``shard``, same ``indices``) and together hold every (idx, sigma) row exactly once. ``out`` and its
    sidecar (``shard: null``) are written atomically, so ``out`` equals what a single run would hold
    (up to row order and ``time``) and can be summarized or resumed like one.
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    check(len(paths) >= 1, "no shard files to merge; pass the .rank<r> or shard TSVs")
    check(out.resolve() not in {p.resolve() for p in paths}, f"merge output {out} is also an input; choose another path")
    indices = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
    sha = _indices_sha256(indices)
    base: dict | None = None
    for p in paths:
        pp = _params_path(p)
        check(pp.is_file(), f"shard {p} has no {pp.name}; merge only files written by certify_run")
        try:
            prm = json.loads(pp.read_text())["params"]
        except (ValueError, KeyError, TypeError):
            raise BnadaptError(f"{pp} is unreadable; rerun that shard") from None
        check(prm.get("indices_sha256") == sha,
              f"shard {p} was run on different indices than those given to merge; pass the run's indices")
        prm = dict(prm, shard=None)
        if base is None:
            base = prm
        check(prm == base, f"shard {p} was made with different parameters ({_params_diff(prm, base)}); "
                           "merge shards of one run only")
    assert base is not None
    sigmas = [float(s) for s in base["sigmas"]]
    by_key: dict[tuple[int, float], dict] = {}
    for p in paths:
        for row in read_rows(p):
            key = (row["idx"], row["sigma"])
            check(key not in by_key, f"row idx={key[0]} sigma={key[1]} appears twice across shards; "
                                     "merge each shard once")
            by_key[key] = row
    expected = [(i, s) for s in sigmas for i in indices]  # the order of a single uninterrupted run
    missing = [k for k in expected if k not in by_key]
    check(not missing, f"merge: {len(missing)} of {len(expected)} rows missing (e.g. idx={missing[0][0] if missing else ''} "
                       f"sigma={missing[0][1] if missing else ''}); finish or resume the shard runs first")
    check(len(by_key) == len(expected), "merge: shards hold rows outside indices x sigmas; pass the run's indices")
    write_json(_params_path(out), {"params": base, "provenance": provenance(merged_from=[str(p) for p in paths])})
    atomic_write_text(out, _HEADER + "".join(_format_row(by_key[k]) for k in expected))
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def certify_run_distributed(
    smooth_factory: Callable[[float], Smooth],
    dataset: Any,
    indices: Iterable[int],
    out_tsv: str | os.PathLike,
    *,
    timeout_s: float = 7 * 24 * 3600,
    **kwargs: Any,
) -> RunResult:
    """:func:`certify_run` split across the ranks of an initialized ``torch.distributed`` job.

    Without an initialized process group this is :func:`certify_run`. With one (torchrun; gloo on
    CPU, nccl on GPU, each rank's ``smooth_factory`` putting its model on its own device), rank ``r``
    of ``N`` certifies ``indices[r::N]`` into ``<out_tsv>.rank<r>`` (resumable like any run), all ranks
    wait for each other, and rank 0 merges the shard files into ``out_tsv`` (:func:`merge_shards`);
    every rank returns once the merge is done. The waits go through a gloo group with ``timeout_s``
    (default a week), so a slow shard does not trip the default collective timeout, and a failure on
    any rank is raised on every rank instead of hanging the others. Same keyword arguments as
    :func:`certify_run` except ``shard``.
    """
    import torch.distributed as dist

    check("shard" not in kwargs, "certify_run_distributed shards by rank; do not pass shard")
    if not (dist.is_available() and dist.is_initialized()):
        return certify_run(smooth_factory, dataset, indices, out_tsv, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    indices = list(indices)
    out = Path(out_tsv)
    if rank != 0:
        kwargs["progress"] = False
    result, error, errors = None, None, [None] * world
    try:
        check(kwargs.get("resume", False) or not out.exists(),
              f"{out} already exists; pass resume=True to continue the run, or choose another output path")
        result = certify_run(smooth_factory, dataset, indices, f"{out}.rank{rank}", shard=(rank, world), **kwargs)
    except Exception as e:  # reported to every rank below
        error = e
    dist.all_gather_object(errors, None if error is None else _one_line(error), group=group)
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        dist.destroy_process_group(group)
        if error is not None:
            raise error
        raise BnadaptError(f"rank {failed[0][0]} failed ({failed[0][1]}); fix it and rerun with resume=True")
    merge_error: list = [None]
    if rank == 0:
        try:
            merge_shards([f"{out}.rank{r}" for r in range(world)], out, indices)
        except Exception as e:
            error = e
            merge_error = [_one_line(e)]
    dist.broadcast_object_list(merge_error, src=0, group=group)
    dist.destroy_process_group(group)
    if merge_error[0] is not None:
        if error is not None:
            raise error
        raise BnadaptError(f"rank 0 could not merge the shard files ({merge_error[0]}); fix it and rerun with resume=True")
    assert result is not None
    return result


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------

def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float] = DEFAULT_RADII, *,
                       bonferroni: bool = False) -> np.ndarray:
    """Fraction of ``rows`` with ``correct == 1`` and ``radius >= r``, for each ``r`` in ``radii``.

    ``bonferroni=True`` reads ``correct_bonf``/``radius_bonf`` instead. Pass the rows of one sigma (or
    :func:`envelope_rows`). Each row's certificate holds with probability >= 1 - (its level), so this
    is, in expectation, a lower bound on the smoothed classifier's certified accuracy up to that level.
    """
    ck, rk = ("correct_bonf", "radius_bonf") if bonferroni else ("correct", "radius")
    if not rows:
        return np.zeros(len(radii))
    correct = np.array([r[ck] for r in rows], dtype=bool)
    radius = np.array([r[rk] for r in rows], dtype=float)
    return np.array([float(np.mean(correct & (radius >= t))) for t in radii])


def envelope_rows(rows: Sequence[dict[str, Any]], *, bonferroni: bool) -> list[dict[str, Any]]:
    """One row per image: the best radius among the sigmas where it is certified correct.

    ``bonferroni=True`` uses ``radius_bonf``/``correct_bonf`` (level alpha/k, so each image's best
    radius holds with probability >= 1 - alpha); ``False`` the uncorrected ``radius``/``correct``.
    Returned rows have ``idx``, ``correct``, ``radius`` (and the ``_bonf`` keys equal to them).
    """
    ck, rk = ("correct_bonf", "radius_bonf") if bonferroni else ("correct", "radius")
    best: dict[int, float | None] = {}
    for r in rows:
        cur = best.get(r["idx"])
        if r[ck]:
            best[r["idx"]] = r[rk] if cur is None else max(cur, r[rk])
        else:
            best.setdefault(r["idx"], None)
    out = []
    for idx, rad in best.items():
        c, rr = int(rad is not None), (rad if rad is not None else 0.0)
        out.append({"idx": idx, "correct": c, "radius": rr, "correct_bonf": c, "radius_bonf": rr})
    return out


def summarize(tsv_path: str | os.PathLike, radii: Sequence[float] = DEFAULT_RADII, *,
              out_json: str | os.PathLike | None = None) -> dict[str, Any]:
    """Summary of a certification TSV (and its sidecar) as a JSON-ready dict; also written to ``out_json``.

    Layout::

        {"tsv", "params" (sidecar or null), "radii", "sigmas", "alpha", "alpha_bonf", "num_images",
         "num_rows", "complete", "mean_time_s",
         "per_sigma": {"<sigma>": {"num_images", "certified_accuracy" (level alpha),
                                   "certified_accuracy_bonf" (alpha/k), "abstain_rate", "abstain_rate_bonf",
                                   "mean_time_s"}},
         "envelope": {"level", "certified_accuracy", "note"},            # valid at 1 - alpha per image
         "envelope_uncorrected": {"level", "certified_accuracy", "note"}}  # the paper's; 1 - k*alpha

    Certified accuracies are fractions aligned with ``radii``; envelope denominators are the images
    with at least one row (``complete`` says whether every image has every sigma).
    """
    path = Path(tsv_path)
    rows = read_rows(path)
    ppath = _params_path(path)
    params = json.loads(ppath.read_text())["params"] if ppath.is_file() else None
    radii = [float(r) for r in radii]
    sigmas = [float(s) for s in params["sigmas"]] if params else sorted({r["sigma"] for r in rows})
    k = len(sigmas)
    alpha = float(params["alpha"]) if params else None
    alpha_bonf = alpha / k if alpha is not None else None
    images = sorted({r["idx"] for r in rows})
    per_sigma = {}
    for s in sigmas:
        rs = [r for r in rows if r["sigma"] == s]
        per_sigma[repr(s)] = {
            "num_images": len(rs),
            "certified_accuracy": certified_accuracy(rs, radii).tolist(),
            "certified_accuracy_bonf": certified_accuracy(rs, radii, bonferroni=True).tolist(),
            "abstain_rate": float(np.mean([r["predict"] == ABSTAIN for r in rs])) if rs else None,
            "abstain_rate_bonf": float(np.mean([certified_radius(r["count"], int(params["n"]), alpha_bonf, s) is None
                                                for r in rs])) if rs and params else None,
            "mean_time_s": float(np.mean([r["time"] for r in rs])) if rs else None,
        }
    if params is None:
        expected = len(images) * k
    elif params.get("shard"):
        expected = len(range(int(params["shard"][0]), int(params["num_indices"]), int(params["shard"][1]))) * k
    else:
        expected = int(params["num_indices"]) * k
    summary = {
        "tsv": str(path),
        "params": params,
        "radii": radii,
        "sigmas": sigmas,
        "alpha": alpha,
        "alpha_bonf": alpha_bonf,
        "num_images": len(images),
        "num_rows": len(rows),
        "complete": len(rows) == expected,
        "mean_time_s": float(np.mean([r["time"] for r in rows])) if rows else None,
        "per_sigma": per_sigma,
        "envelope": {
            "level": alpha_bonf,
            "certified_accuracy": certified_accuracy(envelope_rows(rows, bonferroni=True), radii).tolist(),
            "note": f"best radius per image over {k} sigma(s), each certified at alpha/k (Bonferroni): "
                    "every image's radius holds with probability >= 1 - alpha",
        },
        "envelope_uncorrected": {
            "level": alpha,
            "certified_accuracy": certified_accuracy(envelope_rows(rows, bonferroni=False), radii).tolist(),
            "note": f"the paper's envelope: best radius over {k} sigma(s) each certified at alpha; "
                    "per image it only holds with probability >= 1 - k*alpha",
        },
    }
    if out_json is not None:
        write_json(out_json, dict(summary, provenance=provenance()))
    return summary


def plot_certified_accuracy(summary: dict[str, Any], png_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot certified accuracy vs L2 radius (paper Fig. 1/3): per-sigma curves and the envelopes.

    Per-sigma curves are at level alpha; the solid black line is the Bonferroni envelope and the dashed
    grey one the uncorrected (paper) envelope. Written atomically as PNG with the Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    radii = summary["radii"]
    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s, d in summary["per_sigma"].items():
        ax.plot(radii, d["certified_accuracy"], marker="o", ms=3, lw=1.2, label=f"sigma = {float(s):g}")
    if len(summary["per_sigma"]) > 1:
        ax.plot(radii, summary["envelope_uncorrected"]["certified_accuracy"], color="0.5", ls="--", lw=1.5,
                label="envelope (uncorrected)")
        ax.plot(radii, summary["envelope"]["certified_accuracy"], color="k", lw=2.0, label="envelope (Bonferroni)")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(min(radii), max(radii))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)
