"""Threat models: the per-norm geometry that every attack shares (PGD, APGD, EoT-PGD, poisoning).

A :class:`Threat` is a norm (``linf`` or ``l2``) and a radius ``eps`` in pixel units, intersected with
the pixel box [0, 1]. It owns, in one place:

- the **random start** (uniform in the Linf cube; uniform in the L2 ball, or on its sphere as APGD
  starts),
- the **ascent direction** of a gradient (Linf: its sign; L2: the gradient over its norm),
- the **projection** ``project(x, z)`` of a candidate ``z`` onto the threat set around ``x`` and the box
  (Linf: clip to the cube; L2: rescale onto the ball; both then clip to [0, 1], which only moves a pixel
  towards ``x`` and so never leaves the ball),
- the **exact inside check** and :meth:`Threat.finalize`.

Guarantee of :meth:`Threat.finalize` (and so of every attack's output): ``0 <= x_adv <= 1`` and
``||x_adv - x||_p <= eps`` per image, computed in float32 *and* float64 (Linf exactly; L2 with a
relative margin of 1e-5 below ``eps`` so any summation order passes). The projection keeps a tiny
safety margin; images that rounding pushed outside are shrunk towards ``x``; an image that still failed
would be returned unperturbed (never observed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from bnadapt.errors import BnadaptError, check_float


class ThreatModel(str, Enum):
    """Perturbation sets, named as on the command line."""

    LINF = "linf"
    L2 = "l2"


THREAT_MODELS = tuple(t.value for t in ThreatModel)

# Relative margin kept below eps for L2 (float32 norms of ~1e5 entries differ by < 1e-6 relative).
L2_MARGIN = 1e-5


def threat_model(name: "str | ThreatModel") -> ThreatModel:
    """Parse ``linf`` / ``l2`` (case-insensitive; ``inf``/``Linf`` accepted) into :class:`ThreatModel`."""
    if isinstance(name, ThreatModel):
        return name
    key = str(name).strip().lower().replace("ℓ", "l")
    key = {"inf": "linf", "l_inf": "linf", "l-inf": "linf", "l_2": "l2", "2": "l2"}.get(key, key)
    try:
        return ThreatModel(key)
    except ValueError:
        raise BnadaptError(f"unknown threat model {name!r}; choose one of {', '.join(THREAT_MODELS)}") from None


def check_eps(eps, name: str = "eps") -> float:
    """An attack radius: a finite number > 0 in pixel units."""
    return check_float(eps, name, min=0.0, min_open=True, hint="it is the attack radius in pixel units, e.g. 0.1")


def float32_at_most(v: float) -> float:
    """The largest float32 value <= ``v`` (as a Python float), so comparisons hold in both precisions."""
    f = float(np.float32(v))
    if f > v:
        f = float(np.nextafter(np.float32(v), np.float32(-np.inf)))
    return f


def flat_norm(d: torch.Tensor, p: ThreatModel) -> torch.Tensor:
    """Per-image Linf or L2 norm of a batch ``d`` (N, ...)."""
    flat = d.reshape(d.shape[0], -1)
    if p is ThreatModel.LINF:
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(d.shape[0])
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image vector (N,) viewed to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image boolean mask (N,) viewed to select whole images of ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Threat:
    """The set ``{x' : ||x' - x||_p <= eps, 0 <= x' <= 1}`` and its geometry (see the module docstring)."""

    norm: ThreatModel
    eps: float
    label: str | None = None  # e.g. "unconstrained" for the whole box (Linf eps 1)

    def __post_init__(self):
        object.__setattr__(self, "norm", threat_model(self.norm))
        object.__setattr__(self, "eps", check_eps(self.eps))

    @classmethod
    def box(cls) -> "Threat":
        """The whole pixel box [0, 1] (Linf radius 1 around any image in the box): unconstrained inputs."""
        return cls(ThreatModel.LINF, 1.0, "unconstrained")

    def describe(self) -> dict:
        d = {"threat_model": self.norm.value, "eps": self.eps, "box": [0.0, 1.0]}
        if self.label:
            d["constraint"] = self.label
        return d

    @property
    def value(self) -> str:
        """The norm's name, ``linf`` or ``l2`` (as :class:`ThreatModel`'s ``value``)."""
        return self.norm.value

    def __str__(self) -> str:
        if self.label:
            return self.label
        return f"{'Linf' if self.norm is ThreatModel.LINF else 'L2'} eps {self.eps:g}"

    # -- random start ---------------------------------------------------------------------------
    def random_delta(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                     surface: bool = False) -> torch.Tensor:
        """A random perturbation of ``x``'s shape: uniform in the Linf cube (``surface``: scaled so its
        largest entry is ``eps``, as APGD starts); uniform in the L2 ball (``surface``: on the sphere)."""
        kw = dict(generator=generator, device=x.device, dtype=x.dtype)
        if generator is not None and generator.device != x.device:
            kw["device"] = generator.device
        if self.norm is ThreatModel.LINF:
            t = 2 * torch.rand(x.shape, **kw) - 1
            if surface:
                t = t / bcast(flat_norm(t, ThreatModel.LINF).clamp_min(1e-12), t)
            return (t * self.eps).to(x.device)
        n = x[0].numel()
        direction = torch.randn(x.shape, **kw)
        direction = direction / bcast(flat_norm(direction, ThreatModel.L2).clamp_min(1e-12), direction)
        radius = torch.full((x.shape[0],), self.eps, **{k: v for k, v in kw.items() if k != "generator"}) if surface \
            else self.eps * torch.rand(x.shape[0], **kw).pow(1.0 / n)
        return (direction * bcast(radius, direction)).to(x.device)

    def start(self, x: torch.Tensor, generator: torch.Generator | None = None, *, surface: bool = False) -> torch.Tensor:
        """A random point of the threat set around ``x`` (see :meth:`random_delta`), in the box."""
        return (x + self._project_delta(self.random_delta(x, generator, surface=surface))).clamp(0.0, 1.0)

    # -- steps and projection -------------------------------------------------------------------
    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit norm: ``sign(grad)`` (Linf) or ``grad / ||grad||_2`` (L2)."""
        if self.norm is ThreatModel.LINF:
            return grad.sign()
        return grad / bcast(flat_norm(grad, ThreatModel.L2).clamp_min(1e-12), grad)

    def _project_delta(self, delta: torch.Tensor, shrink: float = 1.0) -> torch.Tensor:
        if self.norm is ThreatModel.LINF:
            bound = float32_at_most(self.eps) * shrink
            return delta.clamp(-bound, bound)
        bound = self.eps * (1 - L2_MARGIN) * shrink
        norms = flat_norm(delta, ThreatModel.L2)
        factor = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
        return delta * bcast(factor, delta)

    def project(self, x: torch.Tensor, z: torch.Tensor, shrink: float = 1.0) -> torch.Tensor:
        """``z`` projected onto the threat set around ``x`` and then clipped to [0, 1]."""
        return (x + self._project_delta(z - x, shrink)).clamp(0.0, 1.0)

    def step(self, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, step_size) -> torch.Tensor:
        """One projected ascent step ``project(x, x_adv + step_size * direction(grad))``; ``step_size`` is
        a number or a per-image tensor (N,)."""
        if isinstance(step_size, torch.Tensor):
            step_size = bcast(step_size.to(x_adv.dtype), x_adv)
        return self.project(x, x_adv + step_size * self.direction(grad))

    # -- exactness ------------------------------------------------------------------------------
    def inside(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per image: inside the threat set and the box, checked with float32 and float64 differences."""
        ok = (x_adv >= 0).reshape(x.shape[0], -1).all(1) & (x_adv <= 1).reshape(x.shape[0], -1).all(1)
        for dt in (x.dtype, torch.float64):
            n = flat_norm(x_adv.to(dt) - x.to(dt), self.norm)
            if self.norm is ThreatModel.LINF:
                ok &= n <= float32_at_most(self.eps)
            else:
                ok &= n <= self.eps * (1 - L2_MARGIN / 2)
        return ok

    def finalize(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` with images that rounding left outside the threat set shrunk towards ``x`` until all
        are inside (see the module docstring); detached."""
        x_adv = x_adv.detach().clamp(0.0, 1.0)
        for k in range(20):
            ok = self.inside(x, x_adv)
            if bool(ok.all()):
                return x_adv
            shrink = 1 - 1e-6 * 2**k  # geometric: from 1e-6 to 0.5 relative
            x_adv = torch.where(rows(ok, x), x_adv, self.project(x, x_adv, shrink))
        ok = self.inside(x, x_adv)
        return torch.where(rows(ok, x), x_adv, x)  # last resort: the clean image (inside by definition)


def make_threat(norm: "str | ThreatModel", eps: float) -> Threat:
    """A :class:`Threat` from a norm name and a radius (one-line errors for bad ones)."""
    return Threat(threat_model(norm), eps)
