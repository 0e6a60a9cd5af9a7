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
:func:`poison_table` measures the risk against ``q``, ``rho``, the batch size and the robust statistic,
and these remedies.
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

    k, c, i, j, r, b, s = unit
    rho, bs, cons, robust = ctx["rhos"][i], ctx["batch_sizes"][j], ctx["constraints"][c], ctx["robusts"][s]
    idx = ctx["batches"][bs][r][b]
    dev = ctx["device"]
    x, y = ctx["dataset"].get(idx)
    x, y = to_device(x, dev), y.to(dev)
    deployed = ctx["deployed"][k][i][s]
    surrogate = ctx["plain"][k][i] if robust != "none" and ctx["transfer"] else None
    threat = ctx["threats"][k] if cons == "threat" else Threat.box()
    row: dict = {"n": len(idx), "q": {}, "seconds": {}}
    with autocast(dev, ctx["precision"]):
        clean_ok = judge_batch(deployed, x, y)
        row["clean_correct"] = int(clean_ok.sum())
        for q in ctx["qs"]:
            t0 = time.perf_counter()
            attack = BatchPoisoning(threat, q=q, **ctx["attack"])
            # the same seed for every robust statistic: the same poison positions, a paired comparison
            gen = generator(ctx["seed"], r, b, bs, _key(cons), round(q * 1e6), round(rho * 1e6), device=dev)
            out = attack.run(deployed, x, y, generator=gen, surrogate=surrogate)
            row["q"][f"{q:g}"] = {"correct": out.benign_correct, "benign": out.benign, "poison": int(out.poison.sum()),
                                  "clean_correct": int((clean_ok & ~out.poison).sum()), **out.info}
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
    robusts=("none",),
    threats=None,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce-correct",
    schedule: str = "cosine",
    start: str = "random",
    transfer: bool = True,
    runs: int = 1,
    seed: int = 0,
    trusted=None,
    device=None,
    precision: str = "fp32",
    resume: bool = False,
    shard=None,
    quiet: bool = False,
):
    """Benign accuracy under batch poisoning for every model x constraint x robust statistic x rho x
    batch size x q (module docstring), with reference rows immune to poisoning: the model without
    adaptation, and (``trusted``, a Selection of images the user trusts, e.g. training images)
    adapted-then-frozen at rho 1 on them.

    ``robusts``: the deployed model's test statistics, each of :data:`ROBUSTS` (``"none"``: the paper's
    mechanism; ``"median"``, ``"trimmed"``: :mod:`bnadapt.robust_stats`). On a robust deployment the
    poison is crafted through the robust statistics and (``transfer``) also against the plain ones,
    and the deployed model keeps the worse batch for the defender. ``loss``, ``schedule``, ``start``:
    the poisoner (:class:`BatchPoisoning`; ``loss="ce", schedule="constant"`` is the earlier one).

    Rows go to the resumable row file ``out_rows`` (units: one batch of one setting of one run; shards
    and torchrun as ``bnadapt attack``). Returns the result (rank 0 under torchrun; others None)."""
    import time

    import numpy as np

    from bnadapt.adapt import adapt, adapt_then_freeze_on, check_model
    from bnadapt.attacks.evaluate import model_threat, run_batches
    from bnadapt.errors import check_batch_size, check_rho, check_seed, check_unique
    from bnadapt.models import check_model_on_data
    from bnadapt.noise import accuracy
    from bnadapt.results import Result, make_inputs
    from bnadapt.rowfile import parse_shard, run_units, run_units_distributed
    from bnadapt.runs import check_precision, device_copy, resolve_device, world

    qs = check_unique([check_fraction(q, "q (poisoned fraction)") for q in qs], "q values")
    rhos = check_unique([check_rho(r) for r in rhos], "rho values")
    batch_sizes = check_unique([check_batch_size(b, "batch size", adapting=True) for b in batch_sizes], "batch sizes")
    constraints = check_unique([check_choice(c, CONSTRAINTS, "poison constraint") for c in constraints], "constraints")
    robusts = check_unique([check_choice(r, ROBUSTS, "robust statistic") for r in robusts], "robust statistics")
    steps, restarts, runs = check_count(steps, "attack steps"), check_count(restarts, "restarts"), check_count(runs, "runs")
    check_choice(loss, POISON_LOSSES, "poisoning loss")
    check_choice(schedule, SCHEDULES, "poisoning step schedule")
    check_choice(start, STARTS, "poison start")
    transfer = bool(transfer)
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
    nets, deployed, plain = [], [], []
    for m in models:
        check_model_on_data(m, sel.image_shape, sel.num_classes)
        check(not m.is_torchscript, f"model {m.name} is TorchScript; poisoning attacks the adapted model, which needs "
                                    "the eager model (a checkpoint, or a state dict with --arch)")
        check_model(m.model)
        net = device_copy(m.model, dev)
        nets.append(net)
        plain.append([adapt(net, r) for r in rhos])
        deployed.append([[p if rb == "none" else adapt(net, r, robust=rb) for rb in robusts]
                         for r, p in zip(rhos, plain[-1])])
    idx = np.asarray(sel.indices)
    batches = {bs: run_batches(idx, bs, seed, runs) for bs in batch_sizes}
    units = [(k, c, i, j, r, b, s) for k in range(len(models)) for c in range(len(constraints))
             for s in range(len(robusts)) for i in range(len(rhos)) for j, bs in enumerate(batch_sizes)
             for r in range(runs) for b in range(len(batches[bs][r]))]
    attack_kw = dict(steps=steps, restarts=restarts, loss=loss, schedule=schedule, start=start)
    attacks = {f"{m.name}:{c}": BatchPoisoning(threats[k] if c == "threat" else Threat.box(), q=qs[0],
                                               **attack_kw).describe()
               for k, m in enumerate(models) for c in constraints}
    params = {"qs": qs, "rhos": rhos, "batch_sizes": batch_sizes, "constraints": constraints, "robusts": robusts,
              "steps": steps, "restarts": restarts, "loss": loss, "schedule": schedule, "start": start,
              "transfer": transfer, "runs": runs,
              "step_rule": "eps / 4 (unconstrained: 0.25)" + (", cosine-decayed to 0" if schedule == "cosine" else ""),
              "threats": [t.describe() if t else None for t in threats], "attacks": attacks,
              "trusted": None if trusted is None else trusted.describe()}
    inputs = make_inputs(models=[m.describe() for m in models], data=sel.describe(), params=params, seed=seed,
                         device=dev.type, precision=precision)
    ctx = dict(rhos=rhos, batch_sizes=batch_sizes, constraints=constraints, robusts=robusts, batches=batches,
               device=dev, dataset=sel.dataset, deployed=deployed, plain=plain, threats=threats, precision=precision,
               qs=qs, attack=attack_kw, transfer=transfer, seed=seed)
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
    for m, net in zip(models, nets):
        ref = {"model": m.name, "no_adaptation": _cell_of([accuracy(net, sel.dataset, idx, batch_size=512, seed=seed,
                                                                     run=r, device=dev) for r in range(runs)])}
        if trusted is not None:
            frozen = adapt_then_freeze_on(net, trusted.dataset, trusted.indices, rho=1.0, batch_size=512, seed=seed,
                                          device=dev)
            ref["trusted_frozen"] = _cell_of([accuracy(frozen, sel.dataset, idx, batch_size=512, seed=seed, run=r,
                                                       device=dev) for r in range(runs)])
            ref["trusted_images"] = len(trusted)
        refs.append(ref)
    results = {"settings": _poison_summary(rows, models=[m.name for m in models], constraints=constraints,
                                           robusts=robusts, rhos=rhos, batch_sizes=batch_sizes, qs=qs),
               "references": refs, "rows_file": str(out_rows), "units_done": len(rows), "units": len(units),
               "complete": len(rows) == len(units), "shard": list(shard) if shard else None}
    return Result("poison", inputs, results, time.time() - t0)


def _cell_of(accs) -> dict:
    from bnadapt.attacks.evaluate import _cell

    return _cell(accs)


def _poison_summary(rows, *, models, constraints, robusts=("none",), rhos, batch_sizes, qs) -> list[dict]:
    """One entry per model x constraint x robust statistic x rho x batch size: clean and poisoned benign
    accuracy per q (mean over runs), the change against the clean accuracy of the same benign images,
    and for robust statistics with a transfer, each crafting's accuracy alone and how often the transfer
    was kept."""
    out = []
    for k, name in enumerate(models):
        for c, cons in enumerate(constraints):
            for s, robust in enumerate(robusts):
                for i, rho in enumerate(rhos):
                    for j, bs in enumerate(batch_sizes):
                        mine = [x for x in rows if x["key"][:4] == [k, c, i, j] and x["key"][6] == s]
                        out.append(_setting(mine, qs, bs, model=name, constraint=cons, robust=robust, rho=rho))
    return out


def _setting(mine: list[dict], qs, bs: int, **label) -> dict:
    runs = sorted({x["key"][4] for x in mine})
    clean, pois = [], {f"{q:g}": [] for q in qs}
    drop = {q: [] for q in pois}
    direct, transfer = {q: [] for q in pois}, {q: [] for q in pois}
    won = {q: 0 for q in pois}
    for r in runs:
        rr = [x for x in mine if x["key"][4] == r]
        clean.append(sum(x["clean_correct"] for x in rr) / max(sum(x["n"] for x in rr), 1))
        for q in pois:
            cells = [x["q"][q] for x in rr]
            benign = max(sum(v["benign"] for v in cells), 1)
            pois[q].append(sum(v["correct"] for v in cells) / benign)
            drop[q].append(sum(v["clean_correct"] - v["correct"] for v in cells) / benign)
            if all("transfer" in v for v in cells):
                direct[q].append(sum(v["direct"] for v in cells) / benign)
                transfer[q].append(sum(v["transfer"] for v in cells) / benign)
                won[q] += sum(v["winner"] == "transfer" for v in cells)
    d = dict(label, batch_size=bs, clean=_cell_of(clean) if runs else None,
             poisoned={q: _cell_of(v) if v else None for q, v in pois.items()},
             drop={q: _cell_of(v) if v else None for q, v in drop.items()},
             poison_images_per_batch={q: n_poison(float(q), bs) for q in pois})
    if any(direct.values()):
        d.update(direct={q: _cell_of(v) if v else None for q, v in direct.items()},
                 transfer={q: _cell_of(v) if v else None for q, v in transfer.items()},
                 transfer_won=won, batches=len(mine))
    return d
