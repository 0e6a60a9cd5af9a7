"""Warn-only sanity checks of an adversarial evaluation, in the spirit of AutoAttack's ``checks.py``.

Each check returns a record ``{"check", "warning": bool, "message", ...}`` that is stored in the result
file (``results.checks``) and printed under the tables; none of them stops a run. They flag evaluations
that a reader should not trust as they stand:

- ``adapted_without_statistics``: the deployed model adapts to its batch (``rho > 0``) but no attack
  differentiated through the batch statistics (only frozen surrogates, e.g. EoT-PGD, or transfers):
  such an evaluation can over-credit the defense.
- ``batch_of_one``: a batch of one image (a per-batch adapted model then normalizes every image with
  its own statistics; refused with adaptation) or a tiny adapted batch (< 16 images: statistics so noisy
  that the numbers depend strongly on the batch composition).
- ``vanishing_gradients``: images still correctly classified whose input gradient was exactly zero at
  an attack's first step (gradient masking, or a loss that saturates, e.g. DLR with 2 classes).
- ``worst_below_paper``: the per-image worst case over all attacks is well below the paper-style attack
  (EoT-PGD): the paper's attack over-credits the defense, report the worst case.
- ``eps_covers_box``: the threat model's radius reaches across the whole pixel box (Linf eps >= 1, L2 eps
  >= the box's diagonal): the "attack" may replace an image by any other, so robust accuracy is
  meaningless as a robustness figure.
- ``probability_outputs``: the model returns probabilities (a softmax last layer: outputs in [0, 1]
  summing to 1), as AutoAttack's checks warn: cross-entropy on them saturates and its gradients nearly
  vanish, so the attacks are weak; attack the logits (remove the softmax).
"""

from __future__ import annotations

import math
import warnings

import torch

SMALL_BATCH = 16


def _record(name: str, warning: bool, message: str, **extra) -> dict:
    return {"check": name, "warning": bool(warning), "message": message, **extra}


def adapted_without_statistics(rho: float | None, through_stats: list[str]) -> dict:
    """Warn when an adapted model (``rho > 0``) was attacked without any attack through its statistics."""
    if rho is None or rho == 0:
        return _record("adapted_without_statistics", False, "no adaptation (rho 0 or none): nothing to go through")
    if through_stats:
        return _record("adapted_without_statistics", False,
                       f"attacks through the batch statistics: {', '.join(through_stats)}")
    return _record("adapted_without_statistics", True,
                   f"the deployed model adapts to its batch (rho={rho:g}) but no attack went through its batch "
                   "statistics (only frozen surrogates or transfers); add the pgd/apgd attacks on the adapted model")


def batch_sizes(sizes: list[int], *, adapting: bool) -> dict:
    """Warn on a batch of one image, or on adapted batches of fewer than 16 images."""
    smallest = min(sizes) if sizes else 0
    if smallest <= 1:
        return _record("batch_of_one", True, "a batch held a single image: batch statistics are that image's own; "
                                             "use batches of many images", smallest=smallest)
    if adapting and smallest < SMALL_BATCH:
        return _record("batch_of_one", True, f"adapted batches of {smallest} images: the statistics are very noisy and "
                                             "the robust accuracy depends on which images share a batch",
                       smallest=smallest)
    return _record("batch_of_one", False, f"smallest batch {smallest} images", smallest=smallest)


def vanishing_gradients(zero_counts: dict[str, int], n_images: int) -> dict:
    """Warn when any attack met images (still correct) with an exactly zero input gradient at its first step."""
    bad = {k: v for k, v in zero_counts.items() if v}
    if not bad:
        return _record("vanishing_gradients", False, "every attack had a non-zero input gradient for every image "
                                                     "still correctly classified at its first step", counts=zero_counts)
    worst = max(bad, key=bad.get)
    return _record("vanishing_gradients", True,
                   f"zero input gradients at the first step: {', '.join(f'{k} {v}' for k, v in bad.items())} "
                   f"image(s) of {n_images} (e.g. {worst}); gradient-based attacks cannot move them, so their "
                   "robustness may be over-credited", counts=zero_counts)


def worst_below_paper(paper: dict | None, worst: dict | None, *, paper_name: str, margin: float = 0.01) -> dict:
    """Warn when the worst case is lower than the paper-style attack by more than ``max(margin, its 2 sd)``."""
    if paper is None or worst is None:
        return _record("worst_below_paper", False, "no paper-style attack to compare with")
    gap = paper["mean"] - worst["mean"]
    tol = max(margin, paper.get("two_sd", 0.0))
    if gap > tol:
        return _record("worst_below_paper", True,
                       f"the worst case over all attacks ({100 * worst['mean']:.1f}%) is {100 * gap:.1f} points below "
                       f"the paper-style {paper_name} ({100 * paper['mean']:.1f}%): that attack over-credits the "
                       "defense; report the worst case", gap=gap)
    return _record("worst_below_paper", False, f"worst case within {100 * max(gap, 0):.1f} points of {paper_name}",
                   gap=gap)


def looks_like_probabilities(outputs: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether a batch of model outputs looks like probabilities: every value in [0, 1], rows summing to 1."""
    o = outputs.detach().float()
    return bool(o.numel() and o.min() >= 0 and o.max() <= 1 and ((o.sum(-1) - 1).abs() <= tol).all())


def probability_outputs(batches_with_probabilities: int, batches: int) -> dict:
    """Warn when the model's clean outputs looked like probabilities (softmax) on any batch."""
    if batches_with_probabilities:
        return _record("probability_outputs", True,
                       f"the model's outputs are probabilities (in [0, 1], summing to 1) on {batches_with_probabilities} "
                       f"of {batches} batch(es): a softmax last layer saturates the cross-entropy and its gradients "
                       "nearly vanish, so the attacks are weak; attack a model that returns logits (drop the softmax)",
                       batches=batches_with_probabilities)
    return _record("probability_outputs", False, "the model returns logits (not probabilities)", batches=0)


def eps_covers_box(threat: dict, image_shape) -> dict:
    """Warn when the threat model's radius spans the whole pixel box [0, 1] (``threat``: ``Threat.describe()``)."""
    eps, norm = float(threat["eps"]), threat["threat_model"]
    dims = math.prod(int(d) for d in image_shape) if image_shape else None
    span = 1.0 if norm == "linf" else (math.sqrt(dims) if dims else None)
    if threat.get("constraint") == "unconstrained" or span is None or eps < span:
        return _record("eps_covers_box", False, f"{norm} eps {eps:g} is inside the pixel box's span", eps=eps)
    what = "1 (the box's width)" if norm == "linf" else f"{span:.4g} (the box's diagonal, sqrt of {dims} values)"
    return _record("eps_covers_box", True,
                   f"{norm} eps {eps:g} is at least {what}: the threat model is the whole pixel box, so an attack may "
                   "turn an image into any other and robust accuracy measures nothing; use the eps of the model's "
                   "threat model (e.g. 8/255 Linf, 0.5 L2 on CIFAR-10)", eps=eps)


def emit(records: list[dict]) -> None:
    """Issue a Python warning for every record that warns (the CLI prints them instead)."""
    for r in records:
        if r["warning"]:
            warnings.warn(f"{r['check']}: {r['message']}", stacklevel=3)
