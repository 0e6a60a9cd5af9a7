"""Batch poisoning through the shared statistics (Wu et al. 2023, "Uncovering adversarial risks of
test-time adaptation"): a risk of per-batch adaptation beyond the paper.

The attacker controls ``k = max(1, round(q * B))`` images of each test batch of ``B`` (at random
positions, at most ``B - 1``) and changes only those, either within the threat model around their own
clean images (``constraint="threat"``) or anywhere in [0, 1] (``"unconstrained"``). The other, benign
images are untouched. The attacker knows the model, the adaptation and the benign images and their
labels (white box, the worst case Wu et al. study) and runs PGD on its own images, maximizing the
cross-entropy (or the capped margin :func:`~bnadapt.attacks.losses.poison_margin`, which measured weaker
on the zoo) summed over the benign images of the deployed per-batch model ``adapt(model, rho)``: the gradient reaches the poison
only through the batch statistics. The whole iterate batch with the fewest correct benign images is
kept (the attacker can evaluate it), and the reported **benign accuracy** is the deployed model's on
the benign images of that final batch.

A per-image model (``rho = 0``, or a model adapted-then-frozen on trusted data) is immune by
construction: its prediction of a benign image does not depend on the other images.
:func:`poison_table` measures the risk against ``q``, ``rho`` and the batch size, and these remedies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnadapt.attacks.losses import Loss, cross_entropy, loss_name, poison_margin
from bnadapt.attacks.pgd import PGD
from bnadapt.attacks.threat import Threat
from bnadapt.errors import check, check_count, check_fraction

CONSTRAINTS = ("threat", "unconstrained")
DEFAULT_KAPPA = 2.0


def n_poison(q: float, batch_size: int) -> int:
    """The attacker's images in a batch of ``batch_size``: ``round(q * B)``, at least 1, at most ``B - 1``."""
    return int(min(max(1, round(q * batch_size)), batch_size - 1))


@dataclass
class PoisonOutput:
    """The final batch, which images were the attacker's, and the deployed model's verdict per image."""

    x: torch.Tensor
    poison: torch.Tensor
    correct: torch.Tensor

    @property
    def benign_correct(self) -> int:
        return int((self.correct & ~self.poison).sum())

    @property
    def benign(self) -> int:
        return int((~self.poison).sum())


class BatchPoisoning:
    """PGD on the attacker's ``q`` share of a batch against the benign images (module docstring)."""

    def __init__(self, threat: Threat, *, q: float, steps: int = 100, step_size: float | None = None,
                 restarts: int = 1, loss: Loss | str = "ce", kappa: float = DEFAULT_KAPPA):
        self.q = check_fraction(q, "q (poisoned fraction)")
        if isinstance(loss, str):
            check(loss in ("margin", "ce"), f"unknown poisoning loss {loss!r}; choose margin or ce")
            loss = poison_margin(kappa) if loss == "margin" else cross_entropy
        self.loss = loss
        self.steps = check_count(steps, "attack steps")
        self.pgd = PGD.from_threat(threat, steps=self.steps, step_size=step_size if step_size is not None
                                   else threat.eps / 4, restarts=restarts, loss=loss, keep_best=True)
        self.threat = self.pgd.threat

    def describe(self) -> dict:
        d = self.pgd.describe()
        d.update(attack="batch-poisoning", q=self.q, loss=loss_name(self.loss),
                 poison_positions="round(q * B) (>= 1, <= B - 1) random positions per batch",
                 objective="sum over the benign images of the loss of the deployed per-batch model")
        return d

    def run(self, deployed: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            generator: torch.Generator | None = None) -> PoisonOutput:
        """Poison batch ``(x, y)`` of the deployed (per-batch adapted) model."""
        n = x.shape[0]
        check(n >= 2, "batch poisoning needs batches of at least 2 images")
        k = n_poison(self.q, n)
        gdev = generator.device if generator is not None else torch.device("cpu")
        pos = torch.randperm(n, generator=generator, device=gdev)[:k].to(x.device)
        poison = torch.zeros(n, dtype=torch.bool, device=x.device)
        poison[pos] = True
        out = self.pgd.run(deployed, x, y, generator=generator, judge=deployed, movable=poison, scored=~poison)
        return PoisonOutput(out.x_adv, poison, out.correct)


# ----------------------------------------------------------------------------------------- the experiment
DEFAULT_QS = (0.01, 0.05, 0.1, 0.25)
DEFAULT_RHOS = (1.0, 0.5)
DEFAULT_BATCH_SIZES = (64, 512)
DEFAULT_IMAGES = 2048  # a multiple of 64 and 512: every batch is full
DEFAULT_TRUSTED = 2048


def _key(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def _poison_unit(ctx: dict, unit: tuple) -> dict:
    import time

    from bnadapt.attacks.pgd import judge_batch
    from bnadapt.runs import autocast, generator, to_device

    k, c, i, j, r, b = unit
    rho, bs, cons = ctx["rhos"][i], ctx["batch_sizes"][j], ctx["constraints"][c]
    idx = ctx["batches"][bs][r][b]
    dev = ctx["device"]
    x, y = ctx["dataset"].get(idx)
    x, y = to_device(x, dev), y.to(dev)
    deployed = ctx["deployed"][k][i]
    threat = ctx["threats"][k] if cons == "threat" else Threat.box()
    row: dict = {"n": len(idx), "q": {}, "seconds": {}}
    with autocast(dev, ctx["precision"]):
        clean_ok = judge_batch(deployed, x, y)
        row["clean_correct"] = int(clean_ok.sum())
        for q in ctx["qs"]:
            t0 = time.perf_counter()
            attack = BatchPoisoning(threat, q=q, steps=ctx["steps"], restarts=ctx["restarts"], loss=ctx["loss"])
            gen = generator(ctx["seed"], r, b, bs, _key(cons), round(q * 1e6), round(rho * 1e6), device=dev)
            out = attack.run(deployed, x, y, generator=gen)
            row["q"][f"{q:g}"] = {"correct": out.benign_correct, "benign": out.benign, "poison": int(out.poison.sum()),
                                  "clean_correct": int((clean_ok & ~out.poison).sum())}
            row["seconds"][f"{q:g}"] = round(time.perf_counter() - t0, 4)
    return row


def poison_table(
    models,
    sel,
    out_rows,
    *,
    qs=DEFAULT_QS,
    rhos=DEFAULT_RHOS,
    batch_sizes=DEFAULT_BATCH_SIZES,
    constraints=CONSTRAINTS,
    threats=None,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    runs: int = 1,
    seed: int = 0,
    trusted=None,
    device=None,
    precision: str = "fp32",
    resume: bool = False,
    shard=None,
    quiet: bool = False,
):
    """Benign accuracy under batch poisoning for every model x constraint x rho x batch size x q (module
    docstring), with reference rows immune to poisoning: the model without adaptation, and (``trusted``,
    a Selection of images the user trusts, e.g. training images) adapted-then-frozen at rho 1 on them.

    Rows go to the resumable row file ``out_rows`` (units: one batch of one setting of one run; shards
    and torchrun as ``bnadapt attack``). Returns the result (rank 0 under torchrun; others None)."""
    import copy
    import time

    import numpy as np

    from bnadapt.adapt import adapt, adapt_then_freeze_on, check_model
    from bnadapt.attacks.evaluate import model_threat, run_batches
    from bnadapt.errors import check_batch_size, check_choice, check_rho, check_seed, check_unique
    from bnadapt.models import check_model_on_data
    from bnadapt.noise import accuracy
    from bnadapt.results import Result, make_inputs
    from bnadapt.rowfile import parse_shard, run_units, run_units_distributed
    from bnadapt.runs import check_precision, prepare_model, resolve_device, world

    qs = check_unique([check_fraction(q, "q (poisoned fraction)") for q in qs], "q values")
    rhos = check_unique([check_rho(r) for r in rhos], "rho values")
    batch_sizes = check_unique([check_batch_size(b, "batch size", adapting=True) for b in batch_sizes], "batch sizes")
    constraints = check_unique([check_choice(c, CONSTRAINTS, "poison constraint") for c in constraints], "constraints")
    steps, restarts, runs = check_count(steps, "attack steps"), check_count(restarts, "restarts"), check_count(runs, "runs")
    check_choice(loss, ("ce", "margin"), "poisoning loss")
    seed, shard = check_seed(seed), parse_shard(shard)
    check(len(models) >= 1, "no model given; pass at least one --model")
    if "threat" in constraints:
        threats = list(threats) if threats is not None else [model_threat(m) for m in models]
    else:
        threats = [None] * len(models)
    dev = resolve_device(device)
    precision = check_precision(precision, dev)
    check(precision == "fp32", f"attacks run in fp32 (got precision {precision}): bf16/fp16 gradients are coarse and "
                               "would weaken the attack")
    t0 = time.time()
    nets, deployed = [], []
    for m in models:
        check_model_on_data(m, sel.image_shape, sel.num_classes)
        check(not m.is_torchscript, f"model {m.name} is TorchScript; poisoning attacks the adapted model, which needs "
                                    "the eager model (a checkpoint, or a state dict with --arch)")
        check_model(m.model)
        net = prepare_model(copy.deepcopy(m.model), dev)
        nets.append(net)
        deployed.append([adapt(net, r) for r in rhos])
    idx = np.asarray(sel.indices)
    batches = {bs: run_batches(idx, bs, seed, runs) for bs in batch_sizes}
    units = [(k, c, i, j, r, b) for k in range(len(models)) for c in range(len(constraints)) for i in range(len(rhos))
             for j, bs in enumerate(batch_sizes) for r in range(runs) for b in range(len(batches[bs][r]))]
    attacks = {f"{m.name}:{c}": BatchPoisoning(threats[k] if c == "threat" else Threat.box(), q=qs[0], steps=steps,
                                               restarts=restarts, loss=loss).describe()
               for k, m in enumerate(models) for c in constraints}
    params = {"qs": qs, "rhos": rhos, "batch_sizes": batch_sizes, "constraints": constraints, "steps": steps,
              "restarts": restarts, "loss": loss, "runs": runs, "step_rule": "eps / 4 (unconstrained: 0.25)",
              "threats": [t.describe() if t else None for t in threats], "attacks": attacks,
              "trusted": None if trusted is None else trusted.describe()}
    inputs = make_inputs(models=[m.describe() for m in models], data=sel.describe(), params=params, seed=seed,
                         device=dev.type, precision=precision)
    ctx = dict(rhos=rhos, batch_sizes=batch_sizes, constraints=constraints, batches=batches, device=dev,
               dataset=sel.dataset, deployed=deployed, threats=threats, precision=precision, qs=qs, steps=steps,
               restarts=restarts, loss=loss, seed=seed)
    header = {"experiment": "poison", "inputs": inputs, "units": [list(u) for u in units]}
    kw = dict(resume=resume, quiet=quiet, desc="poison", size=lambda u: len(batches[batch_sizes[u[3]]][u[4]][u[5]]))
    do = lambda u: _poison_unit(ctx, u)  # noqa: E731
    if world()[1] > 1:
        check(shard is None, "--shard and torchrun both split the work; use one of them")
        rows = run_units_distributed(out_rows, header, units, do, **kw)
        if rows is None:
            return None
    else:
        rows = run_units(out_rows, header, units, do, shard=shard, **kw)
    refs = []
    for k, (m, net) in enumerate(zip(models, nets)):
        ref = {"model": m.name, "no_adaptation": _cell_of([accuracy(net, sel.dataset, idx, batch_size=512, seed=seed,
                                                                     run=r, device=dev) for r in range(runs)])}
        if trusted is not None:
            frozen = adapt_then_freeze_on(net, trusted.dataset, trusted.indices, rho=1.0, batch_size=512, seed=seed,
                                          device=dev)
            ref["trusted_frozen"] = _cell_of([accuracy(frozen, sel.dataset, idx, batch_size=512, seed=seed, run=r,
                                                       device=dev) for r in range(runs)])
            ref["trusted_images"] = len(trusted)
        refs.append(ref)
    results = {"settings": _poison_summary(rows, models=[m.name for m in models], constraints=constraints, rhos=rhos,
                                           batch_sizes=batch_sizes, qs=qs),
               "references": refs, "rows_file": str(out_rows), "units_done": len(rows), "units": len(units),
               "complete": len(rows) == len(units), "shard": list(shard) if shard else None}
    return Result("poison", inputs, results, time.time() - t0)


def _cell_of(accs) -> dict:
    from bnadapt.attacks.evaluate import _cell

    return _cell(accs)


def _poison_summary(rows, *, models, constraints, rhos, batch_sizes, qs) -> list[dict]:
    out = []
    for k, name in enumerate(models):
        for c, cons in enumerate(constraints):
            for i, rho in enumerate(rhos):
                for j, bs in enumerate(batch_sizes):
                    mine = [x for x in rows if x["key"][:4] == [k, c, i, j]]
                    runs = sorted({x["key"][4] for x in mine})
                    clean, pois = [], {f"{q:g}": [] for q in qs}
                    drop = {q: [] for q in pois}
                    for r in runs:
                        rr = [x for x in mine if x["key"][4] == r]
                        clean.append(sum(x["clean_correct"] for x in rr) / max(sum(x["n"] for x in rr), 1))
                        for q in pois:
                            benign = max(sum(x["q"][q]["benign"] for x in rr), 1)
                            pois[q].append(sum(x["q"][q]["correct"] for x in rr) / benign)
                            drop[q].append(sum(x["q"][q]["clean_correct"] - x["q"][q]["correct"] for x in rr) / benign)
                    out.append({"model": name, "constraint": cons, "rho": rho, "batch_size": bs,
                                "clean": _cell_of(clean) if runs else None,
                                "poisoned": {q: _cell_of(v) if v else None for q, v in pois.items()},
                                "drop": {q: _cell_of(v) if v else None for q, v in drop.items()},
                                "poison_images_per_batch": {q: n_poison(float(q), bs) for q in pois}})
    return out
