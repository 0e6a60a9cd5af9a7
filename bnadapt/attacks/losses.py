"""Attack losses: the ``loss=`` hook of every attack (as foolbox's attacks take one).

A loss is a function ``loss(logits, y) -> (N,)`` that the attack *maximizes*, one value per image.
``logits`` is ``(N, C)`` for one model, or ``(m, N, C)`` for an :class:`~bnadapt.attacks.pgd.Ensemble`
of ``m`` models (EoT). Every loss is computed in float32 whatever precision the forward ran in.

- :func:`cross_entropy`: ``-log softmax(z)_y`` (on an ensemble of one model, exactly that model's).
- :func:`dlr`: the Difference of Logits Ratio of Croce & Hein (2020), untargeted:
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``pi`` the logits sorted in decreasing order;
  invariant to shifting and scaling the logits. Needs at least 3 classes.
- :func:`dlr_targeted`: the targeted DLR loss of Croce & Hein (2020) towards a target class ``t``
  per image, ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; :func:`targeted_dlr` binds the targets
  into a ``loss(logits, y)`` for the attacks (APGD-T, :class:`~bnadapt.attacks.apgd.APGD`). Needs at
  least 4 classes.
- :func:`eot_nll`: the paper's Eq. 3, ``-log((1/m) sum_i softmax(f_i(x + delta))_y)``, with the log
  **outside** the mean (Salman et al. 2019), computed stably as ``log m - logsumexp_i log softmax_i(y)``.
  With ``m = 1`` it is exactly :func:`cross_entropy`. (AutoAttack's EoT averages cross-entropy
  gradients instead: ``mean_i -log softmax_i(y)``, log inside; a different attack.)
- :func:`poison_ce_correct`: the default batch-poisoning loss (summed over the benign images only; see
  :mod:`bnadapt.attacks.poison`): the cross-entropy of each image *still classified correctly*, 0 for
  the others, so images already fooled stop pulling the shared statistics their way and the
  attacker's budget goes to the benign images that are still correct. (For attacks that move every
  image of the batch this measured weaker, see :func:`~bnadapt.attacks.pgd.forward_loss`; for a
  poison that moves only its own images it measured stronger.)
- :func:`poison_margin`: an alternative poisoning loss, ``min(max_{j != y} z_j - z_y, kappa)``, the
  Carlini-Wagner margin capped at ``kappa`` (measured weaker than the cross-entropy on the zoo).

:func:`correct` says which images a forward classifies correctly (an ensemble by its mean softmax).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from bnadapt.errors import check

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _single(logits: torch.Tensor, what: str) -> torch.Tensor:
    if logits.dim() == 3:
        check(logits.shape[0] == 1, f"the {what} loss takes one model's logits; an ensemble of {logits.shape[0]} "
                                    "models needs the EoT loss (eot_nll)")
        logits = logits[0]
    return logits.float()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)_y`` per image (an ensemble of one model: that model's)."""
    return F.cross_entropy(_single(logits, "cross-entropy"), y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's untargeted DLR loss per image (needs >= 3 classes; see the module docstring)."""
    z = _single(logits, "DLR")
    check(z.shape[1] >= 3, f"the DLR loss needs at least 3 classes (the model has {z.shape[1]}); use cross-entropy")
    z_sorted, ind_sorted = z.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).to(z.dtype)
    z_y = z.gather(1, y[:, None])[:, 0]
    other = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's targeted DLR loss per image towards ``target`` (N,): ``-(z_y - z_t) / (z_pi1 -
    (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``pi`` the logits sorted in decreasing order (needs >= 4 classes).
    Positive exactly when the target's logit exceeds the true one; shift- and scale-invariant."""
    z = _single(logits, "targeted DLR")
    check(z.shape[1] >= 4, f"the targeted DLR loss needs at least 4 classes (the model has {z.shape[1]}); "
                           "use the untargeted DLR or cross-entropy")
    target = target.to(z.device).long()
    check(tuple(target.shape) == (z.shape[0],), f"the targeted DLR loss needs one target per image "
                                                 f"({z.shape[0]}); got {tuple(target.shape)}")
    z_sorted = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None])[:, 0]
    z_t = z.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def targeted_dlr(target: torch.Tensor) -> Loss:
    """:func:`dlr_targeted` towards ``target`` (N,), as an attack loss ``loss(logits, y)``."""
    target = target.detach().long()

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dlr_targeted(logits, y, target)
    loss.__name__ = "dlr-targeted"
    return loss


def eot_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 3: ``-log mean_i softmax(logits_i)_y`` over the ``m`` models of ``logits`` (m, N, C)."""
    if logits.dim() == 2 or logits.shape[0] == 1:
        return cross_entropy(logits, y)  # m = 1: exactly the cross-entropy (bit for bit)
    z = logits.float()
    logp = z.log_softmax(dim=2).gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1))[..., 0]  # (m, N)
    return math.log(z.shape[0]) - torch.logsumexp(logp, dim=0)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` per image (> 0 exactly when the image is misclassified)."""
    z = _single(logits, "margin")
    z_y = z.gather(1, y[:, None])[:, 0]
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - z_y


def poison_margin(kappa: float = 1.0) -> Loss:
    """The poisoning loss: :func:`margin` capped at ``kappa`` (logit units)."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin(logits, y).clamp(max=kappa)
    loss.__name__ = f"poison_margin(kappa={kappa:g})"
    return loss


def poison_ce_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log softmax(z)_y`` for the images the forward classifies correctly, 0 for the others (the
    correctness mask carries no gradient)."""
    z = _single(logits, "poisoning")
    ok = (z.detach().argmax(1) == y).to(z.dtype)
    return F.cross_entropy(z, y, reduction="none") * ok


LOSSES = {"ce": cross_entropy, "dlr": dlr, "eot": eot_nll, "margin": margin}
LOSS_NAMES = {cross_entropy: "cross-entropy", dlr: "dlr", dlr_targeted: "dlr-targeted",
              eot_nll: "eot-nll (paper Eq. 3, log outside the mean)", margin: "margin",
              poison_ce_correct: "cross-entropy of the still-correct images"}


def loss_name(loss: Loss) -> str:
    """A readable name of a loss (for result files)."""
    return LOSS_NAMES.get(loss, getattr(loss, "__name__", type(loss).__name__))


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: whether the forward's prediction is ``y`` (an ensemble (m, N, C): argmax of the mean softmax)."""
    if logits.dim() == 3:
        if logits.shape[0] == 1:
            return logits[0].argmax(1) == y
        return logits.float().softmax(dim=2).mean(0).argmax(1) == y
    return logits.argmax(1) == y
