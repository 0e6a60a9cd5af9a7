"""Cost and strength of the attacks of ``bnadapt attack``.

**Cost** (default). On one batch of Fashion-MNIST test images and the zoo's adv-linf-0.1 model (CPU:
channels_last, fp32), the time per iteration of

- plain PGD on the model in eval mode (the reference),
- the paper's EoT-PGD with ``m`` frozen surrogates (reference: ``m`` times plain PGD; target <= 1.1, i.e.
  no overhead beyond the ``m`` forward/backward passes),
- PGD through the batch statistics of the per-batch adapted model (rho 1) (reference: plain PGD).

A time per iteration is ``(t(2K) - t(K)) / K`` for attacks of ``2K`` and ``K`` iterations, so fixed
costs (random start, building the surrogates, judging the candidate batches) drop out. Each repeat
times every variant in a rotated order; figures are medians over repeats of the per-repeat ratios.

**Strength cross-check** (``--crosscheck N``): on N test images and adv-linf-0.1 without adaptation
(Linf eps 0.1), our PGD-100 (step eps/4) and APGD-CE against torchattacks 3.5.1's PGD (same step, 100
steps) and APGD (100 steps, CE), loaded only here from its wheel (``pip download torchattacks==3.5.1
--no-deps -d /tmp/ta``; never a dependency of bnadapt). The verdict compares the two from the same
random starts, so that only the algorithms differ: ours must fool every image torchattacks fools.
Runs with independent starts (``--seeds``) are reported too: one run's robust accuracy moves by a few
images with its starts, so two single runs' accuracies say little at this size.

**AutoAttack beside ours** (``--crosscheck N --against autoattack``): on the same N test images
and without adaptation, each zoo model at its card's threat model (adv-linf-0.1: Linf eps 0.1; adv-l2-1.5:
L2 eps 1.5), ours is ``bnadapt attack``'s per-image worst case without adaptation (clean, PGD-100,
APGD-CE, APGD-DLR and APGD-T with 9 targets; one run, batch 500, seed 0; also reported without APGD-T,
with each attack's seconds) and AutoAttack is the standard version of ``pyautoattack``
0.2.0 (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries; model in eval mode, inputs in [0, 1], seed 0),
run attack by attack on the images the previous attacks left robust, exactly as its own
``run_standard_evaluation`` does, so that what each extra attack newly fools beyond APGD-CE is known per
image. Reported per model: robust accuracy ours, AutoAttack standard, AutoAttack's APGD-CE alone, each
extra attack's newly fooled images, and the images only one side fools. Target: ours minus AutoAttack
<= 0.5 points. ``pyautoattack`` is a benchmark dependency only (never a dependency of bnadapt), installed
without its dependencies so that torch stays as pinned: ``pip download pyautoattack==0.2.0 --no-deps -d
/tmp/aa && .venv/bin/pip install --no-deps /tmp/aa/pyautoattack-0.2.0-py3-none-any.whl`` (it needs only
torch and numpy). Without it the cross-check is skipped with a one-line message. ``--crosscheck-out F``
writes the cross-check's figures and per-image disagreements to the JSON file F.

**Protocol wall time** (``--protocol N``): ``bnadapt attack`` with the Table 2 defaults (batch 500, 100
iterations, 3 runs, m 10) on the zoo's adv-linf-0.1 and adv-l2-1.5, on N images; the full protocol is
``bnadapt attack --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --out table2.json`` (2,000 images).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_attack.py [--m 10] [--batch-size 256] [--crosscheck 2000] [--seeds 2]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_attack.py --no-cost --crosscheck 500 --against autoattack \
        --threads 1 --crosscheck-out docs/autoattack_crosscheck.json

Last line: {"eot_over_m_pgd": <ratio>, "through_stats_over_pgd": <ratio>, ...}; with AutoAttack
{"ours_minus_autoattack": {"zoo:adv-linf-0.1": <points>, "zoo:adv-l2-1.5": <points>}, ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bnadapt.adapt import adapt
from bnadapt.attacks import APGD, PGD, EoTPGD, Threat, judge_batch
from bnadapt.data import select
from bnadapt.models import load_model
from bnadapt.runs import prepare_model, resolve_device, to_device


def timed(fn, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def cost(args, dev) -> dict:
    model = prepare_model(load_model("zoo:adv-linf-0.1").model, dev)
    sel = select("fashion-mnist", "test", images=args.batch_size)
    x, y = sel.dataset.get(sel.indices)
    x, y = to_device(x, dev), y.to(dev)
    threat = Threat("linf", 0.1)
    deployed = adapt(model, 1.0)
    k = args.iters

    def pgd(steps):
        return PGD.from_threat(threat, steps=steps, step_size=0.025, keep_best=True)

    def eot(steps):
        return EoTPGD(threat, m=args.m, rho=1.0, steps=steps, step_size=0.025)

    variants = {
        "pgd": lambda s: pgd(s).run(model, x, y, generator=torch.Generator(device=dev).manual_seed(0)),
        "eot": lambda s: eot(s).run(model, x, y, generator=torch.Generator(device=dev).manual_seed(0), judge=deployed),
        "through_stats": lambda s: pgd(s).run(deployed, x, y, generator=torch.Generator(device=dev).manual_seed(0)),
    }
    for fn in variants.values():  # warm-up
        fn(1)
    per_iter = {n: [] for n in variants}
    names = list(variants)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            t1 = timed(lambda: variants[n](k), dev)  # noqa: B023 (timed at once)
            t2 = timed(lambda: variants[n](2 * k), dev)  # noqa: B023 (timed at once)
            per_iter[n].append((t2 - t1) / k)
    eot_ratio = statistics.median(e / (args.m * p) for e, p in zip(per_iter["eot"], per_iter["pgd"]))
    ts_ratio = statistics.median(t / p for t, p in zip(per_iter["through_stats"], per_iter["pgd"]))
    med = {n: statistics.median(v) for n, v in per_iter.items()}
    print(f"adv-linf-0.1 (1x28x28), batch {args.batch_size}, device {dev}, threads {torch.get_num_threads()}, "
          f"{args.repeats} repeats of {k} vs {2 * k} iterations")
    print(f"  plain PGD                     {1000 * med['pgd']:8.1f} ms/iteration")
    print(f"  EoT-PGD, m={args.m:<3d}               {1000 * med['eot']:8.1f} ms/iteration   "
          f"= {eot_ratio:.3f} x (m x plain PGD)   target <= 1.1")
    print(f"  PGD through the statistics    {1000 * med['through_stats']:8.1f} ms/iteration   "
          f"= {ts_ratio:.3f} x plain PGD")
    return {"eot_over_m_pgd": round(eot_ratio, 4), "through_stats_over_pgd": round(ts_ratio, 4), "m": args.m,
            "batch_size": args.batch_size, "ms_per_iter": {n: round(1000 * v, 2) for n, v in med.items()}}


def crosscheck(args, dev) -> dict:
    """Our PGD-100 and APGD-CE against torchattacks 3.5.1's on adv-linf-0.1 (Linf 0.1, no adaptation).

    Same starts (the verdict): on the clean-correct images, batch by batch, both draw their random
    starts from the same seed (torchattacks from the global generator, ours from a generator seeded
    alike), so the only difference left is the algorithm. Ours must fool every image torchattacks
    fools (``only_theirs_fooled == 0``); APGD-CE, the same algorithm, should agree image for image.
    Independent starts (reported): each with its own random starts over ``seeds`` seeds on all
    images, the protocol a user runs; single runs differ by a few images with their starts."""
    sys.path.insert(0, str(args.torchattacks))
    import torchattacks  # noqa: E402 - the benchmark's own copy, never a dependency

    model = prepare_model(load_model("zoo:adv-linf-0.1").model, dev)
    sel = crosscheck_selection(args.crosscheck)
    eps = 0.1
    threat = Threat("linf", eps)
    attacks = ("pgd100", "apgd_ce")

    def ours(a):
        return (PGD.from_threat(threat, steps=100, step_size=eps / 4, keep_best=True) if a == "pgd100"
                else APGD(threat, steps=100, loss="ce"))

    def theirs(a, seed):
        return (torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=100, random_start=True) if a == "pgd100"
                else torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed))

    def robust(attack_x, xb, yb):
        adv = attack_x.detach()
        assert float((adv - xb).abs().max()) <= eps + 1e-6
        return judge_batch(model, adv, yb).cpu()

    batches = [(to_device(xb, dev), yb.to(dev)) for xb, yb in sel.dataset.batches(args.batch_size, sel.indices)]
    clean = [judge_batch(model, xb, yb) for xb, yb in batches]
    n = len(sel)
    acc = {"clean": sum(int(c.sum()) for c in clean) / n}
    # same starts, on the clean-correct images
    same = {}
    for a in attacks:
        o, t = [], []
        for s, ((xb, yb), c) in enumerate(zip(batches, clean)):
            xb, yb = xb[c], yb[c]
            gen = torch.Generator(device=dev).manual_seed(s)
            o.append(robust(ours(a).run(model, xb, yb, generator=gen).x_adv, xb, yb))
            torch.manual_seed(s)
            t.append(robust(theirs(a, s)(xb.contiguous(), yb), xb, yb))
        o, t = torch.cat(o), torch.cat(t)
        same[a] = {"images": int(o.numel()), "ours_robust": int(o.sum()), "torchattacks_robust": int(t.sum()),
                   "only_theirs_fooled": int((o & ~t).sum()), "only_ours_fooled": int((~o & t).sum())}
    ok = all(v["only_theirs_fooled"] == 0 for v in same.values())
    # independent starts, all images
    for a in attacks:
        accs = {"ours": [], "torchattacks": []}
        for seed in range(args.seeds):
            gen = torch.Generator(device=dev).manual_seed(1000 + seed)
            torch.manual_seed(1000 + seed)
            r_o = sum(int(robust(ours(a).run(model, xb, yb, generator=gen).x_adv, xb, yb).sum()) for xb, yb in batches)
            r_t = sum(int(robust(theirs(a, 1000 + seed)(xb.contiguous(), yb), xb, yb).sum()) for xb, yb in batches)
            accs["ours"].append(r_o / n)
            accs["torchattacks"].append(r_t / n)
        for who, v in accs.items():
            acc[f"{who}_{a}"] = statistics.mean(v)
            acc[f"{who}_{a}_seeds"] = v
    labels = dict(zip(attacks, ("PGD-100 (step eps/4)", "APGD-CE (100 iter.)")))
    print(f"strength cross-check, adv-linf-0.1, Linf eps {eps}, no adaptation (lower robust accuracy = stronger); "
          f"{n} images, clean {100 * acc['clean']:.1f}%")
    print("  same random starts, clean-correct images (the verdict: ours must fool every image torchattacks fools):")
    for a in attacks:
        v = same[a]
        print(f"    {labels[a]:21s} robust ours {v['ours_robust']}/{v['images']}  torchattacks "
              f"{v['torchattacks_robust']}/{v['images']}  only torchattacks fooled {v['only_theirs_fooled']}, "
              f"only ours fooled {v['only_ours_fooled']}")
    print(f"  independent random starts, all images, {args.seeds} seed(s) each (robust accuracy per seed):")
    for a in attacks:
        fo = ", ".join(f"{100 * v:.2f}" for v in acc[f"ours_{a}_seeds"])
        ft = ", ".join(f"{100 * v:.2f}" for v in acc[f"torchattacks_{a}_seeds"])
        print(f"    {labels[a]:21s} ours {fo}%  torchattacks {ft}%")
    print(f"  {'OK: ours no weaker' if ok else 'FAIL: torchattacks fools images ours does not from the same starts'}")
    return {"crosscheck_images": n, "crosscheck_seeds": args.seeds,
            "crosscheck": {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in acc.items()},
            "crosscheck_same_starts": same, "crosscheck_ok": ok}


def crosscheck_selection(n: int):
    """The cross-checks' images: N Fashion-MNIST test images, balanced over the 10 classes."""
    return select("fashion-mnist", "test", images=n, per_class=max(1, n // 10))


AUTOATTACK_MODELS = ("zoo:adv-linf-0.1", "zoo:adv-l2-1.5")


def clean_ours(rows: list[dict], pos: dict, n: int) -> torch.Tensor:
    """Per cross-check image: whether the clean batch of ``bnadapt attack``'s rows classifies it correctly."""
    from bnadapt.attacks.evaluate import unbits

    ok = torch.zeros(n, dtype=torch.bool)
    for row in rows:
        if "indices" in row:
            ok[torch.tensor([pos[i] for i in row["indices"]])] = torch.from_numpy(unbits(row["clean"]["plain"]).copy())
    return ok


def crosscheck_autoattack(args, dev) -> dict:
    """Ours (``bnadapt attack``'s per-image worst case without adaptation) beside standard AutoAttack
    (``pyautoattack`` 0.2.0) on the same images, per zoo model at its card's threat model (module docstring)."""
    try:
        import pyautoattack
        from pyautoattack import AutoAttack
    except ImportError:
        print("AutoAttack cross-check skipped: pyautoattack is not installed (.venv/bin/pip install --no-deps "
              "pyautoattack==0.2.0; see this benchmark's docstring)")
        return {"autoattack_skipped": "pyautoattack not installed"}
    import tempfile

    from bnadapt.attacks.evaluate import DEFAULT_PLAIN_ATTACKS, Protocol, attack_table, model_threat, unbits

    sel = crosscheck_selection(args.crosscheck)
    n = len(sel)
    plain = tuple(DEFAULT_PLAIN_ATTACKS) + (() if "apgd-t" in DEFAULT_PLAIN_ATTACKS else ("apgd-t",))
    p = Protocol(adapted=(), runs=1, plain=plain)  # the command's no-adaptation attacks and APGD-T, batch 500
    out, per_model = {}, {}
    for name in AUTOATTACK_MODELS:
        loaded = load_model(name)
        threat = model_threat(loaded)
        # ours: the attack command's protocol without adaptation, its per-image worst case
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = attack_table([loaded], sel, Path(tmp) / "x.rows.jsonl", protocol=p, device=dev, quiet=True)
            rows = [json.loads(line) for line in (Path(tmp) / "x.rows.jsonl").read_text().splitlines()[1:]
                    if line.strip()]
        wall_ours = time.perf_counter() - t
        pos = {int(i): k for k, i in enumerate(sel.indices)}
        ours_ok = torch.zeros(n, dtype=torch.bool)
        ours_by, ours_secs = {}, {}
        for row in rows:
            if "indices" not in row:
                continue
            at = torch.tensor([pos[i] for i in row["indices"]])
            ok = torch.from_numpy(unbits(row["clean"]["plain"]).copy())
            for a, b in row["plain"].items():
                ok_a = torch.from_numpy(unbits(b).copy())
                ours_by.setdefault(a, torch.zeros(n, dtype=torch.bool))[at] = ok_a
                ok &= ok_a
            ours_ok[at] = ok
            for a, v in row["seconds"].items():
                ours_secs[a.split("/", 1)[1]] = round(ours_secs.get(a.split("/", 1)[1], 0.0) + float(v), 1)
        without_t = clean_ours(rows, pos, n)  # the worst case of the other attacks alone
        for a, v in ours_by.items():
            if a != "apgd-t":
                without_t &= v
        wc = res.results["models"][0]["no_adaptation"]["worst_case"]
        # AutoAttack, standard version, attack by attack on the still-robust images (as run_standard_evaluation)
        model = prepare_model(load_model(name).model, dev)
        x, y = sel.dataset.get(sel.indices)
        x, y = x.contiguous().to(dev), y.to(dev)
        norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
        aa = AutoAttack(model, norm=norm, eps=threat.eps, version="standard", seed=0, device=dev)
        order = list(aa.attacks_to_run)
        with torch.no_grad():
            aa_ok = (model(x).argmax(1) == y).cpu()
        clean_ok = aa_ok.clone()
        newly, secs = {}, {}
        for a in order:
            idx = torch.nonzero(aa_ok).flatten()
            t = time.perf_counter()
            if len(idx):
                aa.attacks_to_run = [a]
                x_adv, _ = aa.run_standard_evaluation(x[idx.to(dev)], y[idx.to(dev)], batch_size=p.batch_size)
                d = (x_adv - x[idx.to(dev)]).flatten(1)
                size = d.abs().max(1).values if threat.norm == "linf" else d.norm(dim=1)
                assert float(size.max()) <= threat.eps * (1 + 1e-5) + 1e-6 and 0 <= float(x_adv.min()) \
                    and float(x_adv.max()) <= 1, f"{a}: outside the threat model"
                with torch.no_grad():
                    fooled = (model(x_adv).argmax(1) != y[idx.to(dev)]).cpu()
            else:
                fooled = torch.zeros(0, dtype=torch.bool)
            secs[a] = round(time.perf_counter() - t, 1)
            new = torch.zeros(n, dtype=torch.bool)
            new[idx[fooled]] = True
            newly[a] = new
            aa_ok &= ~new
        aa_ce_ok = clean_ok & ~newly["apgd-ce"]
        only_aa = ours_ok & ~aa_ok  # AutoAttack fools, ours does not
        only_ours = aa_ok & ~ours_ok
        pts = lambda m: round(100 * int(m.sum()) / n, 2)  # noqa: E731
        r = {"threat": threat.describe(), "images": n, "clean": pts(clean_ok),
             "ours_worst_case": pts(ours_ok), "ours_by_attack": {a: pts(v) for a, v in ours_by.items()},
             "ours_worst_case_without_apgd_t": pts(without_t),
             "apgd_t_newly_fooled_beyond_ours_others": int((without_t & ~ours_ok).sum()),
             "ours_minus_autoattack_without_apgd_t": round(pts(without_t) - pts(aa_ok), 2),
             "ours_seconds_by_attack": ours_secs,
             "autoattack_standard": pts(aa_ok), "autoattack_apgd_ce": pts(aa_ce_ok),
             "autoattack_newly_fooled": {a: int(v.sum()) for a, v in newly.items()},
             "autoattack_extra_beyond_apgd_ce": {a: int(newly[a].sum()) for a in order if a != "apgd-ce"},
             "extra_fooled_also_by_ours": {a: int((newly[a] & ~ours_ok).sum()) for a in order if a != "apgd-ce"},
             "only_autoattack_fooled": int(only_aa.sum()), "only_ours_fooled": int(only_ours.sum()),
             "only_autoattack_fooled_images": [int(sel.indices[i]) for i in torch.nonzero(only_aa).flatten()],
             "ours_minus_autoattack": round(pts(ours_ok) - pts(aa_ok), 2),
             "seconds": {"ours": round(wall_ours, 1), **{f"autoattack/{a}": v for a, v in secs.items()}}}
        others = sum(v for a, v in ours_secs.items() if a != "apgd-t")
        if others and "apgd-t" in ours_secs:
            r["apgd_t_seconds_over_the_others"] = round(ours_secs["apgd-t"] / others, 2)
        if wc is not None:
            r["ours_worst_case_reported"] = wc
        per_model[name] = r
        out[name] = r["ours_minus_autoattack"]
    print(f"AutoAttack beside ours, no adaptation, {n} Fashion-MNIST test images (the same for both), robust accuracy "
          f"(lower = stronger); pyautoattack {pyautoattack.__version__} standard, seed 0")
    for name, r in per_model.items():
        th = r["threat"]
        ex = ", ".join(f"{a} {v} ({r['extra_fooled_also_by_ours'][a]} also by ours)"
                       for a, v in r["autoattack_extra_beyond_apgd_ce"].items())
        print(f"  {name} ({th['threat_model']} eps {th['eps']}): clean {r['clean']:.2f}%  ours (worst of "
              f"{', '.join(r['ours_by_attack'])}) {r['ours_worst_case']:.2f}%  AutoAttack {r['autoattack_standard']:.2f}%"
              f"  AutoAttack APGD-CE alone {r['autoattack_apgd_ce']:.2f}%")
        print(f"    newly fooled beyond APGD-CE, in AutoAttack's order: {ex}")
        print(f"    ours without apgd-t {r['ours_worst_case_without_apgd_t']:.2f}% (minus AutoAttack "
              f"{r['ours_minus_autoattack_without_apgd_t']:+.2f}); apgd-t fooled {r['apgd_t_newly_fooled_beyond_ours_others']} "
              f"more; our seconds by attack {r['ours_seconds_by_attack']} (apgd-t / the others "
              f"{r.get('apgd_t_seconds_over_the_others')})")
        print(f"    only AutoAttack fooled {r['only_autoattack_fooled']}, only ours fooled {r['only_ours_fooled']}; "
              f"ours minus AutoAttack {r['ours_minus_autoattack']:+.2f} points (target <= 0.5)  "
              f"{'OK' if r['ours_minus_autoattack'] <= 0.5 else 'FAIL'}; seconds {r['seconds']}")
    if args.crosscheck_out:
        doc = {"benchmark": "benchmarks/bench_attack.py", "command": " ".join(["benchmarks/bench_attack.py", *sys.argv[1:]]),
               "pyautoattack": pyautoattack.__version__, "torch": torch.__version__, "device": str(dev),
               "threads": torch.get_num_threads(), "images": n, "data": "fashion-mnist test, balanced",
               "ours": f"bnadapt attack without adaptation: per-image worst case over clean, {', '.join(plain)} "
                       "(100 iterations, 1 restart, step eps/4 for PGD, apgd-t with 9 targets, batch 500, 1 run, seed 0)",
               "autoattack": "standard: apgd-ce, apgd-t (9 targets), fab-t (9 targets), square (5000 queries), seed 0",
               "ours_minus_autoattack": out, "models": per_model}
        Path(args.crosscheck_out).write_text(json.dumps(doc, indent=1) + "\n")
    return {"ours_minus_autoattack": out, "autoattack_images": n,
            "ours_minus_autoattack_without_apgd_t": {k: v["ours_minus_autoattack_without_apgd_t"] for k, v in per_model.items()},
            "autoattack_ok": all(v <= 0.5 for v in out.values())}


def protocol(args, dev) -> dict:
    from bnadapt.attacks.evaluate import Protocol, attack_table
    from bnadapt.attacks.report import format_attack_tables

    import tempfile

    models = [load_model("zoo:adv-linf-0.1"), load_model("zoo:adv-l2-1.5")]
    sel = select("fashion-mnist", "test", images=args.protocol, per_class=max(1, args.protocol // 10))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = attack_table(models, sel, Path(tmp) / "p.rows.jsonl", protocol=Protocol(), device=dev, quiet=True)
        wall = time.perf_counter() - t
    print(format_attack_tables(res.as_dict()))
    print(f"Table 2 protocol (batch 500, 100 iterations, 3 runs, m=10, both models) on {len(sel)} images: {wall:.0f} s "
          f"on {dev} ({torch.get_num_threads()} threads); about {wall * 2000 / len(sel) / 60:.0f} min for 2,000 images")
    return {"protocol_images": len(sel), "protocol_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--m", type=int, default=10, help="EoT models (default 10, the paper's Table 2)")
    ap.add_argument("--iters", type=int, default=3, help="K: timings of K and 2K iterations (default 3)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--crosscheck", type=int, default=0, metavar="N", help="strength cross-check on N images")
    ap.add_argument("--seeds", type=int, default=2, help="independent-start seeds of the cross-check (default 2)")
    ap.add_argument("--against", default="torchattacks",
                    help="comma-separated third parties of --crosscheck: torchattacks (PGD, APGD-CE on adv-linf-0.1), "
                         "autoattack (standard AutoAttack on both zoo models; pyautoattack 0.2.0)")
    ap.add_argument("--crosscheck-out", default=None, metavar="FILE",
                    help="write the AutoAttack cross-check's figures to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--torchattacks", default="/tmp/ta/torchattacks-3.5.1-py3-none-any.whl",
                    help="torchattacks 3.5.1 wheel (or unpacked folder) for --crosscheck")
    ap.add_argument("--protocol", type=int, default=0, metavar="N", help="time the Table 2 protocol on N images")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    args = ap.parse_args()
    against = [a.strip() for a in args.against.split(",") if a.strip()]
    bad = sorted(set(against) - {"torchattacks", "autoattack"})
    if bad:
        ap.error(f"unknown --against {', '.join(bad)}; choose from torchattacks, autoattack")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    out = {}
    if not args.no_cost:
        out.update(cost(args, dev))
    if args.crosscheck and "torchattacks" in against:
        out.update(crosscheck(args, dev))
    if args.crosscheck and "autoattack" in against:
        out.update(crosscheck_autoattack(args, dev))
    if args.protocol:
        out.update(protocol(args, dev))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
