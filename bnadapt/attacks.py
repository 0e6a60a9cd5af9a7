"""Threat models and PGD attacks (Madry et al. 2018), in the style of foolbox's PGD attacks.

An attack is a small object configured once (keyword-only, typed arguments with defaults) and then
called as ``attack(model, x, y, generator=None) -> x_adv``. Aliases: :data:`LinfPGD`, :data:`L2PGD`.

Guarantees of every attack here (and tested):

- **Threat model, exactly.** ``x_adv`` lies in the threat model and the pixel box: ``0 <= x_adv <= 1``
  and ``||x_adv - x||_p <= eps`` per image, computed in float32 *or* float64 (Linf: exactly; L2: with
  a relative margin of 1e-5 below ``eps``, so any summation order passes). The projection keeps a tiny
  safety margin and a final check shrinks any image that rounding pushed outside; an image that still
  failed would be returned unperturbed (never observed).
- **No side effects on the model.** Parameters, buffers (BN running statistics and counters), the
  ``training`` flag of every module and ``requires_grad`` of every parameter are as before the call.
  The forward runs on the model *as given*: the caller decides eval or train mode (a train-mode BN
  model is attacked through its batch statistics, and its running statistics are restored
  afterwards). Parameter gradients are neither computed nor accumulated (``.grad`` is untouched):
  gradients are taken with :func:`torch.autograd.grad` with respect to the input only.
- **Reproducible.** The random start draws from ``generator`` (a :class:`torch.Generator` on the
  input's device) when given, else from torch's global RNG.

The attacks maximize the cross-entropy of the true labels (untargeted). Linf PGD takes signed-gradient
steps and clips to the eps cube; L2 PGD takes normalized-gradient steps and projects onto the eps
ball; both clip to [0, 1] after every step. The random start is uniform in the Linf cube, or uniform in
the L2 ball (Gaussian direction, radius ``eps * u^(1/d)``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from enum import Enum
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnadapt.errors import BnadaptError, check


class ThreatModel(str, Enum):
    """Perturbation sets, named as on the command line."""

    LINF = "linf"
    L2 = "l2"


THREAT_MODELS = tuple(t.value for t in ThreatModel)

# Relative margin kept below eps for L2 (float32 norms of ~1e5 entries differ by < 1e-6 relative).
_L2_MARGIN = 1e-5


def threat_model(name: str | ThreatModel) -> ThreatModel:
    """Parse ``linf`` / ``l2`` (case-insensitive; ``inf``/``Linf`` accepted) into :class:`ThreatModel`."""
    if isinstance(name, ThreatModel):
        return name
    key = str(name).strip().lower().replace("ℓ", "l")
    key = {"inf": "linf", "l_inf": "linf", "l-inf": "linf", "l_2": "l2", "2": "l2"}.get(key, key)
    try:
        return ThreatModel(key)
    except ValueError:
        raise BnadaptError(f"unknown threat model {name!r}; choose one of {', '.join(THREAT_MODELS)}") from None


def _float32_at_most(v: float) -> float:
    """The largest float32 value <= ``v`` (as a Python float), so comparisons hold in both precisions."""
    f = float(np.float32(v))
    if f > v:
        f = float(np.nextafter(np.float32(v), np.float32(-np.inf)))
    return f


def _flat_norm(d: torch.Tensor, p: ThreatModel) -> torch.Tensor:
    flat = d.reshape(d.shape[0], -1)
    if p is ThreatModel.LINF:
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(d.shape[0])
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with the model's buffers, ``training`` flags and ``requires_grad`` restored on exit.

    Inside the block parameters do not require gradients (so attacks skip weight gradients). Buffers
    (BN running statistics, ``num_batches_tracked``) are copied back in place, so a forward in train
    mode leaves no trace. Parameters themselves are not snapshotted: nothing here writes them.
    """
    flags = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, r in zip(params, req):
            p.requires_grad_(r)
        for m, t in flags:
            m.training = t


class PGD:
    """Projected gradient descent on the cross-entropy within an ``eps`` ball (base class).

    Use :class:`LinfProjectedGradientDescentAttack` / :class:`L2ProjectedGradientDescentAttack`
    (aliases :data:`LinfPGD`, :data:`L2PGD`). ``step_size`` defaults to ``2.5 * eps / steps`` (Madry
    et al.'s rule: enough to cross the ball and come back).
    """

    threat: ThreatModel = ThreatModel.LINF

    def __init__(
        self,
        eps: float,
        *,
        steps: int = 20,
        step_size: float | None = None,
        random_start: bool = True,
    ):
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise BnadaptError(f"eps must be a number > 0 (got {eps!r})") from None
        check(math.isfinite(eps) and eps > 0, f"eps must be > 0 (got {eps}); it is the attack radius in pixel units")
        check(isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 1,
              f"attack steps must be an integer >= 1 (got {steps!r})")
        if step_size is None:
            step_size = 2.5 * eps / int(steps)
        step_size = float(step_size)
        check(math.isfinite(step_size) and step_size > 0, f"attack step size must be > 0 (got {step_size})")
        self.eps = eps
        self.steps = int(steps)
        self.step_size = step_size
        self.random_start = bool(random_start)

    # -- description -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:g}, steps={self.steps}, step_size={self.step_size:g}, "
                f"random_start={self.random_start})")

    def describe(self) -> dict:
        """The attack's settings as a JSON-able dict (for result files)."""
        return {"attack": "pgd", "threat_model": self.threat.value, "eps": self.eps, "steps": self.steps,
                "step_size": self.step_size, "random_start": self.random_start, "loss": "cross-entropy",
                "box": [0.0, 1.0]}

    # -- geometry ----------------------------------------------------------------------------
    def _random_delta(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        kw = dict(generator=generator, device=x.device, dtype=x.dtype)
        if self.threat is ThreatModel.LINF:
            return (2 * torch.rand(x.shape, **kw) - 1) * self.eps
        n = x[0].numel()
        direction = torch.randn(x.shape, **kw)
        direction = direction / _bcast(_flat_norm(direction, ThreatModel.L2).clamp_min(1e-12), x)
        radius = self.eps * torch.rand(x.shape[0], **kw).pow(1.0 / n)
        return direction * _bcast(radius, x)

    def _project(self, delta: torch.Tensor, shrink: float = 1.0) -> torch.Tensor:
        if self.threat is ThreatModel.LINF:
            bound = _float32_at_most(self.eps) * shrink
            return delta.clamp(-bound, bound)
        bound = self.eps * (1 - _L2_MARGIN) * shrink
        norms = _flat_norm(delta, ThreatModel.L2)
        factor = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
        return delta * _bcast(factor, delta)

    def _ascent(self, grad: torch.Tensor) -> torch.Tensor:
        if self.threat is ThreatModel.LINF:
            return grad.sign()
        return grad / _bcast(_flat_norm(grad, ThreatModel.L2).clamp_min(1e-12), grad)

    def _inside(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per image: inside the threat model, checked with float32 and float64 differences."""
        ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for dt in (x.dtype, torch.float64):
            d = x_adv.to(dt) - x.to(dt)
            n = _flat_norm(d, self.threat)
            if self.threat is ThreatModel.LINF:
                ok &= n <= _float32_at_most(self.eps)
            else:
                ok &= n <= self.eps * (1 - _L2_MARGIN / 2)
        return ok

    def _finalize(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Shrink images that rounding left outside the threat model (rare), until all are inside."""
        x_adv = x_adv.clamp(0.0, 1.0)
        for k in range(20):
            ok = self._inside(x, x_adv)
            if bool(ok.all()):
                return x_adv
            shrink = 1 - 1e-6 * 2**k  # geometric: from 1e-6 to 0.5 relative
            fixed = (x + self._project(x_adv - x, shrink)).clamp(0.0, 1.0)
            x_adv = torch.where(_bcast(ok, x), x_adv, fixed)
        ok = self._inside(x, x_adv)
        return torch.where(_bcast(ok, x), x_adv, x)  # last resort: the clean image (inside by definition)

    # -- the attack --------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: same shape, dtype and device as ``x``, detached.

        ``x`` must hold pixels in [0, 1]; ``y`` integer labels. See the module docstring for the
        guarantees (threat model and box exactly, model state unchanged, seeded random start).
        """
        check(x.dim() >= 2 and x.shape[0] == y.shape[0],
              f"attack needs a batch x (N, ...) and N labels; got x {tuple(x.shape)} and y {tuple(y.shape)}")
        check(x.is_floating_point(), f"attack input must be floating point pixels in [0, 1] (got {x.dtype})")
        with torch.inference_mode(False), torch.enable_grad(), preserved_state(model):
            x = x.detach().clone()
            y = y.detach().clone().to(x.device)
            if self.random_start:
                x_adv = (x + self._project(self._random_delta(x, generator))).clamp(0.0, 1.0)
            else:
                x_adv = x.clone()
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    step = x_adv.detach() + self.step_size * self._ascent(grad)
                    x_adv = (x + self._project(step - x)).clamp(0.0, 1.0)
            with torch.no_grad():
                return self._finalize(x, x_adv.detach())


class LinfProjectedGradientDescentAttack(PGD):
    """Linf PGD: signed-gradient steps of ``step_size``, clipped to the ``eps`` cube and [0, 1]."""

    threat = ThreatModel.LINF


class L2ProjectedGradientDescentAttack(PGD):
    """L2 PGD: normalized-gradient steps of length ``step_size``, projected onto the ``eps`` ball and [0, 1]."""

    threat = ThreatModel.L2


LinfPGD = LinfProjectedGradientDescentAttack
L2PGD = L2ProjectedGradientDescentAttack


def make_pgd(threat: str | ThreatModel, eps: float, *, steps: int = 20, step_size: float | None = None,
             random_start: bool = True) -> PGD:
    """The PGD attack for a threat model given by name (``linf`` or ``l2``)."""
    cls = LinfPGD if threat_model(threat) is ThreatModel.LINF else L2PGD
    return cls(eps, steps=steps, step_size=step_size, random_start=random_start)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def accuracy_under_attack(
    model: nn.Module,
    dataset,
    attack: PGD,
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    *,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on ``dataset`` (or ``indices`` of it, in that order) under ``attack``.

    Batches of ``batch_size`` are attacked in order; the random starts come from one CPU-seeded
    generator (``seed``), so the result is deterministic for a given seed and batch size. The model
    is used as given (a warning says so when it is in train mode) and is left unchanged.
    """
    check(batch_size >= 1, f"batch size must be >= 1 (got {batch_size})")
    if model.training:
        warnings.warn("accuracy_under_attack: the model is in train mode, so BN uses batch statistics "
                      "(running statistics are restored afterwards); call model.eval() for standard inference",
                      stacklevel=2)
    device = _model_device(model)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(idx), desc=f"{attack.threat.value} PGD-{attack.steps} eps={attack.eps:g}",
                   unit="img", dynamic_ncols=True, leave=False)
    correct = 0
    try:
        with preserved_state(model):
            for x, y in dataset.batches(batch_size, idx):
                x, y = x.to(device), y.to(device)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                x_adv = attack(model, x, y, generator=gen)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == y).sum())
                if bar is not None:
                    bar.update(len(y))
    finally:
        if bar is not None:
            bar.close()
    return correct / max(len(idx), 1)


__all__ = [
    "ThreatModel", "THREAT_MODELS", "threat_model", "PGD", "LinfProjectedGradientDescentAttack",
    "L2ProjectedGradientDescentAttack", "LinfPGD", "L2PGD", "make_pgd", "accuracy_under_attack",
    "preserved_state",
]
