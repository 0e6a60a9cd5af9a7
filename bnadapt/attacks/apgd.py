"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), the core of AutoAttack, for Linf and L2 with the cross-entropy or DLR loss,
on whole batches.

The iteration is that of AutoAttack's ``APGDAttack.attack_single_run`` (``autoattack/autopgd_base.py``):

- start on the boundary of the threat set (Linf: ``x + eps * t / ||t||_inf``, ``t`` uniform in
  [-1, 1]; L2: ``x + eps * t / ||t||_2``, ``t`` Gaussian), clipped to [0, 1];
- step size ``2 * eps`` per image; each step ``z = P(x_k + eta * dir(grad))`` then the momentum step
  ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))`` (no momentum on the first step), with
  ``P`` the shared projection of :class:`~bnadapt.attacks.threat.Threat`;
- checkpoints after ``p_1 = int(0.22 N)`` iterations, then every ``max(p - int(0.03 N), int(0.06 N))`` (each at least 1): an image
  whose loss increased in at most 75% of the steps since the last checkpoint, or whose best loss did
  not improve while its step size was not reduced at the last checkpoint, halves its step size and
  restarts from its best point (highest loss) with that point's gradient.

What differs from AutoAttack, and why: the forward always sees the whole batch (AutoAttack attacks and
restarts only the still-correct images, which on a per-batch adapted model would change the batch and
so the statistics): images that do not move are masked, not dropped. Each image's best iterate is
tracked as in :mod:`bnadapt.attacks.pgd` (misclassified first, then highest loss) and the final batch
is chosen by the judge. The last iteration skips its (unused) gradient, so ``steps`` iterations cost
``steps`` gradient evaluations and one forward, exactly like PGD with ``steps`` steps.
"""

from __future__ import annotations

import torch

from bnadapt.attacks.losses import LOSSES, Loss, cross_entropy, dlr, loss_name
from bnadapt.attacks.pgd import BatchAttack, forward_loss
from bnadapt.attacks.threat import Threat, ThreatModel, rows, threat_model
from bnadapt.errors import check, check_count

MOMENTUM = 0.75
CHECKPOINT_FIRST = 0.22
CHECKPOINT_DECREASE = 0.03
CHECKPOINT_MIN = 0.06
OSCILLATION = 0.75


def _oscillating(loss_steps: torch.Tensor, j: int, k: int) -> torch.Tensor:
    """AutoAttack's ``check_oscillation``: per image, whether the loss increased in at most 75% of the
    last ``k`` steps (indices wrap as in the original: unfilled rows are zeros)."""
    t = torch.zeros(loss_steps.shape[1], device=loss_steps.device)
    for c in range(k):
        t += (loss_steps[j - c] > loss_steps[j - c - 1]).float()
    return t <= k * OSCILLATION


class APGD(BatchAttack):
    """Auto-PGD with ``steps`` iterations on ``loss`` (``"ce"``, ``"dlr"`` or a loss function) in ``threat``.

    ``restarts`` random restarts on the whole batch (see :mod:`bnadapt.attacks.pgd`). Per-image best
    iterates are always kept (they are part of the algorithm)."""

    name = "apgd"
    surface_start = True
    keep_best = True

    def __init__(self, threat: Threat | str, eps: float | None = None, *, steps: int = 100, restarts: int = 1,
                 loss: Loss | str = "ce"):
        if not isinstance(threat, Threat):
            check(eps is not None, "APGD needs eps with a threat-model name")
            threat = Threat(threat_model(threat), eps)
        self.threat = threat
        self.eps = threat.eps
        self.steps = check_count(steps, "attack steps")
        self.restarts = check_count(restarts, "restarts")
        if isinstance(loss, str):
            check(loss in ("ce", "dlr"), f"unknown APGD loss {loss!r}; choose ce or dlr")
            loss = LOSSES[loss]
        self.loss = loss
        self.random_start = True

    def __repr__(self) -> str:
        return f"APGD({self.threat}, steps={self.steps}, restarts={self.restarts}, loss={loss_name(self.loss)})"

    def describe(self) -> dict:
        return {"attack": "apgd", **self.threat.describe(), "steps": self.steps, "restarts": self.restarts,
                "loss": loss_name(self.loss), "momentum": MOMENTUM, "initial_step": "2 * eps",
                "checkpoints": f"{CHECKPOINT_FIRST}, -{CHECKPOINT_DECREASE}, min {CHECKPOINT_MIN} of the steps",
                "keep_best": True}

    def _loop(self, model, x, y, x0, movable, weight, tracker, generator) -> None:
        n_iter = self.steps
        k = max(int(CHECKPOINT_FIRST * n_iter), 1)
        k_min = max(int(CHECKPOINT_MIN * n_iter), 1)
        k_decr = max(int(CHECKPOINT_DECREASE * n_iter), 1)
        sel = rows(movable, x)
        n = x.shape[0]
        step = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)

        x_adv = x0
        lv, ok, grad = forward_loss(model, x_adv, y, self.loss, weight)
        tracker.observe(x_adv, lv, ok, grad)
        loss_best, x_best, grad_best = lv.clone(), x_adv, grad
        loss_steps = torch.zeros(n_iter, n, device=x.device)
        x_old = x_adv
        counter = 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
        for i in range(n_iter):
            with torch.no_grad():
                grad2 = x_adv - x_old
                x_old = x_adv
                a = MOMENTUM if i > 0 else 1.0
                z = self.threat.step(x, x_adv, grad, step)
                z = self.threat.project(x, x_adv + (z - x_adv) * a + grad2 * (1 - a))
                x_adv = torch.where(sel, z, x_adv)
            last = i == n_iter - 1
            lv, ok, g = forward_loss(model, x_adv, y, self.loss, weight, grad=not last)
            tracker.observe(x_adv, lv, ok)
            if last:
                break
            grad = g
            with torch.no_grad():
                loss_steps[i] = lv
                improved = lv > loss_best
                x_best = torch.where(rows(improved, x), x_adv, x_best)
                grad_best = torch.where(rows(improved, x), grad, grad_best)
                loss_best = torch.where(improved, lv, loss_best)
                counter += 1
                if counter == k:
                    osc = _oscillating(loss_steps, i, k)
                    osc |= ~reduced_last_check & (loss_best_last_check >= loss_best)
                    reduced_last_check = osc.clone()
                    loss_best_last_check = loss_best.clone()
                    if bool(osc.any()):
                        step = torch.where(osc, step / 2.0, step)
                        x_adv = torch.where(rows(osc, x) & sel, x_best, x_adv)
                        grad = torch.where(rows(osc, x), grad_best, grad)
                    k = max(k - k_decr, k_min)
                    counter = 0


def apgd_ce(threat: Threat, *, steps: int = 100, restarts: int = 1) -> APGD:
    """APGD on the cross-entropy."""
    return APGD(threat, steps=steps, restarts=restarts, loss=cross_entropy)


def apgd_dlr(threat: Threat, *, steps: int = 100, restarts: int = 1) -> APGD:
    """APGD on the DLR loss (needs >= 3 classes)."""
    return APGD(threat, steps=steps, restarts=restarts, loss=dlr)


__all__ = ["APGD", "apgd_ce", "apgd_dlr", "ThreatModel"]
