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
- :func:`stream_adapt` (online, docs/stream.md): every layer keeps a running estimate of the test
  statistics over a stream of batches (down to one image): an exponential moving average, a sliding
  window of the last W images, or Schneider et al.'s prior (training statistics as N pseudo-images).
  Each batch is first added to the estimate, then classified with it. :meth:`StreamAdapted.snapshot`
  freezes the current estimate into an adapt-then-freeze model.

``robust="median"|"trimmed"`` (per-batch and online; :mod:`bnadapt.robust_stats`) replaces the test
mean and variance by robust, Gaussian-consistent ones (MedBN-style, beyond the paper).
"""

from bnadapt.adapt.layer import INTERPOLATIONS, AdaptiveBatchNorm, bn_layers, check_model
from bnadapt.adapt.modes import (
    StreamAdapted, adapt, adapt_then_freeze, adapt_then_freeze_on, is_adapted, noisy_batches, stream_adapt, to_plain,
)
from bnadapt.adapt.online import ESTIMATORS
from bnadapt.errors import check_rho

__all__ = [
    "ESTIMATORS", "INTERPOLATIONS", "AdaptiveBatchNorm", "StreamAdapted", "adapt", "adapt_then_freeze",
    "adapt_then_freeze_on", "bn_layers", "check_model", "check_rho", "is_adapted", "noisy_batches", "stream_adapt",
    "to_plain",
]
