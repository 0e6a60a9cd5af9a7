"""PGD (Madry et al. 2018) on whole batches, in the style of foolbox's attacks, and the machinery that
every attack here shares: model-state preservation, ensembles, best iterates, restarts and the judge.

An attack is configured once (keyword-only, typed arguments) and then called:
``attack(model, x, y, generator=None) -> x_adv`` or ``attack.run(model, x, y, ...) -> AttackOutput``.

**Whole batches.** The model may be a per-batch adapted model (:func:`bnadapt.adapt.adapt`), whose
prediction for an image depends on the other images of its batch. So every forward sees the whole
batch ``x`` (never a sub-batch): restarts and per-image step control *mask the updates* of images
instead of dropping them from the batch.

**Best iterates and the judge** (``keep_best=True``, what ``bnadapt attack`` uses). For every image the
attack keeps its best iterate (misclassified first, then highest loss), as seen by the attack's own
forward; it also keeps the whole iterate batch with the fewest correct images, and the last one. On a
per-image model the assembled best iterates are the strongest batch. On a per-batch model the
assembled batch is a *new* batch whose statistics differ from those under which each image was
misclassified, so the three candidate batches are each fed to the **judge** (the deployed model; by
default the attacked model itself) as whole batches, and the one with the fewest correct images wins.
``AttackOutput.correct`` is the judge's verdict on exactly the returned batch.

The unperturbed batch is a candidate too (it lies in the threat model), so an attack never reports
more correct images than the clean batch has. **Restarts.** Restart ``r > 0`` keeps the images that the current
best batch already fools where they are (they stay in the batch, unmoved) and restarts every other image from a fresh random start; the
new winner replaces the current batch only if the judge counts fewer correct images.

Guarantees (tested): outputs inside the threat model and the box exactly
(:meth:`~bnadapt.attacks.threat.Threat.finalize`); no side effect on the model or the judge (weights,
buffers, ``training`` flags, ``requires_grad``, ``.grad``: :func:`preserved_state`; gradients are taken
with respect to the input only); the random starts draw from ``generator`` (else torch's global RNG).
The forward runs on the model *as given* (a train-mode BN model is attacked through its batch
statistics and its running statistics are restored afterwards).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bnadapt.attacks.losses import Loss, correct, cross_entropy, loss_name
from bnadapt.attacks.threat import Threat, ThreatModel, flat_norm, rows, threat_model
from bnadapt.errors import check, check_count, check_float


@contextlib.contextmanager
def preserved_state(*models: nn.Module | None) -> Iterator:
    """Run a block with each model's buffers, ``training`` flags and ``requires_grad`` restored on exit.

    Inside the block parameters do not require gradients (so attacks skip weight gradients). Buffers
    (BN running statistics, ``num_batches_tracked``) are copied back in place, so a forward in train
    mode leaves no trace. Parameters themselves are not snapshotted: nothing here writes them.
    Yields the first model."""
    seen: set[int] = set()
    mods = []
    for m in models:
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            mods.append(m)
    flags = [(m, m.training) for model in mods for m in model.modules()]
    params = [p for model in mods for p in model.parameters()]
    req = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for model in mods for b in model.buffers()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield models[0] if models else None
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, r in zip(params, req):
            p.requires_grad_(r)
        for m, t in flags:
            m.training = t


class Ensemble(nn.Module):
    """``m`` models attacked together (EoT): the forward returns their logits stacked, ``(m, N, C)``.
    Every model sees the same whole batch."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        check(len(models) >= 1, "an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])


@dataclass
class AttackOutput:
    """An attack's final batch ``x_adv`` (detached, inside the threat model), the judge's verdict
    ``correct`` (N,) on exactly that batch (None when no judge ran), and ``info`` (zero-gradient count
    at the first step, restarts run, which candidate won each restart)."""

    x_adv: torch.Tensor
    correct: torch.Tensor | None
    info: dict = field(default_factory=dict)


class Tracker:
    """Best iterates of one restart: per image (misclassified first, then highest loss; only images
    that move), the whole iterate batch with the fewest correct scored images, and the last iterate."""

    def __init__(self, x0: torch.Tensor, movable: torch.Tensor, scored: torch.Tensor, keep_best: bool):
        self.keep_best, self.movable, self.scored = keep_best, movable, scored
        self.best_x = x0
        self.best_fooled = torch.zeros_like(movable)
        self.best_loss = torch.full(movable.shape, -math.inf, device=x0.device)
        self.batch_x, self.batch_correct = None, math.inf
        self.last = x0
        self.first_grad_zero: int | None = None

    def observe(self, x_t: torch.Tensor, loss_t: torch.Tensor, ok_t: torch.Tensor,
                grad: torch.Tensor | None = None) -> None:
        if grad is not None and self.first_grad_zero is None:
            zero = flat_norm(grad, ThreatModel.LINF) == 0  # among images still correctly classified
            self.first_grad_zero = int((zero & self.movable & ok_t).sum())
        self.last = x_t
        if not self.keep_best:
            return
        fooled = ~ok_t
        loss_t = torch.nan_to_num(loss_t.detach().float(), nan=-math.inf)
        better = self.movable & ((fooled & ~self.best_fooled) | ((fooled == self.best_fooled) & (loss_t > self.best_loss)))
        self.best_x = torch.where(rows(better, x_t), x_t, self.best_x)
        self.best_fooled = torch.where(better, fooled, self.best_fooled)
        self.best_loss = torch.where(better, loss_t, self.best_loss)
        n = int((ok_t & self.scored).sum())
        if n < self.batch_correct:
            self.batch_x, self.batch_correct = x_t, n

    def candidates(self) -> list[tuple[str, torch.Tensor]]:
        if not self.keep_best:
            return [("last", self.last)]
        out = [("best_per_image", self.best_x)]
        if self.batch_x is not None:
            out.append(("best_batch", self.batch_x))
        out.append(("last", self.last))
        return out


def forward_loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: Loss, weight: torch.Tensor | None,
                 *, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One whole-batch forward: per-image loss (detached), per-image correctness and (``grad``) the
    gradient of ``sum(weight * loss)`` with respect to ``x_adv`` only. (Summing only the images still
    correct, to stop misclassified ones pulling the shared statistics, measured weaker on per-batch
    models, so every image of the batch enters the sum.)"""
    if not grad:
        with torch.no_grad():
            logits = model(x_adv)
            return loss(logits, y).detach(), correct(logits, y), None
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    lv = loss(logits, y)
    ok = correct(logits.detach(), y)
    total = lv.sum() if weight is None else (lv * weight).sum()
    (g,) = torch.autograd.grad(total, x_adv)
    return lv.detach(), ok, g


def per_batch(model: nn.Module | None) -> bool:
    """Whether ``model`` normalizes with its batch's statistics (a per-batch adapted layer with rho > 0)."""
    from bnadapt.adapt import AdaptiveBatchNorm

    return model is not None and any(isinstance(m, AdaptiveBatchNorm) and not m.frozen and m.rho > 0
                                     for m in model.modules())


def judge_batch(judge: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: whether ``judge`` classifies the whole batch ``x_adv`` correctly (no gradients)."""
    with torch.no_grad():
        return correct(judge(x_adv), y)


class BatchAttack:
    """What PGD and APGD share: validation, whole-batch restarts, candidates and the judge."""

    threat: Threat
    restarts: int = 1
    keep_best: bool = False
    random_start: bool = True
    surface_start: bool = False
    loss: Loss = staticmethod(cross_entropy)
    name = "attack"

    def _loop(self, model, x, y, x0, movable, weight, tracker, generator) -> None:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: same shape, dtype and device as ``x``, detached."""
        return self.run(model, x, y, generator=generator, judge=None).x_adv

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
            judge: nn.Module | None | str = "model", movable: torch.Tensor | None = None,
            scored: torch.Tensor | None = None, start: torch.Tensor | None = None) -> AttackOutput:
        """Attack the whole batch ``(x, y)`` and return the final batch with the judge's verdict.

        ``judge``: the deployed model that picks among candidate batches and decides the restart masks
        (``"model"``: the attacked model; ``None``: judge only when there is a choice to make).
        ``movable``: images the attacker may change (default all); ``scored``: images whose loss is
        maximized and whose correctness counts (default all). Poisoning moves some and scores others.
        ``start``: a batch inside the threat model around ``x`` to start from instead of ``x`` (the first
        restart begins there, without a random start; it is a candidate, so the attack never returns a
        batch the judge finds worse than ``start``)."""
        check(x.dim() >= 2 and x.shape[0] == y.shape[0],
              f"attack needs a batch x (N, ...) and N labels; got x {tuple(x.shape)} and y {tuple(y.shape)}")
        check(x.is_floating_point(), f"attack input must be floating point pixels in [0, 1] (got {x.dtype})")
        if isinstance(judge, str):
            judge = model
        check(x.shape[0] >= 2 or not (per_batch(model) or per_batch(judge)),
              "a batch of one image cannot be attacked on a per-batch adapted model (its statistics would be the "
              "image's own); use batches of at least 2 images")
        with torch.inference_mode(False), torch.enable_grad(), preserved_state(model, judge):
            x = x.detach().clone()
            y = y.detach().clone().to(x.device)
            n = x.shape[0]
            movable = torch.ones(n, dtype=torch.bool, device=x.device) if movable is None else movable.to(x.device)
            scored = torch.ones(n, dtype=torch.bool, device=x.device) if scored is None else scored.to(x.device)
            weight = None if bool(scored.all()) else scored.to(x.dtype)
            info: dict = {"zero_grad": None, "restarts_run": 0, "winners": []}
            cur_x, cur_ok = x, None
            if start is not None:
                check(tuple(start.shape) == tuple(x.shape), "start must have the shape of the batch")
                cur_x = self.threat.finalize(x, start.detach().to(x.device, x.dtype))
            if judge is not None or self.keep_best or self.restarts > 1 or start is not None:
                # the unperturbed (or given) batch is a point of the threat model too: never return worse
                cur_ok = judge_batch(judge if judge is not None else model, cur_x, y)
            for r in range(self.restarts):
                if r == 0:
                    mov = movable
                else:
                    if not bool((cur_ok & scored).any()):
                        break  # nothing left to attack
                    mov = movable & ~(scored & ~cur_ok)
                if r == 0 and start is not None:
                    x0 = cur_x
                elif self.random_start:
                    x0 = torch.where(rows(mov, x), self.threat.start(x, generator, surface=self.surface_start), cur_x)
                else:
                    x0 = torch.where(rows(mov, x), x, cur_x)
                tracker = Tracker(x0, mov, scored, self.keep_best)
                self._loop(model, x, y, x0, mov, weight, tracker, generator)
                if info["zero_grad"] is None:
                    info["zero_grad"] = tracker.first_grad_zero
                info["restarts_run"] = r + 1
                cands = [(name, self.threat.finalize(x, c)) for name, c in tracker.candidates()]
                if judge is None and len(cands) == 1 and self.restarts == 1:
                    return AttackOutput(cands[0][1], None, info)
                jm = judge if judge is not None else model
                best = None
                for name, c in cands:
                    ok = judge_batch(jm, c, y)
                    k = int((ok & scored).sum())
                    if best is None or k < best[0]:
                        best = (k, name, c, ok)
                if cur_ok is None or best[0] < int((cur_ok & scored).sum()) + (r == 0):  # ties: the attack's batch
                    cur_x, cur_ok = best[2], best[3]
                    info["winners"].append(best[1])
                else:
                    info["winners"].append("clean" if r == 0 else "previous")
            return AttackOutput(cur_x, cur_ok, info)


class PGD(BatchAttack):
    """Projected gradient ascent on ``loss`` within the threat model (base class).

    Use :class:`LinfProjectedGradientDescentAttack` / :class:`L2ProjectedGradientDescentAttack`
    (aliases :data:`LinfPGD`, :data:`L2PGD`) or :func:`make_pgd`. ``step_size`` defaults to
    ``2.5 * eps / steps`` (Madry et al.'s rule). Defaults (20 steps, one restart, last iterate) are
    those of the training recipes and the model cards; evaluations use ``keep_best=True`` and more steps.
    """

    norm: ThreatModel = ThreatModel.LINF
    name = "pgd"

    def __init__(self, eps: float, *, steps: int = 20, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1, loss: Loss = cross_entropy, keep_best: bool = False):
        self.threat = Threat(self.norm, eps)
        self.eps = self.threat.eps
        self.steps = check_count(steps, "attack steps")
        if step_size is None:
            step_size = 2.5 * self.eps / self.steps
        self.step_size = check_float(step_size, "attack step size", min=0.0, min_open=True)
        self.random_start = bool(random_start)
        self.restarts = check_count(restarts, "restarts")
        self.loss = loss
        self.keep_best = bool(keep_best)

    @classmethod
    def from_threat(cls, threat: Threat, **kwargs) -> "PGD":
        """PGD within ``threat`` (any norm; keeps its label, e.g. ``unconstrained``)."""
        pgd = cls(threat.eps, **kwargs)
        pgd.norm, pgd.threat = threat.norm, threat
        return pgd

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:g}, steps={self.steps}, step_size={self.step_size:g}, "
                f"random_start={self.random_start}, restarts={self.restarts}, keep_best={self.keep_best})")

    def describe(self) -> dict:
        """The attack's settings as a JSON-able dict (for result files)."""
        d = {"attack": "pgd", "threat_model": self.threat.norm.value, "eps": self.eps, "steps": self.steps,
             "step_size": self.step_size, "random_start": self.random_start, "loss": loss_name(self.loss),
             "box": [0.0, 1.0]}
        if self.threat.label:
            d["constraint"] = self.threat.label
        if self.keep_best or self.restarts > 1:
            d.update(restarts=self.restarts, keep_best=self.keep_best)
        return d

    def step_at(self, t: int) -> float:
        """The step size of step ``t`` (constant here; schedules override it)."""
        return self.step_size

    def _loop(self, model, x, y, x0, movable, weight, tracker, generator) -> None:
        x_adv = x0
        sel = rows(movable, x)
        for t in range(self.steps):
            lv, ok, g = forward_loss(model, x_adv, y, self.loss, weight)
            tracker.observe(x_adv, lv, ok, g)
            with torch.no_grad():
                x_adv = torch.where(sel, self.threat.step(x, x_adv, g, self.step_at(t)), x_adv)
        if self.keep_best:
            lv, ok, _ = forward_loss(model, x_adv, y, self.loss, weight, grad=False)
            tracker.observe(x_adv, lv, ok)
        else:
            tracker.last = x_adv


class LinfProjectedGradientDescentAttack(PGD):
    """Linf PGD: signed-gradient steps of ``step_size``, clipped to the ``eps`` cube and [0, 1]."""

    norm = ThreatModel.LINF


class L2ProjectedGradientDescentAttack(PGD):
    """L2 PGD: normalized-gradient steps of length ``step_size``, projected onto the ``eps`` ball and [0, 1]."""

    norm = ThreatModel.L2


LinfPGD = LinfProjectedGradientDescentAttack
L2PGD = L2ProjectedGradientDescentAttack


def make_pgd(threat: "str | ThreatModel", eps: float, *, steps: int = 20, step_size: float | None = None,
             random_start: bool = True, restarts: int = 1, loss: Loss = cross_entropy, keep_best: bool = False) -> PGD:
    """The PGD attack for a threat model given by name (``linf`` or ``l2``)."""
    cls = LinfPGD if threat_model(threat) is ThreatModel.LINF else L2PGD
    return cls(eps, steps=steps, step_size=step_size, random_start=random_start, restarts=restarts, loss=loss,
               keep_best=keep_best)


def accuracy_under_attack(
    model: nn.Module,
    dataset,
    attack: BatchAttack,
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    *,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on ``dataset`` (or ``indices`` of it, in that order) under ``attack``.

    Batches of ``batch_size`` are attacked in order; the random starts come from one CPU-seeded
    generator (``seed``), so the result is deterministic for a given seed and batch size. The model
    is used as given (a warning says so when it is in train mode) and is left unchanged. (The model
    cards' PGD-20 figure; the adversarial evaluation of adapted models is :mod:`bnadapt.attacks.evaluate`.)
    """
    import warnings

    check(batch_size >= 1, f"batch size must be >= 1 (got {batch_size})")
    if model.training:
        warnings.warn("accuracy_under_attack: the model is in train mode, so BN uses batch statistics "
                      "(running statistics are restored afterwards); call model.eval() for standard inference",
                      stacklevel=2)
    from bnadapt.runs import Progress, model_device

    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    correct_n = 0
    desc = f"{attack.threat.norm.value} PGD-{getattr(attack, 'steps', '')} eps={attack.threat.eps:g}"
    with Progress(len(idx), desc, quiet=not progress, leave=False) as bar, preserved_state(model):
        for x, y in dataset.batches(batch_size, idx):
            x, y = x.to(device), y.to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            x_adv = attack(model, x, y, generator=gen)
            with torch.no_grad():
                correct_n += int((model(x_adv).argmax(1) == y).sum())
            bar.update(len(y))
    return correct_n / max(len(idx), 1)
