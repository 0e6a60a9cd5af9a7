"""Poisoning over time: an attacker who controls a fraction q of the images of a stream, against the
online estimators of :func:`bnadapt.adapt.stream_adapt` (docs/stream.md, "Poisoning the online
estimators"; ``bnadapt poison --online``).

Threat model. The stream is the i.i.d. stream of :func:`~bnadapt.stream.scenarios.make_stream` (its
seeded order and noise), classified in consecutive batches of ``B`` by one online model exactly as
:func:`~bnadapt.stream.evaluate.stream_evaluation` runs it. In **every** batch of at least 2 images the
attacker controls ``round(q B)`` of them (at least 1, at most ``B - 1``; random positions drawn per
batch from the seed, the same for every estimator and statistic: a paired comparison) and may change
those within the threat model around their own stream images (``"threat"``: the model's Linf/L2 ball,
clipped to [0, 1]) or anywhere in [0, 1] (``"unconstrained"``); the other, benign images are never
changed. White box: the attacker knows the model, the estimator and its current running estimate, and
the benign images and labels of the current batch (not of later batches).

The poisoner is :class:`~bnadapt.attacks.poison.BatchPoisoning` (its step schedule, loss, restarts,
and with robust statistics also the transfer from the plain ones) run on a
:class:`~bnadapt.attacks.poison.Replay` of the online model at batch ``t``: gradients reach the poison
through batch ``t``'s statistics as they enter the running estimate (ema and window: the update of the
estimate; prior: the batch's own statistics), the earlier batches, poison included, being the estimate
they left. It maximizes the loss of batch ``t``'s benign images (greedy in time: the carry-over of the
poison into later batches is not optimized, only suffered by the defender). The kept batch is then fed
to the online model itself and stays in its estimate (ema: decaying with ``momentum``; window: for
``W`` images; prior: nothing carried). The robust window has no gradient: its poison is the transfer
from the plain window only.

**Benign accuracy** = the online model's accuracy on the benign images of the poisoned stream, as
deployed; beside it the accuracy of the unpoisoned stream on the same images. ``q = 0`` is the
unpoisoned stream, exactly :func:`stream_evaluation`'s accuracy of that estimator.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from bnadapt.adapt import ESTIMATORS, stream_adapt
from bnadapt.attacks.poison import (CONSTRAINTS, POISON_LOSSES, ROBUSTS, SCHEDULES, STARTS, BatchPoisoning, Replay,
                                    n_poison)
from bnadapt.attacks.evaluate import model_threat
from bnadapt.attacks.threat import Threat
from bnadapt.errors import (check, check_batch_size, check_choice, check_count, check_float, check_rho, check_seed,
                            check_sigma, check_unique)
from bnadapt.models.setup import setup_models
from bnadapt.results import Result, make_inputs, runs_cell
from bnadapt.runs import Progress, generator, name_key
from bnadapt.stream.evaluate import online_slices
from bnadapt.stream.scenarios import NoiseCache, dataset_labels, make_stream, stream_batches
from bnadapt.tables import format_table, pct_cell

DEFAULT_QS = (0.0, 0.05, 0.1, 0.2)


def check_stream_q(q, name: str = "q (poisoned fraction)") -> float:
    """A poisoned fraction of a stream: 0 (the unpoisoned stream) <= q < 1."""
    return check_float(q, name, min=0.0, max=1.0, max_open=True)


def poisoned_stream(net, dataset, stream, batch_size: int, *, q: float, estimator: str, rho, robust: str | None,
                    threat: Threat | None, attack_kw: dict, online_kw: dict, transfer: bool = True, seed: int = 0,
                    constraint: str = "threat", device=None, return_images: bool = False) -> dict:
    """One stream classified by a fresh ``stream_adapt(net, rho, estimator=..., robust=...)`` in batches
    of ``batch_size``, with the attacker's ``q`` share of every batch poisoned (module docstring).
    Returns per-position arrays ``correct`` and ``poison`` (bool) and the crafting counts; with
    ``return_images`` also ``x``, the stream's images as fed (poison included) and ``x_clean``, as streamed."""
    dev = torch.device(device or "cpu")
    kw = dict(online_kw, robust=robust)
    deployed = stream_adapt(net, rho, estimator=estimator, **kw)
    robust_on = robust is not None
    direct = not (robust_on and estimator == "window")  # the robust window has no gradient
    surrogate = stream_adapt(net, rho, estimator=estimator, **dict(online_kw, robust=None)) \
        if robust_on and (transfer or not direct) else None
    L = len(stream)
    correct = np.zeros(L, dtype=bool)
    poison = np.zeros(L, dtype=bool)
    info = {"batches": 0, "transfer_won": 0}
    noise = NoiseCache(dataset.image_shape, stream.seed, stream.run)
    fed, clean = [], []
    for a, b, x, y in stream_batches(dataset, stream, online_slices(L, batch_size), device=dev, noise=noise):
        y = y.to(dev)
        if return_images:
            clean.append(x.detach().cpu().clone())
        pm = torch.zeros(b - a, dtype=torch.bool, device=dev)
        if q > 0 and b - a >= 2:
            attack = BatchPoisoning(threat, q=q, **attack_kw)
            # the same seed for every estimator and statistic: the same poison positions (paired)
            gen = generator(seed, stream.run, a, batch_size, name_key(constraint), round(q * 1e6), device=dev)
            out = attack.run(Replay(deployed), x, y, generator=gen,
                             surrogate=None if surrogate is None else Replay(surrogate), direct=direct)
            x, pm = out.x, out.poison
            info["batches"] += 1
            info["transfer_won"] += int(out.info.get("winner") == "transfer")
        with torch.no_grad():  # the kept batch enters the online models exactly as deployed
            correct[a:b] = (deployed(x).argmax(1) == y).cpu().numpy()
            if surrogate is not None:
                surrogate(x)
        poison[a:b] = pm.cpu().numpy()
        if return_images:
            fed.append(x.detach().cpu().clone())
    if return_images:
        info.update(x=torch.cat(fed), x_clean=torch.cat(clean))
    return {"correct": correct, "poison": poison, **info}


def stream_poison_table(
    models: Sequence,
    sel,
    *,
    qs: Sequence[float] = DEFAULT_QS,
    estimators: Sequence[str] = ("ema", "window", "prior"),
    robusts: Sequence[str] = ("none",),
    rhos: Sequence[float] = (1.0,),
    batch_sizes: Sequence[int] = (64,),
    constraints: Sequence[str] = ("threat",),
    threats=None,
    momentum: float = 0.01,
    window: int = 256,
    prior_n: float = 16.0,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce-correct",
    schedule: str = "cosine",
    start: str = "random",
    transfer: bool = True,
    sigma: float = 0.0,
    runs: int = 1,
    seed: int = 0,
    device=None,
    quiet: bool = False,
) -> Result:
    """Benign accuracy against ``q`` for every model x constraint x estimator x robust statistic x rho
    (ema, window; the prior sets its own) x batch size, over ``runs`` i.i.d. streams of the images of
    ``sel`` at noise ``sigma`` (module docstring). ``q = 0`` is the unpoisoned stream."""
    qs = check_unique([check_stream_q(q) for q in qs], "q values")
    estimators = check_unique([check_choice(e, ESTIMATORS, "estimator") for e in estimators], "estimators")
    robusts = check_unique([check_choice(r, ROBUSTS, "robust statistic") for r in robusts], "robust statistics")
    rhos = check_unique([check_rho(r) for r in rhos], "rho values")
    batch_sizes = check_unique([check_batch_size(b, "batch size", adapting=True) for b in batch_sizes], "batch sizes")
    constraints = check_unique([check_choice(c, CONSTRAINTS, "poison constraint") for c in constraints], "constraints")
    steps, restarts, runs = check_count(steps, "attack steps"), check_count(restarts, "restarts"), check_count(runs, "runs")
    check_choice(loss, POISON_LOSSES, "poisoning loss")
    check_choice(schedule, SCHEDULES, "poisoning step schedule")
    check_choice(start, STARTS, "poison start")
    seed, sigma, transfer = check_seed(seed), check_sigma(sigma), bool(transfer)
    check(len(models) >= 1, "no model given; pass at least one --model")
    check(dataset_labels(sel.dataset) is not None, "benign accuracy needs labels, but the data has none; use labeled data")
    online_kw = dict(momentum=momentum, window=window, prior_n=prior_n)
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(1)).eval()
    for e in estimators:  # validates the estimator options before any work
        stream_adapt(probe, None if e == "prior" else 1.0, estimator=e, **online_kw)
    if "threat" in constraints:
        threats = list(threats) if threats is not None else [model_threat(m) for m in models]
    else:
        threats = [None] * len(models)
    dev, _, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=device, adapting="all",
                                   needs="poisoning (it attacks the adapted model)")
    t0 = time.time()
    streams = [make_stream(sel, scenario="iid", sigma=sigma, seed=seed, run=r) for r in range(runs)]
    L = len(streams[0])
    attack_kw = dict(steps=steps, restarts=restarts, loss=loss, schedule=schedule, start=start)
    cfgs = [(e, rb, None if e == "prior" else rho) for e in estimators for rb in robusts
            for rho in (rhos if e != "prior" else rhos[:1])]
    settings = []
    total = len(models) * len(constraints) * len(cfgs) * len(batch_sizes) * runs * len(qs)
    with Progress(total * L, "stream poison", quiet=quiet) as bar:
        for k, m in enumerate(models):
            for cons in constraints:
                threat = threats[k] if cons == "threat" else Threat.box()
                for e, rb, rho in cfgs:
                    for bs in batch_sizes:
                        robust = None if rb == "none" else rb
                        per_q = {f"{q:g}": [] for q in qs}
                        clean_runs, drops = [], {f"{q:g}": [] for q in qs}
                        won, crafted = {f"{q:g}": 0 for q in qs}, {f"{q:g}": 0 for q in qs}
                        for stream in streams:
                            call = dict(estimator=e, rho=rho, robust=robust, threat=threat, attack_kw=attack_kw,
                                        online_kw=online_kw, transfer=transfer, seed=seed, constraint=cons,
                                        device=dev)
                            ref = poisoned_stream(nets[k], sel.dataset, stream, bs, q=0.0, **call)["correct"]
                            clean_runs.append(float(ref.mean()))
                            for q in qs:
                                got = ref_out = None
                                if q == 0:
                                    got, pmask = ref, np.zeros(L, dtype=bool)
                                else:
                                    ref_out = poisoned_stream(nets[k], sel.dataset, stream, bs, q=q, **call)
                                    got, pmask = ref_out["correct"], ref_out["poison"]
                                    won[f"{q:g}"] += ref_out["transfer_won"]
                                    crafted[f"{q:g}"] += ref_out["batches"]
                                benign = ~pmask
                                per_q[f"{q:g}"].append(float(got[benign].mean()))
                                drops[f"{q:g}"].append(float((ref[benign].astype(int) - got[benign]).mean()))
                                bar.update(L)
                        s = {"model": m.name, "constraint": cons, "estimator": e, "robust": rb, "rho": rho,
                             "batch_size": bs, "clean": runs_cell(clean_runs),
                             "poisoned": {q: runs_cell(v) for q, v in per_q.items()},
                             "drop": {q: runs_cell(v) for q, v in drops.items()},
                             "poison_images_per_batch": {f"{q:g}": (0 if q == 0 else n_poison(q, bs)) for q in qs},
                             "crafting": ("transfer from the plain window" if rb != "none" and e == "window" else
                                          "through the deployed statistics"
                                          + (" and transferred from the plain ones" if rb != "none" and transfer
                                             else "")),
                             "transfer_won": won, "poisoned_batches": crafted}
                        settings.append(s)
    params = {"qs": qs, "estimators": estimators, "robusts": robusts, "rhos": rhos, "batch_sizes": batch_sizes,
              "constraints": constraints, "momentum": float(momentum), "window": int(window),
              "prior_n": float(prior_n), "steps": steps, "restarts": restarts, "loss": loss, "schedule": schedule,
              "start": start, "transfer": transfer, "runs": runs, "sigma": sigma,
              "stream": {"scenario": "iid", "length": L, **streams[0].params},
              "step_rule": "eps / 4 (unconstrained: 0.25)" + (", cosine-decayed to 0" if schedule == "cosine" else ""),
              "threats": [t.describe() if t else None for t in threats],
              "attacker": "controls round(q B) (>= 1, <= B - 1) random positions of every stream batch of B >= 2; "
                          "white box incl. the current running estimate; maximizes the loss of the current batch's "
                          "benign images (greedy in time); the kept batch enters the running estimate",
              "poisoner": _describe_poisoner(attack_kw)}
    inputs = make_inputs(models=[m.describe() for m in models], data=sel.describe(), params=params, seed=seed,
                         device=dev.type, precision="fp32")
    results = {"settings": settings, "streams": [s.describe() for s in streams]}
    return Result("stream-poison", inputs, results, time.time() - t0)


def _describe_poisoner(attack_kw: dict) -> dict:
    d = BatchPoisoning(Threat.box(), q=0.5, **attack_kw).describe()
    for k in ("q", "eps", "threat_model", "step_size", "box", "constraint"):  # per constraint: params
        d.pop(k, None)
    d.update(objective="sum over the current batch's benign images of the loss of the online model replayed at "
                       "its current estimate (greedy in time)",
             judge="the online model at its current estimate; the kept batch enters it exactly as deployed")
    return d


def format_stream_poison_table(result: dict) -> str:
    """Benign accuracy against q per model, constraint, estimator, statistics, rho and batch size."""
    prm, res = result["inputs"]["params"], result["results"]
    qs = prm["qs"]
    head = (f"Benign top-1 accuracy (%) of online models on a poisoned stream of {prm['stream']['length']} images "
            f"(i.i.d., sigma {prm['sigma']:g}; the attacker controls a fraction q of every batch; {prm['steps']} "
            f"iterations, {prm['loss']} loss, {prm['schedule']} step), mean ± 2 sd over {prm['runs']} run(s); "
            "(change) = minus the unpoisoned stream on the same images, in points; q=0 = the unpoisoned stream")

    def lab(s):
        return {"ema": f"ema m={prm['momentum']:g}", "window": f"window W={prm['window']}",
                "prior": f"prior N={prm['prior_n']:g}"}[s["estimator"]]

    def cell(s, q):
        c, d = s["poisoned"][f"{q:g}"], s["drop"][f"{q:g}"]
        return pct_cell(c) + ("" if q == 0 else f" ({-100 * d['mean'] + 0.0:+.1f})")

    rows = [[s["model"], s["constraint"], lab(s), s["robust"], "b/(b+N)" if s["rho"] is None else f"{s['rho']:g}",
             str(s["batch_size"])] + [cell(s, q) for q in qs] for s in res["settings"]]
    return head + "\n" + format_table(["model", "poison constraint", "estimator", "statistics", "rho", "batch"]
                                      + [f"q={q:g}" for q in qs], rows)
