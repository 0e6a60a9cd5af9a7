"""Adaptive batch normalization (Nandy et al., section 2): the one mechanism every experiment uses.

Every BN layer's statistics are re-estimated from unlabeled test batches and mixed with the training
ones::

    mu = rho * mu_test + (1 - rho) * mu_train
    s  = rho * s_test  + (1 - rho) * s_train        (standard deviations, as in the paper)

``s_train = sqrt(running_var)`` exactly as eval-mode BN normalizes, and ``s_test`` is the square root of
the *biased* batch variance, exactly as train-mode BN normalizes. So ``rho=0`` is standard inference
and ``rho=1`` is train-mode BN without the side effects. ``interpolate="var"`` mixes variances instead
(``s^2 = rho*var_test + (1-rho)*var_train``; the form of Schneider et al. 2020).

Two modes, both working on a deep copy (the user's model is never touched) and both ignoring
``.train()``/``.eval()`` (adaptation is our own explicit state, not BN's train mode):

- :func:`adapt` (per-batch): every forward normalizes with its own batch's statistics mixed with the
  training ones. Differentiable, so attacks can go through the batch statistics.
- :func:`adapt_then_freeze`: estimate test statistics over one or more batches, mix, and return a model
  that then behaves like an ordinary eval-mode model. :func:`to_plain` turns it into a model made of
  the original BN classes (for checkpoints and TorchScript that run without bnadapt).
- :func:`stream_adapt` (online, docs/stream.md): every layer keeps a running estimate of the test
  statistics over a stream of batches (down to one image): an exponential moving average, a sliding
  window of the last W images, or Schneider et al.'s prior (training statistics as N pseudo-images).
  Each batch is first added to the estimate, then classified with it. :meth:`StreamAdapted.snapshot`
  freezes the current estimate into an adapt-then-freeze model.

``robust="median"|"trimmed"`` (per-batch and online; :mod:`bnadapt.robust_stats`) replaces the test
mean and variance by robust, Gaussian-consistent ones (MedBN-style, beyond the paper).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnadapt.errors import (BnadaptError, check, check_batch_size, check_choice, check_count, check_float,
                            check_rho, check_sigma)
from bnadapt.robust_stats import ROBUST, robust_batch_stats, robust_center, robust_mean_var
from bnadapt.runs import batch_slices, generator, to_device

INTERPOLATIONS = ("std", "var")
ESTIMATORS = ("ema", "window", "prior")


class AdaptiveBatchNorm(nn.Module):
    """Drop-in replacement for a BatchNorm1d/2d/3d layer that adapts its statistics.

    State dict keys are those of the BN layer it replaces (``weight``, ``bias``, ``running_mean``,
    ``running_var``: the *training* statistics) plus, once frozen, ``frozen_mean``/``frozen_var``.
    ``self.training`` is ignored on purpose.
    """

    def __init__(self, bn: _BatchNorm, rho: float, interpolate: str = "std"):
        super().__init__()
        self.rho = check_rho(rho)
        check(interpolate in INTERPOLATIONS, f"interpolate must be one of {INTERPOLATIONS} (got {interpolate!r})")
        self.interpolate = interpolate
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.source_class = type(bn)
        self.weight = bn.weight
        self.bias = bn.bias
        if bn.running_mean is None:
            check(self.rho == 1.0,
                  f"a {type(bn).__name__} without running statistics has no training statistics to mix; use rho=1")
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        else:
            self.register_buffer("running_mean", bn.running_mean.detach().clone())
            self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("frozen_mean", None)
        self.register_buffer("frozen_var", None)
        self._expected_dims = _bn_input_dims(bn)
        # Set by collect_statistics: a list that receives (mixed_mean, mixed_var, count) per forward.
        self._recorder: list | None = None
        self.robust: str | None = None  # None, "median" or "trimmed" (per-batch and online modes)
        self.online: str | None = None  # None (per-batch / frozen) or one of ESTIMATORS (configure_stream)
        # Online state (configure_stream): the estimate, mixing constants, host-side counters (no syncs).
        self._st: list[torch.Tensor] | None = None
        self._mix: list[torch.Tensor] | None = None
        self.momentum, self.window, self.prior_n, self.min_images = 1.0, 2, 0.0, 2
        self.seen, self._pos = 0, 0

    @property
    def frozen(self) -> bool:
        return self.frozen_mean is not None

    def extra_repr(self) -> str:
        mode = "frozen" if self.frozen else (f"online-{self.online}" if self.online else "per-batch")
        return (f"{self.num_features}, rho={self.rho}, interpolate={self.interpolate}, mode={mode}"
                + (f", robust={self.robust}" if self.robust else ""))

    def _batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        check(count > 1, f"a batch of {x.shape[0]} image(s) gives {count} value(s) per BN channel; "
                         "adaptation needs at least 2: use a larger batch")
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, count

    def mix(self, mean_t: torch.Tensor, var_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix test statistics with the training ones at ``rho`` (see module docstring)."""
        rho = self.rho
        if rho == 1.0 or self.running_mean is None:
            return mean_t, var_t
        mean = rho * mean_t + (1 - rho) * self.running_mean
        if self.interpolate == "std":
            s = rho * var_t.sqrt() + (1 - rho) * self.running_var.sqrt()
            var = s * s
        else:
            var = rho * var_t + (1 - rho) * self.running_var
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._expected_dims:
            raise BnadaptError(f"{self.source_class.__name__} got a {x.dim()}-D input; expected {self._expected_dims}")
        if self.online is not None:
            return self._online_forward(x)
        if self.frozen:
            return F.batch_norm(x, self.frozen_mean, self.frozen_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.rho == 0.0:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.weight is not None and self.weight.requires_grad))
        if self.robust is not None:
            # Robust batch statistics (median / trimmed mean and their Gaussian-consistent scale).
            if x.numel() // x.shape[1] <= 1:
                self._batch_stats(x)  # raises the one-line error
            mean_t, var_t = robust_batch_stats(x, self.robust)
            mean, var = self.mix(mean_t, var_t)
            self._record(mean_t, var_t, x.numel() // x.shape[1])
            return self._normalize(x, mean, var, needs_grad)
        if self.rho == 1.0 and self._recorder is None:
            # Plain batch statistics: the fused train-mode kernel, differentiable, no side effects.
            if x.numel() // x.shape[1] <= 1:
                self._batch_stats(x)  # raises the one-line error
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if needs_grad or self._recorder is not None:
            # Exact statistics (recorded when estimating for adapt_then_freeze).
            mean_t, var_t, count = self._batch_stats(x)
            mean, var = self.mix(mean_t, var_t)
            self._record(mean_t, var_t, count)
            return self._normalize(x, mean, var, needs_grad)
        # No gradient needed: one read pass for the batch statistics (mean and biased variance;
        # torch's fused kernel, ~20x faster than var_mean over N,H,W on channels_last), then one fused
        # normalization with the mixed statistics. Cheaper than rho=1's fused train-mode call.
        count = x.numel() // x.shape[1]
        if count <= 1:
            self._batch_stats(x)  # raises the one-line error
        mean_t, var_t = torch.batch_norm_update_stats(x, None, None, 1.0)
        mean, var = self.mix(mean_t, var_t)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        """``x`` normalized with ``mean``/``var`` and the affine parameters: the fused eval-mode kernel, or,
        when a gradient is needed, ``y = x * a + c`` per channel (differentiable through the statistics)."""
        if not needs_grad:
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        a = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            a = a * self.weight
        c = -mean * a
        if self.bias is not None:
            c = c + self.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * a.view(shape) + c.view(shape)

    def _record(self, mean_t: torch.Tensor, var_t: torch.Tensor, count: int) -> None:
        if self._recorder is not None:
            self._recorder.append((mean_t.detach().clone(), var_t.detach().clone(), count))

    # ------------------------------------------------------------------------------------- online mode
    # The estimate lives in plain attributes (not buffers: no Module.__getattr__/__setattr__ on the hot
    # path); _apply moves and casts it with the module.
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in ("_st", "_mix"):
            ts = self.__dict__.get(name)
            if ts is not None:
                self.__dict__[name] = [fn(t) for t in ts]
        if self.__dict__.get("online") is not None:
            self._cache_refs()
        return self

    def _cache_refs(self) -> None:
        self._affine = (self.weight, self.bias)
        self._dtype = self._st[0].dtype if self._st is not None else None
        self._prior_mix = {}  # batch size -> training half of the prior's mix

    def configure_stream(self, estimator: str, *, momentum: float = 1.0, window: int = 2, prior_n: float = 0.0,
                         min_images: int = 2) -> None:
        """Switch to the online mode ``estimator`` (arguments validated by :func:`stream_adapt`) with an
        empty estimate. Any frozen statistics are dropped."""
        check(self.running_mean is not None or (estimator != "prior" or prior_n == 0.0),
              "the prior estimator mixes with training statistics, which a BN layer without running statistics "
              "lacks; use prior_n=0 or the ema/window estimator")
        self.online, self.frozen_mean, self.frozen_var = estimator, None, None
        self.momentum, self.window, self.prior_n = float(momentum), int(window), float(prior_n)
        self.min_images = int(min_images)
        ref = self.running_mean if self.running_mean is not None else self.weight
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        c = self.num_features
        with torch.inference_mode(False):  # ordinary tensors, updated in place under any grad mode
            # ema: [mean (C,), biased variance (C,)]; window: [ring (W, 2C) of per-image means | variances]
            self._st = {"ema": lambda: [torch.zeros(c, **kw), torch.ones(c, **kw)],
                        "window": lambda: [torch.zeros(self.window, 2 * c, **kw)],
                        "prior": lambda: None}[estimator]()
            self._mix = None
            if estimator != "prior" and self.rho < 1.0 and self.running_mean is not None:
                # mixed = rho * test + (1 - rho) * train: the constant half once, one fused add per batch.
                train = self.running_var.sqrt() if self.interpolate == "std" else self.running_var
                self._mix = [(1 - self.rho) * self.running_mean.detach(), (1 - self.rho) * train.detach()]
        self._cache_refs()
        self.reset_stream()

    def reset_stream(self) -> None:
        """Empty the running estimate (the state right after :meth:`configure_stream`)."""
        self.seen, self._pos = 0, 0

    def _standard(self, x: torch.Tensor) -> torch.Tensor:
        check(self.running_mean is not None,
              f"a BN layer without running statistics has nothing to normalize with before its estimate holds "
              f"{self.min_images} image(s); start the stream with a batch of at least {self.min_images}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _online_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose (at batch 1 the per-op overhead dominates): no helper calls on the ema path,
        # in-place updates of preallocated state, cached parameter references, no host synchronization.
        b = x.shape[0]
        if torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad)):
            return self._online_grad(x, b)
        est = self.online
        if est == "ema":
            st = self._st
            n = self.seen
            w = 1.0 if n == 0 else max(1.0 - (1.0 - self.momentum) ** b, b / (n + b))
            if self.robust is None and w < 1.0 and x.dtype == self._dtype:
                # the statistics kernel also moves the mean in place: mean <- mean + w (m - mean); then
                # var <- (1 - w) var + w (v + (1 - w) d^2) with d = m - old mean = (m - new mean) / (1 - w)
                m, v = torch.batch_norm_update_stats(x, st[0], None, w)
                e = m - st[0]
                st[1].lerp_(v.addcmul_(e, e, value=1.0 / (1.0 - w)), w)
            else:
                if self.robust is None:
                    m, v = torch.batch_norm_update_stats(x, None, None, 1.0)
                else:
                    m, v = robust_batch_stats(x, self.robust)
                if w == 1.0:
                    torch._foreach_copy_(st, [m, v])
                else:  # robust statistics or another dtype (autocast): the same update in three steps
                    m, v = m.to(self._dtype), v.to(self._dtype)
                    d = m - st[0]
                    torch._foreach_lerp_(st, [m, v.addcmul_(d, d, value=1.0 - w)], w)
            self.seen = n + b
            mean, var = st
        elif est == "window":
            self._window_write(x, b)
            mean, var = self._pooled()
        else:  # Schneider et al. (2020): the training statistics count as prior_n pseudo-images.
            rho = b / (b + self.prior_n)  # prior_n = inf gives 0.0
            if rho == 0.0 or b < self.min_images:
                return self._standard(x)
            mean, var = self._current_stats(x, False)
            if rho < 1.0:
                mix = self._prior_mix.get(b)
                if mix is None:  # the training half of the mix at this batch size, once
                    train = self.running_var.sqrt() if self.interpolate == "std" else self.running_var
                    mix = self._prior_mix[b] = ((1 - rho) * self.running_mean, (1 - rho) * train)
                mean = torch.add(mix[0], mean, alpha=rho)
                if self.interpolate == "std":
                    s = torch.add(mix[1], var.sqrt(), alpha=rho)
                    var = s * s
                else:
                    var = torch.add(mix[1], var, alpha=rho)
            weight, bias = self._affine
            return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, self.eps, True)
        if self.seen < self.min_images:
            return self._standard(x)
        if self._mix is not None:
            mean, var = self._mixed(mean, var)
        weight, bias = self._affine
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, self.eps, True)

    def _mixed(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_mean, c_scale = self._mix
        mean = torch.add(c_mean, mean, alpha=self.rho)
        if self.interpolate == "std":
            s = torch.add(c_scale, var.sqrt(), alpha=self.rho)
            return mean, s * s
        return mean, torch.add(c_scale, var, alpha=self.rho)

    def _current_stats(self, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance (or their robust counterparts) of the batch ``x`` per channel."""
        if self.robust is not None:
            return robust_batch_stats(x, self.robust)
        if grad:
            var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
            return mean, var
        return torch.batch_norm_update_stats(x, None, None, 1.0)

    def _image_stats(self, x: torch.Tensor, b: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (mean, biased variance) per channel, each ``(b, C)``."""
        if x.dim() == 2:
            return x, torch.zeros_like(x)
        if grad:
            var, mean = torch.var_mean(x, dim=list(range(2, x.dim())), correction=0)
            return mean, var
        if b == 1:
            m, v = torch.batch_norm_update_stats(x, None, None, 1.0)
            return m.unsqueeze(0), v.unsqueeze(0)
        # images as channels of one image: the fused statistics kernel, much faster than var_mean(dim=2,3)
        m, v = torch.batch_norm_update_stats(x.reshape(1, b * x.shape[1], *x.shape[2:]), None, None, 1.0)
        return m.view(b, -1), v.view(b, -1)

    def _window_write(self, x: torch.Tensor, b: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the batch's per-image statistics into the ring of the last ``window`` images (a batch
        longer than the window leaves its last ``window`` images); returns what was written."""
        m_i, v_i = self._image_stats(x, b, grad)
        ring = self._st[0]
        if m_i.dtype != ring.dtype:
            m_i, v_i = m_i.to(ring.dtype), v_i.to(ring.dtype)
        W = self.window
        if b > W:
            m_i, v_i = m_i[b - W:], v_i[b - W:]
        rows = torch.cat([m_i.detach(), v_i.detach()], 1)
        k = rows.shape[0]
        p = 0 if k == W else self._pos
        e = p + k
        if e <= W:
            ring[p:e] = rows
        else:
            ring[p:], ring[:e - W] = rows[:W - p], rows[W - p:]
        self._pos = e % W
        self.seen += b
        return m_i, v_i

    def _pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window estimate over its filled part: the exact mean and biased variance of all values of
        those images (mean of the image means; mean of the image variances plus the variance of the image
        means), or the robust counterparts across images."""
        n, c = min(self.seen, self.window), self.num_features
        ring = self._st[0] if self.seen >= self.window else self._st[0][:n]
        if self.robust is None:
            # the ring is (images, [means | variances]): one fused statistics pass over it
            mu, var = torch.batch_norm_update_stats(ring, None, None, 1.0)
            return mu[:c], mu[c:] + var[:c]
        mean, between = robust_mean_var(ring[:, :c], self.robust, dim=0)
        return mean, robust_center(ring[:, c:], self.robust, dim=0) + between

    def _online_grad(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """The online forward with gradients through the current batch's statistics (earlier batches are
        constants). Same values as the no-grad path; the state is updated with detached copies."""
        est = self.online
        if est == "prior":
            rho = b / (b + self.prior_n)
            if rho == 0.0 or b < self.min_images:
                return self._standard(x)
            mean, var = self._current_stats(x, True)
            return self._normalize(x, *_mix_at(rho, self.interpolate, mean, var, self.running_mean,
                                                self.running_var), True)
        if est == "ema":
            m, v = self._current_stats(x, True)
            st = self._st
            m, v = m.to(st[0].dtype), v.to(st[0].dtype)
            n = self.seen
            w = 1.0 if n == 0 else max(1.0 - (1.0 - self.momentum) ** b, b / (n + b))
            if w < 1.0:
                d = m - st[0]
                m, v = torch.lerp(st[0], m, w), torch.lerp(st[1], torch.addcmul(v, d, d, value=1.0 - w), w)
            with torch.no_grad():
                torch._foreach_copy_(st, [m.detach(), v.detach()])
            self.seen = n + b
            mean, var = m, v
        else:
            check(self.robust is None, "the window estimator with robust statistics is not differentiable; run it "
                                       "under torch.no_grad(), or use the ema or prior estimator")
            m_i, v_i = self._window_write(x, b, True)
            with torch.no_grad():
                mean, var = self._pooled()
            # Same values; the gradient flows through the current batch's images (the others are constants).
            n = min(self.seen, self.window)
            md, vd = m_i.detach(), v_i.detach()
            mean_g = mean + (m_i.sum(0) - md.sum(0)) / n
            var = var + ((v_i + m_i * m_i).sum(0) - (vd + md * md).sum(0)) / n - (mean_g * mean_g - mean * mean)
            mean = mean_g
        if self.seen < self.min_images:
            return self._standard(x)
        if self._mix is not None:
            mean, var = self._mixed(mean, var)
        return self._normalize(x, mean, var, True)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running test estimate (mean, biased variance) before mixing; ema and window only."""
        check(self.online in ("ema", "window"), "only the ema and window estimators keep a running estimate "
                                                "(the prior estimator uses each batch alone)")
        check(self.seen >= self.min_images, f"the running estimate holds {self.seen} image(s); feed at least "
                                            f"{self.min_images} before reading or freezing it")
        with torch.no_grad():
            if self.online == "ema":
                return self._st[0].clone(), self._st[1].clone()
            return self._pooled()

    def freeze_estimate(self) -> None:
        """Freeze the running estimate mixed at ``rho`` (this layer then acts as an adapt-then-freeze one);
        a layer whose estimate is not ready (fewer than ``min_images`` images, e.g. never reached) freezes
        the training statistics, exactly what it normalizes with in the stream."""
        if self.online in ("ema", "window") and self.seen < self.min_images and self.running_mean is not None:
            self.frozen_mean, self.frozen_var = self.running_mean.clone(), self.running_var.clone()
            self.online, self._st, self._mix = None, None, None
            return
        mean, var = self.mix(*self.estimate())
        self.frozen_mean, self.frozen_var = mean.detach().clone(), var.detach().clone()
        self.online, self._st, self._mix = None, None, None


def _mix_at(rho: float, interpolate: str, mean_t: torch.Tensor, var_t: torch.Tensor, mean_train, var_train):
    """``AdaptiveBatchNorm.mix`` at an explicit ``rho`` (the prior estimator's ``b / (b + N)``)."""
    if rho == 1.0 or mean_train is None:
        return mean_t, var_t
    mean = rho * mean_t + (1 - rho) * mean_train
    if interpolate == "std":
        s = rho * var_t.sqrt() + (1 - rho) * var_train.sqrt()
        return mean, s * s
    return mean, rho * var_t + (1 - rho) * var_train


def _bn_input_dims(bn: _BatchNorm) -> tuple[int, ...]:
    if isinstance(bn, nn.BatchNorm1d):
        return (2, 3)
    if isinstance(bn, nn.BatchNorm3d):
        return (5,)
    if isinstance(bn, nn.BatchNorm2d):
        return (4,)
    return (2, 3, 4, 5)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All BatchNorm (or already adaptive) layers of ``model``, by qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, AdaptiveBatchNorm))]


def check_model(model: nn.Module) -> None:
    """Error unless ``model`` is an adaptable ``nn.Module`` with at least one BN layer."""
    check(isinstance(model, nn.Module), f"expected a torch nn.Module, got {type(model).__name__}")
    check(not isinstance(model, torch.jit.ScriptModule),
          "a TorchScript model cannot be adapted (its layers cannot be swapped); load it as a checkpoint or state dict with --arch")
    check(len(bn_layers(model)) > 0,
          "the model has no BatchNorm layer, so adaptive BN cannot change it; use a model with BatchNorm1d/2d/3d")


def _replace(model: nn.Module, fn) -> None:
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace(child, fn)


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
