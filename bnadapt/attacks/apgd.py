"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"), the core of AutoAttack, for Linf and L2 with the cross-entropy or DLR loss,
and APGD-T (the targeted DLR loss over several target classes), on whole batches:

- ``APGD(threat, loss="ce")`` (``apgd-ce``), ``APGD(threat, loss="dlr")`` (``apgd-dlr``);
- ``APGD(threat, loss="dlr-targeted", n_target=9)`` (``apgd-t``, AutoAttack's ``APGDAttack_targeted``
  in its standard version): for each target rank ``k = 1 .. n_target`` (capped at ``classes - 1``) one
  APGD run on :func:`~bnadapt.attacks.losses.dlr_targeted` whose target for each image is its ``k``-th
  most likely class other than the true one under the *clean* logits of the attacked model (for a
  correctly classified image: its ``(k + 1)``-th most likely class, as in AutoAttack; through the
  statistics: the deployed model's logits of the clean batch). Each run starts from a fresh random
  start and its own step-size schedule; the images already misclassified by an earlier run stay at
  their best iterate (in the batch, unmoved), the others move (AutoAttack attacks only the
  still-robust images). One tracker spans the runs, so per image the best iterate across targets is
  kept with the rules below (misclassified first, then highest loss) and the judge picks the final
  batch as for every attack. Cost: up to ``n_target`` times APGD (fewer when a run leaves no image
  of the batch to attack), plus one forward of the clean batch.

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

from bnadapt.attacks.losses import LOSSES, Loss, cross_entropy, dlr, dlr_targeted, loss_name, targeted_dlr
from bnadapt.attacks.pgd import BatchAttack, forward_loss
from bnadapt.attacks.threat import Threat, ThreatModel, rows, threat_model
from bnadapt.errors import check, check_count

MOMENTUM = 0.75
CHECKPOINT_FIRST = 0.22
CHECKPOINT_DECREASE = 0.03
CHECKPOINT_MIN = 0.06
OSCILLATION = 0.75
DEFAULT_TARGETS = 9
"""Target classes of APGD-T (AutoAttack's standard version for Linf and L2)."""
TARGETED = "dlr-targeted"


def _oscillating(loss_steps: torch.Tensor, j: int, k: int) -> torch.Tensor:
    """AutoAttack's ``check_oscillation``: per image, whether the loss increased in at most 75% of the
    last ``k`` steps (indices wrap as in the original: unfilled rows are zeros)."""
    t = torch.zeros(loss_steps.shape[1], device=loss_steps.device)
    for c in range(k):
        t += (loss_steps[j - c] > loss_steps[j - c - 1]).float()
    return t <= k * OSCILLATION


class APGD(BatchAttack):
    """Auto-PGD with ``steps`` iterations on ``loss`` in ``threat``: ``"ce"``, ``"dlr"``, a loss function,
    or ``"dlr-targeted"`` (APGD-T: one run per target class, ``n_target`` targets, default 9, capped at
    ``classes - 1``; see the module docstring).

    ``restarts`` random restarts on the whole batch (see :mod:`bnadapt.attacks.pgd`); with APGD-T each
    restart runs every target. Per-image best iterates are always kept (they are part of the algorithm)."""

    name = "apgd"
    surface_start = True
    keep_best = True

    def __init__(self, threat: Threat | str, eps: float | None = None, *, steps: int = 100, restarts: int = 1,
                 loss: Loss | str = "ce", n_target: int | None = None):
        if not isinstance(threat, Threat):
            check(eps is not None, "APGD needs eps with a threat-model name")
            threat = Threat(threat_model(threat), eps)
        self.threat = threat
        self.eps = threat.eps
        self.steps = check_count(steps, "attack steps")
        self.restarts = check_count(restarts, "restarts")
        self.targeted = loss == TARGETED or loss is dlr_targeted
        if isinstance(loss, str) and not self.targeted:
            check(loss in ("ce", "dlr"), f"unknown APGD loss {loss!r}; choose ce, dlr or {TARGETED}")
            loss = LOSSES[loss]
        if self.targeted:
            loss = dlr_targeted
            self.n_target = check_count(DEFAULT_TARGETS if n_target is None else n_target, "APGD-T target classes",
                                        hint=f"AutoAttack uses {DEFAULT_TARGETS}")
        else:
            check(n_target is None, f"n_target (target classes) applies only to the {TARGETED} loss (APGD-T)")
            self.n_target = None
        self.loss = loss
        self.random_start = True

    def __repr__(self) -> str:
        t = f", n_target={self.n_target}" if self.targeted else ""
        return f"APGD({self.threat}, steps={self.steps}, restarts={self.restarts}, loss={loss_name(self.loss)}{t})"

    def describe(self) -> dict:
        d = {"attack": "apgd", **self.threat.describe(), "steps": self.steps, "restarts": self.restarts,
             "loss": loss_name(self.loss), "momentum": MOMENTUM, "initial_step": "2 * eps",
             "checkpoints": f"{CHECKPOINT_FIRST}, -{CHECKPOINT_DECREASE}, min {CHECKPOINT_MIN} of the steps",
             "keep_best": True}
        if self.targeted:
            d.update(targets=self.n_target, target_rule="run k = 1..targets (capped at classes - 1): each image's k-th "
                                                        "most likely class other than the true one under the attacked "
                                                        "model's logits of the clean batch; best iterate across runs")
        return d

    def targets(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """APGD-T's targets, ``(k, N)``: row ``j`` holds each image's ``(j + 1)``-th most likely class other
        than ``y`` under ``model``'s logits of the clean (whole) batch ``x``; ``k = min(n_target, classes - 1)``."""
        with torch.no_grad():
            z = model(x)
        z = z.float() if z.dim() == 2 else z.float().softmax(dim=2).mean(0)  # an ensemble: its mean softmax
        check(z.shape[1] >= 4, f"the targeted DLR loss needs at least 4 classes (the model has {z.shape[1]}); "
                               "use apgd-dlr or apgd-ce")
        z = z.scatter(1, y[:, None], float("-inf"))
        order = torch.sort(z, dim=1, descending=True, stable=True).indices
        return order[:, :min(self.n_target, z.shape[1] - 1)].T.contiguous()

    def _loop(self, model, x, y, x0, movable, weight, tracker, generator) -> None:
        if not self.targeted:
            self._run(model, x, y, x0, movable, weight, tracker, self.loss)
            return
        scored = torch.ones_like(movable) if weight is None else weight > 0
        mov = movable
        for j, target in enumerate(self.targets(model, x, y)):
            if j > 0:  # images fooled by an earlier target stay at their best iterate; the others start afresh
                mov = movable & ~(tracker.best_fooled & scored)
                if not bool((mov & scored).any()):
                    break
                x0 = torch.where(rows(mov, x), self.threat.start(x, generator, surface=self.surface_start),
                                 tracker.best_x)
            self._run(model, x, y, x0, mov, weight, tracker, targeted_dlr(target))

    def _run(self, model, x, y, x0, movable, weight, tracker, loss: Loss) -> None:
        """One APGD run on ``loss`` from ``x0`` (AutoAttack's ``attack_single_run``), observed by ``tracker``."""
        n_iter = self.steps
        k = max(int(CHECKPOINT_FIRST * n_iter), 1)
        k_min = max(int(CHECKPOINT_MIN * n_iter), 1)
        k_decr = max(int(CHECKPOINT_DECREASE * n_iter), 1)
        sel = rows(movable, x)
        n = x.shape[0]
        step = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)

        x_adv = x0
        lv, ok, grad = forward_loss(model, x_adv, y, loss, weight)
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
            lv, ok, g = forward_loss(model, x_adv, y, loss, weight, grad=not last)
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


def apgd_t(threat: Threat, *, steps: int = 100, restarts: int = 1, n_target: int = DEFAULT_TARGETS) -> APGD:
    """APGD-T: APGD on the targeted DLR loss, one run per target class (needs >= 4 classes)."""
    return APGD(threat, steps=steps, restarts=restarts, loss=TARGETED, n_target=n_target)


__all__ = ["APGD", "DEFAULT_TARGETS", "apgd_ce", "apgd_dlr", "apgd_t", "ThreatModel"]
