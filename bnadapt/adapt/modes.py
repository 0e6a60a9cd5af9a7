"""The adaptation modes: per-batch (:func:`adapt`), adapt-then-freeze (:func:`adapt_then_freeze`,
noisy and seeded: :func:`adapt_then_freeze_on`), online (:func:`stream_adapt`), and :func:`to_plain`."""

from __future__ import annotations

import copy
import math
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnadapt.adapt.layer import AdaptiveBatchNorm, _replace, bn_layers, check_model
from bnadapt.adapt.online import ESTIMATORS
from bnadapt.errors import check, check_batch_size, check_choice, check_count, check_float, check_rho, check_sigma
from bnadapt.robust_stats import ROBUST
from bnadapt.runs import batch_slices, generator, to_device

def adapt(model: nn.Module, rho: float = 1.0, *, interpolate: str = "std", robust: str | None = None) -> nn.Module:
    """A per-batch adapted copy of ``model``: each forward uses its batch's statistics mixed at ``rho``.

    Guarantees: ``model`` is not modified (deep copy; parameters are copies too); the copy ignores
    ``.train()``/``.eval()``; ``rho=0`` gives exactly ``model.eval()``'s outputs; gradients flow
    through the batch statistics. A batch with a single value per channel raises an error.
    ``robust="median"|"trimmed"`` estimates the batch's mean and variance robustly
    (:mod:`bnadapt.robust_stats`); ``None`` (default) is the paper's mechanism, unchanged.
    """
    check_model(model)
    rho = check_rho(rho)
    if robust is not None:
        check_choice(robust, ROBUST, "robust statistic")
    new = copy.deepcopy(model)

    def swap(m: nn.Module):
        if isinstance(m, AdaptiveBatchNorm):
            m.rho, m.interpolate, m.frozen_mean, m.frozen_var = rho, interpolate, None, None
            m.robust, m.online, m._st, m._mix = robust, None, None, None
            return m
        if isinstance(m, _BatchNorm):
            new_m = AdaptiveBatchNorm(m, rho, interpolate)
            new_m.robust = robust
            return new_m
        return None

    _replace(new, swap)
    return new.eval()


@torch.no_grad()
def adapt_then_freeze(
    model: nn.Module,
    batches: Iterable[torch.Tensor] | torch.Tensor,
    rho: float = 1.0,
    *,
    interpolate: str = "std",
) -> nn.Module:
    """Estimate test statistics on ``batches``, mix them at ``rho`` and freeze them.

    ``batches`` is a tensor (one batch) or an iterable of input batches (or ``(x, y)`` pairs; labels
    are ignored). Each batch goes through the per-batch adapted model; every BN layer pools the test
    statistics it saw over all batches (count-weighted mean, and pooled biased variance by the law of
    total variance), then mixes them with the training statistics. With one batch the frozen model
    equals :func:`adapt` on that batch exactly. The returned copy behaves like an eval-mode model
    whatever ``.train()``/``.eval()`` says; ``model`` is not modified.
    """
    per_batch = adapt(model, rho, interpolate=interpolate)
    layers = [m for _, m in bn_layers(per_batch)]
    for m in layers:
        m._recorder = []
    seen = 0
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    try:
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            per_batch(x)
            seen += int(x.shape[0])
    finally:
        records = [m._recorder for m in layers]
        for m in layers:
            m._recorder = None
    check(seen > 0, "no batches to adapt on; give at least one batch of images")
    for m, rec in zip(layers, records):
        if m.rho == 0.0 or not rec:
            # rho=0 (or a layer no batch reached): the training statistics, exactly.
            check(m.running_mean is not None, "a BN layer without running statistics saw no input; check the model")
            m.frozen_mean, m.frozen_var = m.running_mean.clone(), m.running_var.clone()
            continue
        if len(rec) == 1:
            mean_t, var_t = rec[0][0], rec[0][1]
        else:  # count-weighted mean; pooled biased variance by the law of total variance
            counts = torch.tensor([c for _, _, c in rec], dtype=torch.float64)
            w = (counts / counts.sum()).to(rec[0][0].dtype)[:, None]
            means = torch.stack([r[0] for r in rec])
            vars_ = torch.stack([r[1] for r in rec])
            mean_t = (w * means).sum(0)
            var_t = (w * (vars_ + means * means)).sum(0) - mean_t * mean_t
        mean, var = m.mix(mean_t, var_t.clamp_min(0))
        m.frozen_mean, m.frozen_var = mean.clone(), var.clone()
    return per_batch


class StreamAdapted(nn.Module):
    """A model adapted online over a stream of batches (made by :func:`stream_adapt`; docs/stream.md).

    Call it on each incoming batch (down to one image), in stream order: every BN layer first adds the
    batch to its running estimate of the test statistics, then normalizes the batch with that estimate
    mixed with the training statistics. Outputs therefore depend on the batches seen before.
    :meth:`reset` empties the estimate; with ``reset_every=k`` it happens before the first batch that
    starts at or after ``k`` images since the last reset. ``.train()``/``.eval()`` change nothing.
    :meth:`snapshot` freezes the current estimate into an ordinary adapt-then-freeze model.
    """

    def __init__(self, net: nn.Module, settings: dict, reset_every: int | None = None):
        super().__init__()
        self.net = net
        self.settings = dict(settings)
        self.reset_every = reset_every
        self.images_since_reset = 0
        self._layers = [m for _, m in bn_layers(net) if isinstance(m, AdaptiveBatchNorm)]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items()) + f", reset_every={self.reset_every}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reset_every is not None and self.images_since_reset >= self.reset_every:
            self.reset()
        self.images_since_reset += int(x.shape[0])
        return self.net(x)

    def reset(self) -> None:
        """Empty every layer's running estimate: the next batch is classified as the stream's first."""
        for m in self._layers:
            m.reset_stream()
        self.images_since_reset = 0

    def snapshot(self) -> nn.Module:
        """A frozen copy of the current estimate mixed at rho: an adapt-then-freeze model (eval-mode
        behaviour, :func:`to_plain` turns it into plain PyTorch). ema and window only; the stream must have
        shown at least ``min_images`` images (a layer whose estimate is not ready freezes the training
        statistics, which it uses in the stream). This model keeps streaming unchanged."""
        layers = [m for _, m in bn_layers(self.net) if isinstance(m, AdaptiveBatchNorm)]
        check(all(m.online in ("ema", "window") for m in layers),
              "only the ema and window estimators keep a running estimate to freeze (the prior estimator uses each "
              "batch alone)")
        need = max(m.min_images for m in layers)
        check(any(m.seen >= m.min_images for m in layers),
              f"the running estimate holds {max(m.seen for m in layers)} image(s); feed at least {need} before a snapshot")
        frozen = copy.deepcopy(self.net)
        for _, m in bn_layers(frozen):
            if isinstance(m, AdaptiveBatchNorm):
                m.freeze_estimate()
        return frozen.eval()


def stream_adapt(
    model: nn.Module,
    rho: float | None = None,
    *,
    estimator: str = "ema",
    momentum: float = 0.01,
    window: int = 256,
    prior_n: float = 16.0,
    reset_every: int | None = None,
    robust: str | None = None,
    min_images: int = 2,
    interpolate: str = "std",
) -> StreamAdapted:
    """An online adapted copy of ``model`` (:class:`StreamAdapted`; docs/stream.md has the formulas).

    ``estimator``: ``"ema"`` (per-image ``momentum`` in (0, 1]; 1 gives per-batch adaptation exactly),
    ``"window"`` (exact pooled statistics of the last ``window`` >= 2 images; a window as long as the
    stream ends with the statistics adapt-then-freeze would pool), or ``"prior"`` (Schneider et al.
    2020: each batch of ``b`` alone, mixed at ``rho = b / (b + prior_n)``; ``prior_n`` >= 0, 0 gives
    rho 1 and ``math.inf`` standard inference). ``rho`` (ema/window; default 1) mixes the estimate with
    the training statistics as in :func:`adapt`; the prior estimator sets it itself. Until a layer's
    estimate (for prior: the batch) holds ``min_images`` images it uses the training statistics. Each
    batch enters the estimate before it is classified. ``robust``: see :func:`adapt` (ema/prior: robust
    over the batch's values; window: robust across the window's images). ``model`` is not modified.
    """
    check_choice(estimator, ESTIMATORS, "estimator")
    if estimator == "prior":
        check(rho is None, "the prior estimator sets rho = b / (b + prior_n) for each batch of b images; "
                           "drop rho, or use the ema or window estimator")
    rho = 1.0 if rho is None else check_rho(rho)
    momentum = check_float(momentum, "momentum", min=0.0, max=1.0, min_open=True,
                           hint="the weight of one image in the moving average; 1 = per-batch adaptation")
    window = check_count(window, "window", min=2, hint="the window must hold at least 2 images to estimate a variance")
    if not (isinstance(prior_n, (int, float)) and not isinstance(prior_n, bool) and prior_n == math.inf):
        prior_n = check_float(prior_n, "prior_n", min=0.0,
                              hint="the number of pseudo-images the training statistics count as (math.inf = no adaptation)")
    if reset_every is not None:
        reset_every = check_count(reset_every, "reset_every", hint="reset the estimate every k images, or None")
    min_images = check_count(min_images, "min_images")
    net = adapt(model, rho, interpolate=interpolate, robust=robust)
    for _, m in bn_layers(net):
        m.configure_stream(estimator, momentum=momentum, window=window, prior_n=float(prior_n), min_images=min_images)
    settings = {"estimator": estimator, "rho": None if estimator == "prior" else rho, "momentum": momentum,
                "window": window, "prior_n": float(prior_n), "robust": robust, "min_images": min_images,
                "interpolate": interpolate}
    return StreamAdapted(net, settings, reset_every).eval()


def noisy_batches(dataset, indices, *, sigma: float, batch_size: int, gen: torch.Generator,
                  device: torch.device | str = "cpu"):
    """Batches of ``dataset`` images ``indices`` (in that order, :func:`~bnadapt.runs.batch_slices`) on
    ``device``, each image plus fresh ``N(0, sigma^2 I)`` pixel noise from ``gen`` (none when sigma is 0).
    The noise is drawn on ``gen``'s device."""
    indices = np.asarray(indices, dtype=np.int64)
    for sl in batch_slices(len(indices), batch_size):
        x, _ = dataset.get(indices[sl])
        x = to_device(x, torch.device(device))
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        yield x


def adapt_then_freeze_on(
    model: nn.Module,
    dataset,
    indices,
    *,
    rho: float = 1.0,
    sigma: float = 0.0,
    batch_size: int = 512,
    seed: int = 0,
    keys: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
    interpolate: str = "std",
) -> nn.Module:
    """:func:`adapt_then_freeze` on ``dataset`` images ``indices`` with ``N(0, sigma^2 I)`` noise (the
    paper's adaptation for certification: the noise of the smoothing distribution).

    The noise comes from the generator :func:`~bnadapt.runs.generator` ``(seed, *keys)`` on ``device``,
    drawn batch by batch in index order, so equal arguments give an identical model (``bnadapt adapt``
    and ``bnadapt certify --adapt`` share this function). ``model`` is not modified; the frozen copy
    lives on ``device``."""
    rho = check_rho(rho)
    sigma = check_sigma(sigma)
    batch_size = check_batch_size(batch_size, "adaptation batch size", adapting=True)
    device = torch.device(device)
    gen = generator(seed, *keys, device=device)
    src = model if next(model.parameters()).device == device else copy.deepcopy(model).to(device)
    return adapt_then_freeze(src, noisy_batches(dataset, indices, sigma=sigma, batch_size=batch_size, gen=gen,
                                                device=device), rho, interpolate=interpolate)


def to_plain(adapted: nn.Module) -> nn.Module:
    """A copy of a frozen adapted model made of the original BN classes (eval mode).

    Each BN layer's ``running_mean``/``running_var`` hold the frozen mixed statistics, so the state
    dict has the original keys and plain PyTorch runs it without bnadapt. Per-batch layers are an
    error (freeze first).
    """
    new = copy.deepcopy(adapted)

    def swap(m: nn.Module):
        if not isinstance(m, AdaptiveBatchNorm):
            return None
        check(m.frozen, "to_plain needs a frozen model; call adapt_then_freeze first")
        bn = m.source_class(m.num_features, eps=m.eps, affine=m.weight is not None)
        if m.weight is not None:
            bn.weight, bn.bias = m.weight, m.bias
        bn.running_mean.copy_(m.frozen_mean)
        bn.running_var.copy_(m.frozen_var)
        return bn.eval()

    _replace(new, swap)
    return new.eval()


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` contains adaptive BN layers."""
    return any(isinstance(m, AdaptiveBatchNorm) for m in model.modules())
