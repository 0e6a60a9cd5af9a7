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
"""

from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnadapt.errors import BnadaptError, check, check_batch_size, check_rho, check_sigma
from bnadapt.runs import batch_slices, generator, to_device

INTERPOLATIONS = ("std", "var")


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

    @property
    def frozen(self) -> bool:
        return self.frozen_mean is not None

    def extra_repr(self) -> str:
        mode = "frozen" if self.frozen else "per-batch"
        return f"{self.num_features}, rho={self.rho}, interpolate={self.interpolate}, mode={mode}"

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
        if self.frozen:
            return F.batch_norm(x, self.frozen_mean, self.frozen_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.rho == 0.0:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.weight is not None and self.weight.requires_grad))
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
            if not needs_grad:
                return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
            # Differentiable through the batch statistics: y = x * a + c per channel.
            a = torch.rsqrt(var + self.eps)
            if self.weight is not None:
                a = a * self.weight
            c = -mean * a
            if self.bias is not None:
                c = c + self.bias
            shape = [1, -1] + [1] * (x.dim() - 2)
            return x * a.view(shape) + c.view(shape)
        # No gradient needed: one read pass for the batch statistics (mean and biased variance;
        # torch's fused kernel, ~20x faster than var_mean over N,H,W on channels_last), then one fused
        # normalization with the mixed statistics. Cheaper than rho=1's fused train-mode call.
        count = x.numel() // x.shape[1]
        if count <= 1:
            self._batch_stats(x)  # raises the one-line error
        mean_t, var_t = torch.batch_norm_update_stats(x, None, None, 1.0)
        mean, var = self.mix(mean_t, var_t)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

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


def adapt(model: nn.Module, rho: float = 1.0, *, interpolate: str = "std") -> nn.Module:
    """A per-batch adapted copy of ``model``: each forward uses its batch's statistics mixed at ``rho``.

    Guarantees: ``model`` is not modified (deep copy; parameters are copies too); the copy ignores
    ``.train()``/``.eval()``; ``rho=0`` gives exactly ``model.eval()``'s outputs; gradients flow
    through the batch statistics. A batch with a single value per channel raises an error.
    """
    check_model(model)
    rho = check_rho(rho)
    new = copy.deepcopy(model)

    def swap(m: nn.Module):
        if isinstance(m, AdaptiveBatchNorm):
            m.rho, m.interpolate, m.frozen_mean, m.frozen_var = rho, interpolate, None, None
            return m
        if isinstance(m, _BatchNorm):
            return AdaptiveBatchNorm(m, rho, interpolate)
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
