"""Adversarial attacks and the adversarial evaluation of adapted models (paper Table 2, Table 7, Appendix E).

- :mod:`~bnadapt.attacks.threat`: Linf/L2 threat models and their geometry (one place for every attack).
- :mod:`~bnadapt.attacks.losses`: the ``loss=`` hook: cross-entropy, DLR, the paper's Eq. 3, poisoning.
- :mod:`~bnadapt.attacks.pgd`: PGD on whole batches; best iterates, restarts, the judge; model-state
  preservation; :func:`accuracy_under_attack` (the model cards' PGD-20 figure).
- :mod:`~bnadapt.attacks.apgd`: APGD-CE / APGD-DLR / APGD-T (Croce & Hein 2020).
- :mod:`~bnadapt.attacks.eot`: the paper's EoT-PGD over ``m`` adapted-then-frozen classifiers.
- :mod:`~bnadapt.attacks.poison`: batch poisoning through the shared statistics (Wu et al. 2023).
- :mod:`~bnadapt.attacks.evaluate`: the protocol (``bnadapt attack``): every attack's final batch fed to
  the deployed model, per-attack and per-image worst-case robust accuracy; :mod:`~bnadapt.attacks.checks`.
"""

from bnadapt.attacks.apgd import APGD, apgd_ce, apgd_dlr, apgd_t
from bnadapt.attacks.eot import EoTPGD
from bnadapt.attacks.losses import correct, cross_entropy, dlr, eot_nll, margin, poison_margin
from bnadapt.attacks.pgd import (
    PGD, AttackOutput, BatchAttack, Ensemble, L2PGD, L2ProjectedGradientDescentAttack, LinfPGD,
    LinfProjectedGradientDescentAttack, accuracy_under_attack, judge_batch, make_pgd, preserved_state,
)
from bnadapt.attacks.threat import THREAT_MODELS, Threat, ThreatModel, make_threat, threat_model

__all__ = [
    "APGD", "AttackOutput", "BatchAttack", "EoTPGD", "Ensemble", "L2PGD", "L2ProjectedGradientDescentAttack",
    "LinfPGD", "LinfProjectedGradientDescentAttack", "PGD", "THREAT_MODELS", "Threat", "ThreatModel",
    "accuracy_under_attack", "apgd_ce", "apgd_dlr", "apgd_t", "correct", "cross_entropy", "dlr", "eot_nll", "judge_batch",
    "make_pgd", "make_threat", "margin", "poison_margin", "preserved_state", "threat_model",
]
