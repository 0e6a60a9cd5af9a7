"""The batch-poisoning experiment (``bnadapt poison``): benign accuracy under batch poisoning
(:class:`~bnadapt.attacks.poison.BatchPoisoning`) against ``q``, ``rho``, the batch size, the
constraint and the robust statistic, beside references immune by construction (the model without
adaptation; adapted-then-frozen on trusted images). One batch of one setting of one run is a unit of
a resumable row file (:mod:`bnadapt.rowfile`: resume, shards, torchrun)."""

from __future__ import annotations

import time

import numpy as np

from bnadapt.adapt import adapt, adapt_then_freeze_on
from bnadapt.attacks.evaluate import model_threat, run_batches
from bnadapt.attacks.pgd import judge_batch
from bnadapt.attacks.poison import (CONSTRAINTS, POISON_LOSSES, ROBUSTS, SCHEDULES, STARTS, BatchPoisoning,
                                    n_poison)
from bnadapt.attacks.threat import Threat
from bnadapt.errors import (check, check_batch_size, check_choice, check_count, check_fraction, check_rho, check_seed,
                            check_unique)
from bnadapt.models.setup import setup_models
from bnadapt.noise import accuracy
from bnadapt.results import Result, make_inputs, runs_cell
from bnadapt.rowfile import parse_shard, run_units_split
from bnadapt.runs import autocast, generator, name_key, to_device

DEFAULT_QS = (0.01, 0.05, 0.1, 0.25)
DEFAULT_RHOS = (1.0, 0.5)
DEFAULT_BATCH_SIZES = (64, 512)
DEFAULT_IMAGES = 2048  # a multiple of 64 and 512: every batch is full
DEFAULT_TRUSTED = 2048


def _poison_unit(ctx: dict, unit: tuple) -> dict:
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
            gen = generator(ctx["seed"], r, b, bs, name_key(cons), round(q * 1e6), round(rho * 1e6), device=dev)
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
    dev, precision, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=device,
                                           precision=precision, adapting="all",
                                           needs="poisoning (it attacks the adapted model)")
    check(precision == "fp32", f"attacks run in fp32 (got precision {precision}): bf16/fp16 gradients are coarse and "
                               "would weaken the attack")
    t0 = time.time()
    deployed, plain = [], []
    for net in nets:
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
    rows = run_units_split(out_rows, header, units, do, shard=shard, **kw)
    if rows is None:  # another torchrun rank: rank 0 returns the result
        return None
    refs = []
    for m, net in zip(models, nets):
        ref = {"model": m.name, "no_adaptation": runs_cell([accuracy(net, sel.dataset, idx, batch_size=512, seed=seed,
                                                                     run=r, device=dev) for r in range(runs)])}
        if trusted is not None:
            frozen = adapt_then_freeze_on(net, trusted.dataset, trusted.indices, rho=1.0, batch_size=512, seed=seed,
                                          device=dev)
            ref["trusted_frozen"] = runs_cell([accuracy(frozen, sel.dataset, idx, batch_size=512, seed=seed, run=r,
                                                       device=dev) for r in range(runs)])
            ref["trusted_images"] = len(trusted)
        refs.append(ref)
    results = {"settings": _poison_summary(rows, models=[m.name for m in models], constraints=constraints,
                                           robusts=robusts, rhos=rhos, batch_sizes=batch_sizes, qs=qs),
               "references": refs, "rows_file": str(out_rows), "units_done": len(rows), "units": len(units),
               "complete": len(rows) == len(units), "shard": list(shard) if shard else None}
    return Result("poison", inputs, results, time.time() - t0)


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
    d = dict(label, batch_size=bs, clean=runs_cell(clean) if runs else None,
             poisoned={q: runs_cell(v) if v else None for q, v in pois.items()},
             drop={q: runs_cell(v) if v else None for q, v in drop.items()},
             poison_images_per_batch={q: n_poison(float(q), bs) for q in pois})
    if any(direct.values()):
        d.update(direct={q: runs_cell(v) if v else None for q, v in direct.items()},
                 transfer={q: runs_cell(v) if v else None for q, v in transfer.items()},
                 transfer_won=won, batches=len(mine))
    return d
