"""Randomized smoothing (Cohen et al., 2019): the smoothed classifier of a fixed base classifier.

The smoothed classifier of a base classifier ``f`` (images in [0, 1] NCHW -> logits) is::

    g(x) = argmax_c  P( f(x + delta) = c ),    delta ~ N(0, sigma^2 I)   (pixel space, no clipping)

and if ``p_A >= P(f(x + delta) = c_A)`` with ``p_A > 1/2`` then ``g`` returns ``c_A`` everywhere within
the L2 ball of radius ``sigma * Phi^-1(p_A)`` around ``x``. :class:`Smooth` estimates this with Monte
Carlo sampling exactly as Cohen et al.'s ``CERTIFY`` and ``PREDICT``; each method's docstring states
its guarantee. In Nandy et al. (section 3, Appendix D) ``f`` is an adversarially trained model whose
BN statistics were re-estimated on noisy batches at the same ``sigma`` and then frozen; this module
only *consumes* such a model: it never calls ``.train()``/``.eval()``, never writes to it, and refuses
models whose output would depend on the batch (BN or dropout in training mode, per-batch adaptive BN),
because the certificate needs one fixed function ``f`` and i.i.d. samples. ``precision`` runs ``f`` in
bf16/fp16: the certificate then holds for that lower-precision ``f`` (still one fixed function).

Runs over data sets (TSV files, resume, shards, torchrun, summaries) live in :mod:`bnadapt.certify`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import beta as _beta
from scipy.stats import binomtest, norm
from torch import nn

from bnadapt.errors import check, check_alpha, check_count, check_sigma
from bnadapt.runs import autocast, image_seed, model_device, model_dtype

__all__ = [
    "ABSTAIN", "Smooth", "certified_radius", "clopper_pearson_lower", "image_seed", "plain_sample_counts",
]

ABSTAIN = -1
"""Returned as the class when the smoothed classifier abstains."""


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

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *, batch_size: int = 1000,
                 precision: str = "fp32"):
        check(isinstance(base_classifier, nn.Module),
              f"base_classifier must be a torch.nn.Module (got {type(base_classifier).__name__})")
        check(isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool) and num_classes >= 2,
              f"num_classes must be an integer >= 2 (got {num_classes!r})")
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = check_sigma(sigma, positive=True)
        self.batch_size = check_count(batch_size, "batch_size")
        self.device, self.dtype = model_device(base_classifier), model_dtype(base_classifier)
        check(precision in ("fp32", "bf16", "fp16"), f"precision must be fp32, bf16 or fp16 (got {precision!r})")
        self.precision = precision
        # Feed noisy batches in the memory format of the model's convolutions (faster on CPU).
        self.channels_last = any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in base_classifier.parameters())
        self._check_fixed()

    def __repr__(self) -> str:
        return (f"Smooth({type(self.base_classifier).__name__}, num_classes={self.num_classes}, "
                f"sigma={self.sigma}, batch_size={self.batch_size}, device={self.device}, precision={self.precision})")

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
        num = check_count(num, "num")
        x = self._prepare(x, generator)
        b = min(self.batch_size, num)
        with torch.inference_mode(), autocast(self.device, self.precision):
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
        n0 = check_count(n0, "n0")
        n = check_count(n, "n")
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
        alpha = check_alpha(alpha)
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
        alpha = check_alpha(alpha)
        n = check_count(n, "n")
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
    device, dtype = model_device(model), model_dtype(model)
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


