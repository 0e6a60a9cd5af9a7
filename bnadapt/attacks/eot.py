"""EoT-PGD as in the paper (Nandy et al., Appendix E, Eq. 3): the attack the paper reports for adapted models.

For a test batch ``x`` the attacker builds ``m`` classifiers ``f_1 .. f_m`` with
:func:`bnadapt.adapt.adapt_then_freeze` (the one adaptation mechanism) at the deployed ``rho``, each on
the batch perturbed by its own random ``delta`` from the threat model (uniform in the Linf cube / L2
ball, clipped to [0, 1]): "a proxy for the adversarial perturbations". They stay frozen during the
attack. PGD then follows the gradient of the paper's Eq. 3 loss
``-log((1/m) sum_i softmax(f_i(x + delta))_y)`` (:func:`~bnadapt.attacks.losses.eot_nll`, log outside
the mean; the ``m`` forwards and one backward per step cost ``m`` plain PGD steps). Images' best
iterates are judged by the ensemble (its mean softmax); the final batch is chosen among the candidate
batches by the deployed model, the per-batch adapted ``adapt(model, rho)``.

The gradient never goes through the statistics of the batch being attacked: the surrogates' statistics
are those of randomly perturbed copies of the clean batch. That is why this is an approximation (and
why ``bnadapt attack`` also runs attacks through the statistics and reports the worst case).

With ``m = 1`` and ``rho = 0`` the surrogate is the model itself (training statistics) and the attack
equals plain PGD with the same generator, bit for bit: the surrogates draw their deltas from a
generator derived from the attack generator's seed, never from the attack generator itself.
"""

from __future__ import annotations

import torch
from torch import nn

from bnadapt.attacks.losses import eot_nll
from bnadapt.attacks.pgd import AttackOutput, Ensemble, PGD, preserved_state
from bnadapt.attacks.threat import Threat
from bnadapt.errors import check_count, check_rho
from bnadapt.runs import derive_seed

EOT_KEY = 31_337  # seed key of the surrogates' random deltas


class EoTPGD:
    """The paper's EoT-PGD with ``m`` frozen surrogate classifiers (see the module docstring)."""

    name = "eot-pgd"

    def __init__(self, threat: Threat, *, m: int = 10, rho: float = 1.0, steps: int = 100,
                 step_size: float | None = None, restarts: int = 1, random_start: bool = True,
                 keep_best: bool = True, interpolate: str = "std"):
        self.m = check_count(m, "m (EoT models)", hint="the paper uses m in {1, 5, 10}")
        self.rho = check_rho(rho)
        self.interpolate = interpolate
        self.pgd = PGD.from_threat(threat, steps=steps, step_size=step_size, random_start=random_start,
                                   restarts=restarts, loss=eot_nll, keep_best=keep_best)
        self.threat = self.pgd.threat

    def __repr__(self) -> str:
        return f"EoTPGD(m={self.m}, rho={self.rho:g}, {self.pgd!r})"

    def describe(self) -> dict:
        d = self.pgd.describe()
        d.update(attack="eot-pgd", m=self.m, rho=self.rho,
                 surrogates=f"{self.m} x adapt_then_freeze(model, clip(x + delta_i), rho) with delta_i uniform in "
                            "the threat set, frozen during the attack (paper Appendix E)")
        return d

    @torch.no_grad()
    def surrogates(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> Ensemble:
        """The ``m`` frozen classifiers for batch ``x`` (deltas from a generator derived from ``generator``)."""
        from bnadapt.adapt import adapt_then_freeze

        dev = generator.device if generator is not None else x.device
        if generator is not None:
            seed = derive_seed(generator.initial_seed(), EOT_KEY)
        else:
            seed = int(torch.randint(0, 2**62, (1,)))
        g = torch.Generator(device=dev).manual_seed(seed)
        with preserved_state(model):
            members = [adapt_then_freeze(model, self.threat.start(x, g), self.rho, interpolate=self.interpolate)
                       for _ in range(self.m)]
        return Ensemble(members).eval()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None = None,
            judge: nn.Module | None = None) -> AttackOutput:
        """Attack batch ``(x, y)`` of the plain ``model`` deployed as ``judge`` (default: the per-batch
        adapted ``adapt(model, rho)``)."""
        from bnadapt.adapt import adapt

        if judge is None:
            judge = adapt(model, self.rho, interpolate=self.interpolate)
        ensemble = self.surrogates(model, x.detach(), generator)
        return self.pgd.run(ensemble, x, y, generator=generator, judge=judge)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return self.run(model, x, y, generator=generator).x_adv
