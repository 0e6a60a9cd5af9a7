"""The adaptive BN layer: per-batch, frozen and (through :class:`~bnadapt.adapt.online.OnlineMixin`)
online modes of one class, and the helpers that find and swap BN layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnadapt.adapt.online import OnlineMixin
from bnadapt.errors import BnadaptError, check, check_rho
from bnadapt.robust_stats import robust_batch_stats

INTERPOLATIONS = ("std", "var")


class AdaptiveBatchNorm(OnlineMixin, nn.Module):
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
        self._scratch: list[torch.Tensor] | None = None
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
        # statistics in fp32 even for bf16/fp16 activations (autocast): low-precision sums are too coarse,
        # and the CPU kernel wants statistics in the dtype of the affine parameters
        xs = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        return mean, var, count

    def mix(self, mean_t: torch.Tensor, var_t: torch.Tensor, rho: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix test statistics with the training ones at ``rho`` (default: the layer's; see the package
        docstring)."""
        rho = self.rho if rho is None else rho
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
            mean_t, var_t = robust_batch_stats(x.float() if x.dtype in (torch.bfloat16, torch.float16) else x,
                                               self.robust)
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
