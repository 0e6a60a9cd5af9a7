"""The online mode of :class:`~bnadapt.adapt.layer.AdaptiveBatchNorm` (a mixin of that one class):
a running estimate of the test statistics over a stream of batches (docs/stream.md).

Estimators: ``ema`` (per-image momentum), ``window`` (exact pooled statistics of the last W images),
``prior`` (Schneider et al. 2020: training statistics as N pseudo-images). Each batch is first added
to the estimate, then normalized with it (mixed with the training statistics at rho).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnadapt.errors import check
from bnadapt.robust_stats import robust_batch_stats, robust_center, robust_mean_var

ESTIMATORS = ("ema", "window", "prior")


class OnlineMixin:
    """Online-mode methods of AdaptiveBatchNorm (state set up by :meth:`configure_stream`)."""

    # ------------------------------------------------------------------------------------- online mode
    # The estimate lives in plain attributes (not buffers: no Module.__getattr__/__setattr__ on the hot
    # path); _apply moves and casts it with the module.
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in ("_st", "_mix", "_scratch"):
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
            # ema: a scratch running variance for the fused statistics kernel, which moves the mean in
            # place; CUDA's kernel takes a running mean only together with a running variance.
            self._scratch = [torch.zeros(c, **kw)] if estimator == "ema" else None
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
                m, v = torch.batch_norm_update_stats(x, st[0], self._scratch[0], w)
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
            return self._normalize(x, *self.mix(mean, var, rho), True)
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
            self.online, self._st, self._mix, self._scratch = None, None, None, None
            return
        mean, var = self.mix(*self.estimate())
        self.frozen_mean, self.frozen_var = mean.detach().clone(), var.detach().clone()
        self.online, self._st, self._mix, self._scratch = None, None, None, None

    # ------------------------------------------------------------------------------------- state
    def stream_state(self) -> tuple:
        """A copy of this layer's running estimate (what :meth:`load_stream_state` restores): the
        state after the batches seen so far, so that candidate batches can be tried and undone."""
        st = self.__dict__.get("_st")
        with torch.no_grad():
            return (None if st is None else [t.detach().clone() for t in st]), self.seen, self._pos

    def load_stream_state(self, state: tuple) -> None:
        """Restore a :meth:`stream_state` copy (fresh tensors: graphs built on the old ones stay valid)."""
        st, self.seen, self._pos = state
        if st is not None:
            with torch.inference_mode(False), torch.no_grad():
                self._st = [t.clone() for t in st]


def online_state(model) -> dict:
    """The running estimate of every online BN layer of ``model`` (e.g. a ``stream_adapt`` model) and its
    reset counter: restoring it with :func:`load_online_state` makes the next batch behave exactly as it
    would have right now."""
    layers = [m for m in model.modules() if isinstance(m, OnlineMixin) and getattr(m, "online", None) is not None]
    return {"layers": [(m, m.stream_state()) for m in layers],
            "images_since_reset": getattr(model, "images_since_reset", None)}


def load_online_state(model, state: dict) -> None:
    """Restore what :func:`online_state` captured of ``model``."""
    for m, s in state["layers"]:
        m.load_stream_state(s)
    if state["images_since_reset"] is not None:
        model.images_since_reset = state["images_since_reset"]
