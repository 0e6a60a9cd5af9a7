"""The adversarial evaluation of adapted models (``bnadapt attack``; paper Table 2, Table 7, Appendix E).

**The deployed defense** is the per-batch adapted model ``adapt(model, rho)`` at batch size ``B``: an
image's prediction depends on the other images of its batch. One run of the protocol shuffles the
images with the stream ``(seed, run)`` (the same order as :func:`bnadapt.noise.accuracy`), cuts them into
batches of ``B`` (:func:`~bnadapt.runs.batch_slices`), and on every batch runs:

- **without adaptation** (Table 2, "w/o adapt. BN"; the model in eval mode): ``pgd`` (PGD, ``steps``
  iterations, ``restarts``, best iterates), ``apgd-ce``, ``apgd-dlr``, and on request ``apgd-t``
  (APGD-T: the targeted DLR loss, one APGD run per target class, 9 targets capped at classes - 1,
  about 9 times APGD's cost; needs >= 4 classes);
- **with adaptation**: ``eot-pgd-m<m>`` (the paper's EoT-PGD, Eq. 3, for each ``m``; Table 7),
  ``pgd-through-stats``, ``apgd-ce-through-stats``, ``apgd-dlr-through-stats`` and on request
  ``apgd-t-through-stats`` (full white box: the attacked model is the deployed per-batch model and
  gradients flow through the batch statistics; APGD-T's targets come from the deployed model's logits
  of the clean batch), and ``transfer:<attack>`` (each no-adaptation attack's final batch, no extra cost).

Every attack forwards whole batches and returns one final batch; **robust accuracy is measured by
feeding that batch to the deployed model** (the plain model for the no-adaptation attacks). An image is
robust in the **worst case** only if the clean batch and every attack's final batch (each evaluated as a
batch) leave it correctly classified. Every batch of every run is an independent unit with its own
seeded generators ``(seed, run, batch, attack)``, written to a resumable row file (:mod:`bnadapt.rowfile`),
so runs resume, shard (``shard=(i, N)``) and split over torchrun ranks with results identical to one
process. Tables report the mean and two sample standard deviations over runs, as the paper does.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bnadapt.attacks import checks
from bnadapt.attacks.apgd import APGD, TARGETED
from bnadapt.attacks.eot import EoTPGD
from bnadapt.attacks.losses import correct, cross_entropy, dlr, margin
from bnadapt.attacks.pgd import PGD, judge_batch
from bnadapt.attacks.threat import Threat, check_eps, rows, threat_model
from bnadapt.errors import check, check_batch_size, check_count, check_rho, check_seed, check_unique
from bnadapt.results import Result, make_inputs
from bnadapt.rowfile import parse_shard, run_units, run_units_distributed
from bnadapt.runs import (autocast, batch_slices, check_precision, generator, device_copy, progress_note, resolve_device,
                          to_device, world)

DEFAULT_IMAGES = 2000
DEFAULT_PER_CLASS = 200
DEFAULT_BATCH = 500
DEFAULT_STEPS = 100
DEFAULT_RUNS = 3
DEFAULT_EOT_M = (10,)
PLAIN_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t")
"""Every no-adaptation attack ``--no-adapt-attacks`` accepts."""
ADAPTED_ATTACKS = ("eot", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "transfer")
"""Every adapted attack ``--attacks`` accepts (``pgd``/``apgd-*``: through the statistics)."""
DEFAULT_PLAIN_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr")
DEFAULT_ADAPTED_ATTACKS = ("eot", "pgd", "apgd-ce", "apgd-dlr", "transfer")
THROUGH_STATS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t")
STEP_RULE = "eps / 4"


@dataclass(frozen=True)
class Protocol:
    """What ``bnadapt attack`` runs (see the module docstring). ``step_size=None``: ``eps / 4`` for
    every PGD (measured strongest of 2.5 eps/steps, eps/10, eps/4 on the zoo's L2 model; equal on Linf)."""

    rho: float = 1.0
    batch_size: int = DEFAULT_BATCH
    runs: int = DEFAULT_RUNS
    steps: int = DEFAULT_STEPS
    step_size: float | None = None
    restarts: int = 1
    eot_m: tuple[int, ...] = DEFAULT_EOT_M
    plain: tuple[str, ...] = DEFAULT_PLAIN_ATTACKS
    adapted: tuple[str, ...] = DEFAULT_ADAPTED_ATTACKS
    interpolate: str = "std"

    def validated(self) -> "Protocol":
        plain = tuple(check_unique(list(self.plain), "no-adaptation attacks")) if self.plain else ()
        adapted = tuple(check_unique(list(self.adapted), "adapted attacks")) if self.adapted else ()
        for a in plain:
            check(a in PLAIN_ATTACKS, f"unknown no-adaptation attack {a!r}; choose from {', '.join(PLAIN_ATTACKS)}")
        for a in adapted:
            check(a in ADAPTED_ATTACKS, f"unknown adapted attack {a!r}; choose from {', '.join(ADAPTED_ATTACKS)}")
        check(plain or adapted, "no attack selected; choose at least one")
        ms = tuple(check_unique([check_count(m, "m (EoT models)", hint="the paper uses m in {1, 5, 10}")
                                 for m in self.eot_m], "EoT m values")) if "eot" in adapted else ()
        step = None if self.step_size is None else check_eps(self.step_size, "step size")
        return Protocol(rho=check_rho(self.rho),
                        batch_size=check_batch_size(self.batch_size, "batch size", adapting=bool(adapted)),
                        runs=check_count(self.runs, "runs"), steps=check_count(self.steps, "attack steps"),
                        step_size=step, restarts=check_count(self.restarts, "restarts"), eot_m=ms, plain=plain,
                        adapted=adapted, interpolate=self.interpolate)

    def step(self, threat: Threat) -> float:
        return self.step_size if self.step_size is not None else threat.eps / 4


def attack_names(p: Protocol) -> tuple[list[str], list[str]]:
    """Names of the no-adaptation and the adapted attacks, in the order they run."""
    plain = list(p.plain)
    adapted = [f"eot-pgd-m{m}" for m in p.eot_m] if "eot" in p.adapted else []
    adapted += [f"{a}-through-stats" for a in THROUGH_STATS if a in p.adapted]
    if "transfer" in p.adapted:
        adapted += [f"transfer:{a}" for a in plain]
    return plain, adapted


def paper_attack(p: Protocol) -> str | None:
    """The attack of the paper's Table 2 (EoT-PGD with m = 10, else the largest m run)."""
    if "eot" not in p.adapted:
        return None
    return f"eot-pgd-m{10 if 10 in p.eot_m else max(p.eot_m)}"


def make_attack(name: str, threat: Threat, p: Protocol):
    """The attack object for a name of :func:`attack_names` (transfers have none)."""
    base = name.replace("-through-stats", "")
    if base == "pgd":
        return PGD.from_threat(threat, steps=p.steps, step_size=p.step(threat), restarts=p.restarts,
                               loss=cross_entropy, keep_best=True)
    if base in ("apgd-ce", "apgd-dlr"):
        return APGD(threat, steps=p.steps, restarts=p.restarts, loss=dlr if base == "apgd-dlr" else cross_entropy)
    if base == "apgd-t":
        return APGD(threat, steps=p.steps, restarts=p.restarts, loss=TARGETED)
    if base.startswith("eot-pgd-m"):
        return EoTPGD(threat, m=int(base[len("eot-pgd-m"):]), rho=p.rho, steps=p.steps, step_size=p.step(threat),
                      restarts=p.restarts, keep_best=True, interpolate=p.interpolate)
    raise AssertionError(name)


def attack_key(name: str) -> int:
    """The seed key of an attack's generator (stable across versions)."""
    return zlib.crc32(name.encode())


def model_threat(loaded, norm: str | None = None, eps: float | None = None) -> Threat:
    """The threat model of ``loaded``: ``norm``/``eps`` when given, else its card's training recipe."""
    recipe = loaded.card.get("recipe") or {}
    norm = norm if norm is not None else recipe.get("threat_model")
    eps = eps if eps is not None else recipe.get("eps")
    check(norm is not None and eps is not None,
          f"model {loaded.name} has no threat model in its card; pass --threat linf|l2 and --eps")
    return Threat(threat_model(norm), check_eps(eps, "--eps"))


def run_batches(indices: np.ndarray, batch_size: int, seed: int, runs: int) -> list[list[np.ndarray]]:
    """Per run, the image indices of each batch (shuffled with the stream ``(seed, run)``)."""
    out = []
    for r in range(runs):
        order = indices[torch.randperm(len(indices), generator=generator(seed, r)).numpy()]
        out.append([order[sl] for sl in batch_slices(len(order), batch_size)])
    return out


def bits(mask: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.detach().cpu().tolist())


def unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


def _unit(ctx: dict, unit: tuple) -> dict:
    """One batch: clean, every attack, each final batch fed to the deployed model (see the module docstring)."""
    k, r, b = unit
    p, dev, seed = ctx["protocol"], ctx["device"], ctx["seed"]
    threat, plain, deployed = ctx["threats"][k], ctx["nets"][k], ctx["deployed"][k]
    idx = ctx["batches"][r][b]
    x, y = ctx["dataset"].get(idx)
    x, y = to_device(x, dev), y.to(dev)
    row = {"n": len(idx), "indices": [int(i) for i in idx], "labels": [int(v) for v in y.cpu()], "clean": {},
           "plain": {}, "adapted": {}, "zero_grad": {}, "seconds": {}, "winners": {}}
    finals, adapted_finals, oks = {}, {}, {}
    with autocast(dev, ctx["precision"]):
        with torch.no_grad():
            logits = plain(x)
        row["clean"]["plain"] = bits(correct(logits, y))
        row["probabilities"] = checks.looks_like_probabilities(logits)
        if deployed is not None:
            row["clean"]["adapted"] = bits(judge_batch(deployed, x, y))
        where = f"{ctx['model_names'][k]} run {r + 1} batch {b + 1}"
        for name in ctx["plain_names"]:
            progress_note(f"{where}: {name} (no adaptation)")
            t0 = time.perf_counter()
            out = make_attack(name, threat, p).run(plain, x, y, generator=generator(seed, r, b, attack_key(name),
                                                                                     device=dev))
            finals[name] = out.x_adv
            row["plain"][name] = bits(judge_batch(plain, out.x_adv, y))
            row["zero_grad"][f"no_adaptation/{name}"] = out.info["zero_grad"]
            row["winners"][f"no_adaptation/{name}"] = out.info["winners"]
            row["seconds"][f"no_adaptation/{name}"] = round(time.perf_counter() - t0, 4)
        for name in ctx["adapted_names"] if deployed is not None else []:
            progress_note(f"{where}: {name} (adaptive BN)")
            t0 = time.perf_counter()
            if name.startswith("transfer:"):
                x_adv = finals[name.split(":", 1)[1]]
            else:
                attack = make_attack(name, threat, p)
                gen = generator(seed, r, b, attack_key(name), device=dev)
                if isinstance(attack, EoTPGD):  # frozen surrogates of the plain model; judged by the deployed one
                    out = attack.run(plain, x, y, generator=gen, judge=deployed)
                else:  # through the statistics: the attacked model is the deployed per-batch model
                    out = attack.run(deployed, x, y, generator=gen, judge=deployed)
                x_adv = out.x_adv
                row["zero_grad"][f"adapted/{name}"] = out.info["zero_grad"]
                row["winners"][f"adapted/{name}"] = out.info["winners"]
            oks[name] = judge_batch(deployed, x_adv, y)
            adapted_finals[name] = x_adv
            row["adapted"][name] = bits(oks[name])
            row["seconds"][f"adapted/{name}"] = round(time.perf_counter() - t0, 4)
        if adapted_finals:
            progress_note(f"{where}: realizable worst case (adaptive BN)")
            t0 = time.perf_counter()
            _, ok, winner = realizable_batch(deployed, x, y, adapted_finals, oks, threat, p,
                                          generator=generator(seed, r, b, attack_key(REALIZABLE), device=dev))
            row["realizable"] = bits(ok)
            row["winners"][f"adapted/{REALIZABLE}"] = [winner]
            row["seconds"][f"adapted/{REALIZABLE}"] = round(time.perf_counter() - t0, 4)
    return row


REALIZABLE = "realizable"
"""The key of the realizable worst case (one batch per deployment) in rows and summaries."""


def refiner(threat: Threat, p: Protocol) -> PGD:
    """The refinement of the assembled batch: PGD through the statistics on the margin loss of the whole
    batch (fooled images pull their statistics' share too), moving the still-correct images only,
    the best whole batch kept by the judge, restarts as the protocol's."""
    return PGD.from_threat(threat, steps=p.steps, step_size=p.step(threat), restarts=p.restarts, loss=margin,
                           keep_best=True)


def realizable_batch(deployed, x, y, finals: dict, oks: dict, threat: Threat, p: Protocol, *, generator=None):
    """The realizable worst case of one test batch: ONE batch, judged as deployed.

    Candidates: every attack's final batch (``finals``, each judged as deployed: ``oks``), and their
    assembly (each image's perturbation from the strongest attack whose final batch fooled it, else
    from the strongest attack's batch) refined by :func:`refiner` on the deployed model. Returns the
    candidate with the fewest correct images (ties: the earlier candidate, singles first), the deployed
    model's per-image verdict on exactly that batch, and the candidate's name. By construction it is never weaker
    than any single attack on this batch: each single attack's batch is a candidate."""
    names = sorted(finals, key=lambda n: int(oks[n].sum()))  # strongest first (stable on ties)
    best_name = names[0]
    assembled = finals[best_name].clone()
    for n in reversed(names):  # the strongest attack that fooled an image writes it last
        assembled = torch.where(rows(~oks[n], x), finals[n], assembled)
    moved = judge_batch(deployed, assembled, y)
    out = refiner(threat, p).run(deployed, x, y, generator=generator, judge=deployed, movable=moved, start=assembled)
    cands = [(n, finals[n], oks[n]) for n in names] + [("assembled+refined", out.x_adv, out.correct)]
    name, batch, ok = min(cands, key=lambda c: int(c[2].sum()))
    return batch, ok, name


def _cell(accs: list[float]) -> dict:
    """Mean, 2 sample sd (the paper's ±), standard error of the mean (sd / sqrt(runs)) and the runs."""
    a = [float(v) for v in accs]
    sd = float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(np.mean(a)) if a else None, "two_sd": 2 * sd, "se": sd / math.sqrt(len(a)) if a else 0.0,
            "runs": a}


def summarize(rows: list[dict], *, model_names: list[str], threats: list[Threat], p: Protocol) -> dict:
    """Per model: clean, per-attack and worst-case robust accuracy (mean, 2 sd, per run) from the rows."""
    plain_names, adapted_names = attack_names(p)
    out = []
    for k, name in enumerate(model_names):
        mine = [r for r in rows if r["key"][0] == k]
        runs = sorted({r["key"][1] for r in mine})
        per_run: dict[str, list[float]] = {}
        zero: dict[str, int] = {}
        secs: dict[str, float] = {}
        winners: dict[str, dict[str, int]] = {}
        for r in runs:
            rr = [x for x in mine if x["key"][1] == r]
            for side, names in (("plain", plain_names), ("adapted", adapted_names)):
                clean = np.concatenate([unbits(x["clean"][side]) for x in rr]) if side in rr[0]["clean"] else None
                if clean is None:
                    continue
                per_run.setdefault(f"{side}/clean", []).append(float(clean.mean()))
                worst = clean.copy()
                for a in names:
                    ok = np.concatenate([unbits(x[side][a]) for x in rr])
                    per_run.setdefault(f"{side}/{a}", []).append(float(ok.mean()))
                    worst &= ok
                if names:
                    per_run.setdefault(f"{side}/worst", []).append(float(worst.mean()))
                if side == "adapted" and all(REALIZABLE in x for x in rr):
                    per_run.setdefault(f"adapted/{REALIZABLE}", []).append(
                        float(np.concatenate([unbits(x[REALIZABLE]) for x in rr]).mean()))
        for x in mine:
            for a, v in x["zero_grad"].items():
                zero[a] = zero.get(a, 0) + int(v or 0)
            for a, v in x["seconds"].items():
                secs[a] = round(secs.get(a, 0.0) + float(v), 3)
            for a, ws in x["winners"].items():
                for w in ws:
                    winners.setdefault(a, {}).setdefault(w, 0)
                    winners[a][w] += 1
        cell = lambda key: _cell(per_run[key]) if key in per_run else None  # noqa: E731, B023 (used in this iteration)
        through = [a for a in adapted_names if a.endswith("-through-stats")]
        out.append({
            "model": name, "threat": threats[k].describe(), "images_per_run": sum(x["n"] for x in mine if
                                                                                     x["key"][1] == (runs[0] if runs else 0)),
            "runs_done": len(runs), "paper_attack": paper_attack(p), "through_statistics": through,
            "clean": {"no_adaptation": cell("plain/clean"), "adapted": cell("adapted/clean")},
            "no_adaptation": {"attacks": {a: cell(f"plain/{a}") for a in plain_names},
                              "worst_case": cell("plain/worst") if plain_names else None},
            "adapted": {"attacks": {a: cell(f"adapted/{a}") for a in adapted_names},
                        "worst_case": cell("adapted/worst") if adapted_names and "adapted/clean" in per_run else None,
                        "realizable": cell(f"adapted/{REALIZABLE}")},
            "zero_grad": zero, "seconds": secs, "winners": winners,
        })
    return {"models": out}


def run_checks(summary: dict, rows: list[dict], p: Protocol, *, image_shape=None) -> list[dict]:
    """The warn-only checks of :mod:`bnadapt.attacks.checks` for every model."""
    recs = []
    sizes = [r["n"] for r in rows]
    adapting = bool(p.adapted)
    recs.append(checks.batch_sizes(sizes, adapting=adapting))
    for k, m in enumerate(summary["models"]):
        mine = [r for r in rows if r["key"][0] == k]
        recs.append(dict(checks.eps_covers_box(m["threat"], image_shape), model=m["model"]))
        recs.append(dict(checks.probability_outputs(sum(bool(r.get("probabilities")) for r in mine), len(mine)),
                         model=m["model"]))
        n = max(m["images_per_run"] * max(m["runs_done"], 1), 1)
        for rec in (checks.adapted_without_statistics(p.rho if adapting else None, m["through_statistics"]),
                    checks.vanishing_gradients(m["zero_grad"], n),
                    checks.worst_below_paper(m["adapted"]["attacks"].get(m["paper_attack"] or ""),
                                             m["adapted"]["worst_case"], paper_name=m["paper_attack"] or "")):
            recs.append(dict(rec, model=m["model"]))
    return recs


def rows_path(out_json: str | Path) -> Path:
    """``X.json`` -> the row file ``X.rows.jsonl`` beside it."""
    p = Path(out_json)
    check(p.name.endswith(".json") and len(p.name) > 5, f"--out {p} must end in .json (the rows go beside it)")
    return p.with_name(p.name[:-5] + ".rows.jsonl")


def attack_table(
    models: Sequence,
    sel,
    out_rows: str | Path,
    *,
    protocol: Protocol = Protocol(),
    threats: Sequence[Threat] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    quiet: bool = False,
) -> Result | None:
    """Run the protocol (module docstring) for every model (``LoadedModel``) on ``sel`` into the row file
    ``out_rows`` and return the result (under torchrun: rank 0; other ranks return None).

    ``threats``: one per model (default: each card's training threat model). Raises a one-line error,
    before any work, for bad input: an adapted attack on a model without BN or a TorchScript model,
    a batch size of 1 with adaptation, DLR on fewer than 3 classes (the targeted DLR of apgd-t: 4), and
    every invalid protocol value."""
    from bnadapt.adapt import adapt, check_model
    from bnadapt.models import check_model_on_data

    p = protocol.validated()
    seed = check_seed(seed)
    shard = parse_shard(shard)
    check(len(models) >= 1, "no model given; pass at least one --model")
    threats = list(threats) if threats is not None else [model_threat(m) for m in models]
    check(len(threats) == len(models), "give one threat model per model")
    dev = resolve_device(device)
    precision = check_precision(precision, dev)
    check(precision == "fp32", f"attacks run in fp32 (got precision {precision}): bf16/fp16 gradients are coarse and "
                               "would weaken the attack")
    t0 = time.time()
    nets, deployed = [], []
    for m in models:
        ncls = int(check_model_on_data(m, sel.image_shape, sel.num_classes))
        check(ncls >= 3 or not any("dlr" in a for a in p.plain + p.adapted),
              f"the DLR loss needs at least 3 classes ({m.name} has {ncls}); drop apgd-dlr")
        check(ncls >= 4 or "apgd-t" not in p.plain + p.adapted,
              f"the targeted DLR loss of apgd-t needs at least 4 classes ({m.name} has {ncls}); drop apgd-t")
        if p.adapted:
            check(not m.is_torchscript, f"model {m.name} is TorchScript; attacking the adapted model needs the eager "
                                        "model (a checkpoint, or a state dict with --arch); --attacks none attacks it without adaptation")
            check_model(m.model)
        net = device_copy(m.model, dev)
        nets.append(net)
        deployed.append(adapt(net, p.rho, interpolate=p.interpolate) if p.adapted else None)
    plain_names, adapted_names = attack_names(p)
    batches = run_batches(np.asarray(sel.indices), p.batch_size, seed, p.runs)
    units = [(k, r, b) for k in range(len(models)) for r in range(p.runs) for b in range(len(batches[r]))]
    attacks = {f"{k}:{a}": make_attack(a, threats[k], p).describe() for k in range(len(models))
               for a in plain_names + adapted_names if not a.startswith("transfer:")}
    inputs = make_inputs(models=[m.describe() for m in models], data=sel.describe(),
                         params={"protocol": asdict(p), "threats": [t.describe() for t in threats],
                                 "step_rule": STEP_RULE if p.step_size is None else "given", "attacks": attacks,
                                 "no_adaptation_attacks": plain_names, "adapted_attacks": adapted_names,
                                 "paper_attack": paper_attack(p)},
                         seed=seed, device=dev.type, precision=precision)
    ctx = dict(protocol=p, device=dev, seed=seed, threats=threats, nets=nets, deployed=deployed, batches=batches,
               dataset=sel.dataset, precision=precision, plain_names=plain_names, adapted_names=adapted_names,
               model_names=[m.name for m in models])
    header = {"experiment": "attack", "inputs": inputs, "units": [list(u) for u in units]}
    kw = dict(resume=resume, quiet=quiet, desc="attack", size=lambda u: len(batches[u[1]][u[2]]))
    do = lambda u: _unit(ctx, u)  # noqa: E731
    if world()[1] > 1:
        check(shard is None, "--shard and torchrun both split the work; use one of them")
        rows = run_units_distributed(out_rows, header, units, do, **kw)
        if rows is None:
            return None
    else:
        rows = run_units(out_rows, header, units, do, shard=shard, **kw)
    return result_from_rows(inputs, rows, units=len(units), out_rows=out_rows, shard=shard, wall_s=time.time() - t0)


def result_from_rows(inputs: dict, rows: list[dict], *, units: int, out_rows, shard=None, wall_s=None) -> Result:
    """The ``attack`` result from the rows (also what ``attack-merge`` uses)."""
    prm = inputs["params"]
    p = Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in prm["protocol"].items()})
    threats = [Threat(t["threat_model"], t["eps"]) for t in prm["threats"]]
    summary = summarize(rows, model_names=[m["name"] for m in inputs["models"]], threats=threats, p=p)
    summary["checks"] = run_checks(summary, rows, p, image_shape=(inputs.get("data") or {}).get("image_shape"))
    summary.update(rows_file=str(out_rows), units_done=len(rows), units=units, complete=len(rows) == units,
                   shard=list(shard) if shard else None)
    return Result("attack", inputs, summary, wall_s)
