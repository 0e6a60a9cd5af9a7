"""Batch poisoning through the shared statistics (Wu et al. 2023, "Uncovering adversarial risks of
test-time adaptation"): a risk of per-batch adaptation beyond the paper.

The attacker controls ``k = max(1, round(q * B))`` images of each test batch of ``B`` (at random
positions, at most ``B - 1``) and changes only those, either within the threat model around their own
clean images (``constraint="threat"``) or anywhere in [0, 1] (``"unconstrained"``). The other, benign
images are untouched. The attacker knows the model, the adaptation and the benign images and their
labels (white box, the worst case Wu et al. study) and runs PGD on its own images against the deployed
per-batch model ``adapt(model, rho, robust=...)``: the gradient reaches the poison only through the
batch statistics (plain, or the median / trimmed mean of :mod:`bnadapt.robust_stats`). The whole
iterate batch with the fewest correct benign images is kept (the attacker can evaluate it), and the
reported **benign accuracy** is the deployed model's on the benign images of that final batch.

The default poisoner (measured the strongest of those tried; docs/attacks.md): the poison starts at
a random point of its constraint set, takes signed (Linf) or normalized (L2) steps whose size decays
from ``eps / 4`` (0.25 unconstrained) to 0 along a cosine, and maximizes the cross-entropy summed over
the benign images *still classified correctly* (:func:`~bnadapt.attacks.losses.poison_ce_correct`).
The earlier poisoner (constant step, cross-entropy of every benign image) is
``schedule="constant", loss="ce"``.

**Robust statistics are attacked adaptively.** On a model deployed with ``robust`` statistics the
poison is crafted through them (their sub-gradients reach the poison), *and* crafted against the plain
statistics and transferred (``surrogate=``): the deployed model judges both and the batch worse for
the defender is kept.

A per-image model (``rho = 0``, or a model adapted-then-frozen on trusted data) is immune by
construction: its prediction of a benign image does not depend on the other images.
:func:`bnadapt.attacks.poison_table.poison_table` measures the risk against ``q``, ``rho``, the batch size
and the robust statistic, and these remedies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from bnadapt.attacks.losses import Loss, cross_entropy, loss_name, poison_ce_correct, poison_margin
from bnadapt.attacks.pgd import PGD
from bnadapt.attacks.threat import Threat
from bnadapt.errors import check, check_choice, check_count, check_fraction
from bnadapt.robust_stats import ROBUST

CONSTRAINTS = ("threat", "unconstrained")
ROBUSTS = ("none",) + ROBUST  # the statistics of the deployed model: plain, median/MAD, trimmed mean
POISON_LOSSES = ("ce-correct", "ce", "margin")
SCHEDULES = ("cosine", "constant")
STARTS = ("random", "clean")
DEFAULT_KAPPA = 2.0


def n_poison(q: float, batch_size: int) -> int:
    """The attacker's images in a batch of ``batch_size``: ``round(q * B)``, at least 1, at most ``B - 1``."""
    return int(min(max(1, round(q * batch_size)), batch_size - 1))


@dataclass
class PoisonOutput:
    """The final batch, which images were the attacker's, and the deployed model's verdict per image;
    ``info``: with a surrogate, the benign images each crafting left correct (``direct``, ``transfer``)
    and which one was kept (``winner``)."""

    x: torch.Tensor
    poison: torch.Tensor
    correct: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def benign_correct(self) -> int:
        return int((self.correct & ~self.poison).sum())

    @property
    def benign(self) -> int:
        return int((~self.poison).sum())


class ScheduledPGD(PGD):
    """PGD whose step size follows ``schedule``: ``"constant"`` (plain PGD, bit for bit) or ``"cosine"``
    (step ``t`` of ``T`` is ``step_size * (1 + cos(pi t / T)) / 2``: large moves first, then fine ones)."""

    schedule = "constant"

    def step_at(self, t: int) -> float:
        if self.schedule == "cosine":
            return self.step_size * 0.5 * (1.0 + math.cos(math.pi * t / self.steps))
        return self.step_size

    def describe(self) -> dict:
        d = super().describe()
        d["step_schedule"] = ("constant" if self.schedule == "constant"
                              else "cosine from step_size to 0: step_size * (1 + cos(pi t / steps)) / 2")
        return d


def poison_loss(name: str, kappa: float = DEFAULT_KAPPA) -> Loss:
    """The poisoning loss called ``name`` (:data:`POISON_LOSSES`)."""
    check_choice(name, POISON_LOSSES, "poisoning loss")
    return {"ce-correct": poison_ce_correct, "ce": cross_entropy}.get(name) or poison_margin(kappa)


class BatchPoisoning:
    """PGD on the attacker's ``q`` share of a batch against the benign images (module docstring).

    ``steps`` iterations of ``step_size`` (default ``eps / 4``; 0.25 for the unconstrained box) along
    ``schedule``; restart 0 starts at ``start`` (the poison's clean images, or a random point of the
    threat set), restarts 1, 2, ... at random points; the batch with the fewest correct benign images
    (judged by the deployed model) is kept."""

    def __init__(self, threat: Threat, *, q: float, steps: int = 100, step_size: float | None = None,
                 restarts: int = 1, loss: Loss | str = "ce-correct", schedule: str = "cosine", start: str = "random",
                 kappa: float = DEFAULT_KAPPA):
        self.q = check_fraction(q, "q (poisoned fraction)")
        self.loss = poison_loss(loss, kappa) if isinstance(loss, str) else loss
        self.steps = check_count(steps, "attack steps")
        self.restarts = check_count(restarts, "restarts")
        self.schedule = check_choice(schedule, SCHEDULES, "poisoning step schedule")
        self.start = check_choice(start, STARTS, "poison start")
        step_size = step_size if step_size is not None else threat.eps / 4
        self._pgd = []
        for random_start in (self.start == "random", True):  # restart 0, restarts >= 1
            pgd = ScheduledPGD.from_threat(threat, steps=self.steps, step_size=step_size, random_start=random_start,
                                           restarts=1, loss=self.loss, keep_best=True)
            pgd.schedule = self.schedule
            self._pgd.append(pgd)
        self.pgd = self._pgd[0]
        self.threat = self.pgd.threat

    def describe(self) -> dict:
        d = self.pgd.describe()
        d.update(attack="batch-poisoning", q=self.q, loss=loss_name(self.loss), restarts=self.restarts,
                 start="the poison's clean images" if self.start == "clean" else "random point of the threat set",
                 restarts_start="random point of the threat set",
                 poison_positions="round(q * B) (>= 1, <= B - 1) random positions per batch",
                 objective="sum over the benign images of the loss of the deployed per-batch model",
                 robust_statistics="crafted through the deployed model's statistics and, given a surrogate, "
                                   "also against it and transferred; the deployed model keeps the worse batch")
        return d

    def positions(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """The attacker's images of a batch of ``n`` (a boolean mask; drawn from ``generator``)."""
        check(n >= 2, "batch poisoning needs batches of at least 2 images")
        k = n_poison(self.q, n)
        gdev = generator.device if generator is not None else torch.device("cpu")
        pos = torch.randperm(n, generator=generator, device=gdev)[:k].to(device)
        poison = torch.zeros(n, dtype=torch.bool, device=device)
        poison[pos] = True
        return poison

    def craft(self, model: nn.Module, judge: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor, *,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison ``x`` at ``poison`` following ``model``'s gradients; ``judge`` (the deployed model) picks
        among candidate batches and restarts. Returns the final batch and the judge's verdict on it."""
        best_x, best_ok, best_n = None, None, None
        for r in range(self.restarts):
            out = self._pgd[min(r, 1)].run(model, x, y, generator=generator, judge=judge, movable=poison,
                                           scored=~poison)
            n = int((out.correct & ~poison).sum())
            if best_n is None or n < best_n:  # later restarts replace the batch only if strictly better
                best_x, best_ok, best_n = out.x_adv, out.correct, n
            if best_n == 0:
                break  # nothing left to attack
        return best_x, best_ok

    def run(self, deployed: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            generator: torch.Generator | None = None, surrogate: nn.Module | None = None,
            direct: bool = True) -> PoisonOutput:
        """Poison batch ``(x, y)`` of the deployed (per-batch adapted, or :class:`Replay` of an online)
        model. ``surrogate`` (e.g. the same model adapted with plain statistics when ``deployed`` uses
        robust ones): the poison is also crafted against it, and the batch that leaves fewer benign images
        correct on ``deployed`` is kept (ties: the direct one). ``direct=False`` (a deployed model without
        gradients, e.g. the robust window): the transfer from ``surrogate`` only."""
        poison = self.positions(x.shape[0], x.device, generator)
        if not direct:
            check(surrogate is not None, "a poison crafted without the deployed model's gradients needs a surrogate")
            x_t, ok_t = self.craft(surrogate, deployed, x, y, poison, generator=generator)
            n_t = int((ok_t & ~poison).sum())
            return PoisonOutput(x_t, poison, ok_t, {"direct": None, "transfer": n_t, "winner": "transfer"})
        x_d, ok_d = self.craft(deployed, deployed, x, y, poison, generator=generator)
        if surrogate is None:
            return PoisonOutput(x_d, poison, ok_d)
        x_t, ok_t = self.craft(surrogate, deployed, x, y, poison, generator=generator)
        n_d, n_t = int((ok_d & ~poison).sum()), int((ok_t & ~poison).sum())
        info = {"direct": n_d, "transfer": n_t, "winner": "transfer" if n_t < n_d else "direct"}
        if n_t < n_d:
            return PoisonOutput(x_t, poison, ok_t, info)
        return PoisonOutput(x_d, poison, ok_d, info)


class Replay(nn.Module):
    """An online model (:func:`bnadapt.adapt.stream_adapt`) held at its current running estimate: every
    forward first restores the estimate captured at construction (the state after the earlier batches,
    poisoned or not), so the poisoner can try candidate batches ``t`` (with gradients through batch
    ``t``'s statistics) without committing any; the batch it keeps is then fed to the online model
    itself, exactly as deployed, and carries over to the later batches."""

    def __init__(self, online: nn.Module):
        from bnadapt.adapt.online import online_state

        super().__init__()
        self.online = online
        self.state = online_state(online)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bnadapt.adapt.online import load_online_state

        load_online_state(self.online, self.state)
        return self.online(x)


# ----------------------------------------------------------------------------------------- the experiment
