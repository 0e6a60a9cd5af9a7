"""``bnadapt attack`` (paper Table 2, Table 7: adversarial robustness of the adapted model, the paper's
EoT-PGD beside the strongest honest worst case), ``bnadapt attack-merge`` (join --shard runs) and
``bnadapt poison`` (batch poisoning through the shared statistics). Under torchrun
(``torchrun --nproc_per_node=K -m bnadapt.cli attack ...``) every rank attacks its share of the batches
and rank 0 merges."""

from __future__ import annotations

import argparse

from bnadapt.cli import options as opt
from bnadapt.errors import check, check_batch_size, check_count, check_rho, check_seed


def _names(text: str, what: str) -> tuple[str, ...]:
    t = str(text).strip().lower()
    if t in ("", "none", "-"):
        return ()
    return tuple(s.strip() for s in t.split(",") if s.strip())


def _threat_args(args) -> None:
    from bnadapt.attacks.threat import check_eps, threat_model

    if args.threat is not None:
        threat_model(args.threat)
    if args.eps is not None:
        check_eps(args.eps, "--eps")


def _threats(args, models):
    from bnadapt.attacks.evaluate import model_threat

    return [model_threat(m, args.threat, args.eps) for m in models]


def _outputs(args):
    from bnadapt.attacks.evaluate import rows_path
    from bnadapt.results import check_distinct, check_output

    out = opt.output(args, suffixes=(".json",))
    rows = rows_path(out)
    check_output(rows, "the row file beside --out", suffixes=(".rows.jsonl",))
    check_distinct({"--out": out, "the row file": rows})
    check(getattr(args, "resume", False) or not rows.exists(),
          f"{rows} already exists; pass --resume to continue that run, or choose another --out")
    return out, rows


def cmd_attack(args) -> int:
    from bnadapt.attacks.evaluate import Protocol, attack_table
    from bnadapt.attacks.report import format_attack_tables
    from bnadapt.rowfile import parse_shard
    from bnadapt.runs import distributed, world

    _threat_args(args)
    plain, adapted = _names(args.no_adapt_attacks, "--no-adapt-attacks"), _names(args.attacks, "--attacks")
    ms = tuple(check_count(m, "--eot-m", hint="the paper uses m in {1, 5, 10}") for m in opt.int_list(args.eot_m, "--eot-m"))
    protocol = Protocol(rho=check_rho(args.rho, "--rho"), batch_size=args.batch_size, runs=args.runs, steps=args.steps,
                        step_size=args.step_size, restarts=args.restarts, eot_m=ms, plain=plain, adapted=adapted)
    check_batch_size(args.batch_size, "--batch-size", adapting=bool(adapted))
    check_count(args.steps, "--steps")
    check_count(args.runs, "--runs")
    check_count(args.restarts, "--restarts")
    if args.step_size is not None:
        from bnadapt.attacks.threat import check_eps

        check_eps(args.step_size, "--step-size")
    protocol = protocol.validated()
    check_seed(args.seed, "--seed")
    shard = parse_shard(args.shard)
    out, rows = _outputs(args)
    dev = opt.device(args)
    models = opt.load_models(args)
    threats = _threats(args, models)
    sel = opt.selection(args)
    with distributed(dev):
        res = attack_table(models, sel, rows, protocol=protocol, threats=threats, seed=args.seed, device=dev,
                           resume=args.resume, shard=shard, quiet=args.quiet)
        if world()[0] != 0 or res is None:
            return 0
    d = res.as_dict()
    opt.say(format_attack_tables(d))
    res.write(out)
    opt.say(f"wrote {out} and {rows}")
    return 0


def cmd_attack_merge(args) -> int:
    from bnadapt.attacks.evaluate import result_from_rows
    from bnadapt.attacks.report import format_attack_tables
    from bnadapt.results import Result
    from bnadapt.rowfile import merge_rows, read_rows

    out, rows = _outputs(args)
    header, _ = read_rows(args.shards[0])
    check(header.get("experiment") in ("attack", "poison"), f"{args.shards[0]} holds no attack or poison rows")
    if header["experiment"] == "poison":  # its result also needs the models (reference rows): finish with --resume
        merge_rows(args.shards, rows, experiment="poison")
        opt.say(f"merged {len(args.shards)} poison shard(s) into {rows}; now rerun the same `bnadapt poison` command "
                f"without --shard, with --resume --out {out}, to write the result (no batch is attacked again)")
        return 0
    header, merged = merge_rows(args.shards, rows, experiment="attack")
    res = result_from_rows(header["inputs"], merged, units=len(header["units"]), out_rows=rows)
    res = Result(res.experiment, res.inputs, res.results, run={"merged_from": list(args.shards)})
    d = res.as_dict()
    opt.say(format_attack_tables(d))
    res.write(out)
    opt.say(f"merged {len(args.shards)} shard(s) into {rows}; wrote {out}")
    return 0


def cmd_poison(args) -> int:
    from bnadapt.attacks.poison import CONSTRAINTS, ROBUSTS
    from bnadapt.attacks.poison_table import poison_table
    from bnadapt.attacks.report import format_poison_table
    from bnadapt.errors import check_choice, check_fraction, check_unique
    from bnadapt.rowfile import parse_shard
    from bnadapt.runs import distributed, world

    _threat_args(args)
    if args.online is not None:
        return _cmd_stream_poison(args)
    qs = [check_fraction(q, "--qs") for q in opt.float_list(args.qs, "--qs")]
    rhos = [check_rho(r, "--rhos") for r in opt.float_list(args.rhos, "--rhos")]
    bss = [check_batch_size(b, "--batch-sizes", adapting=True) for b in opt.int_list(args.batch_sizes, "--batch-sizes")]
    cons = [check_choice(c, CONSTRAINTS, "--constraints") for c in _names(args.constraints, "--constraints")]
    check(len(cons) >= 1, f"--constraints is empty; choose from {', '.join(CONSTRAINTS)}")
    robusts = check_unique([check_choice(r.strip(), ROBUSTS, "--robust") for r in str(args.robust).lower().split(",")],
                           "--robust")
    _check_poisoner(args)
    check_count(args.trusted, "--trusted", min=0)
    check_seed(args.seed, "--seed")
    shard = parse_shard(args.shard)
    out, rows = _outputs(args)
    dev = opt.device(args)
    models = opt.load_models(args)
    threats = _threats(args, models) if "threat" in cons else None
    sel = opt.selection(args)
    trusted = None
    if args.trusted:
        from bnadapt.data import select

        check(sel.dataset.has_splits, f"--trusted takes images of the train split, which {sel.dataset.name} lacks; "
                                      "use --trusted 0")
        trusted = select(args.data, "train", images=args.trusted, subset_seed=args.subset_seed)
    with distributed(dev):
        res = poison_table(models, sel, rows, qs=qs, rhos=rhos, batch_sizes=bss, constraints=cons, robusts=robusts,
                           threats=threats, steps=args.steps, restarts=args.restarts, loss=args.loss,
                           schedule=args.step_schedule, start=args.poison_start, transfer=not args.no_transfer,
                           runs=args.runs, seed=args.seed, trusted=trusted, device=dev, resume=args.resume,
                           shard=shard, quiet=args.quiet)
        if world()[0] != 0 or res is None:
            return 0
    d = res.as_dict()
    opt.say(format_poison_table(d))
    res.write(out)
    opt.say(f"wrote {out} and {rows}")
    return 0


def _check_poisoner(args) -> None:
    """The poisoner's options, shared by per-batch poisoning and poisoning over time."""
    from bnadapt.attacks.poison import POISON_LOSSES, SCHEDULES, STARTS
    from bnadapt.errors import check_choice

    check_choice(args.loss, POISON_LOSSES, "--loss")
    check_choice(args.step_schedule, SCHEDULES, "--step-schedule")
    check_choice(args.poison_start, STARTS, "--poison-start")
    check_count(args.steps, "--steps")
    check_count(args.restarts, "--restarts")
    check_count(args.runs, "--runs")


def _cmd_stream_poison(args) -> int:
    """``bnadapt poison --online ESTIMATORS``: poisoning over time against the online estimators."""
    from bnadapt.adapt import ESTIMATORS
    from bnadapt.attacks.poison import CONSTRAINTS, ROBUSTS
    from bnadapt.errors import check_choice, check_float, check_sigma, check_unique
    from bnadapt.stream.poison import check_stream_q, format_stream_poison_table, stream_poison_table

    check(args.shard is None and not args.resume, "--shard and --resume apply to per-batch poisoning; a poisoned "
                                                  "stream is sequential (drop them with --online)")
    ests = check_unique([check_choice(e, ESTIMATORS, "--online") for e in _names(args.online, "--online")], "--online")
    check(len(ests) >= 1, f"--online is empty; choose from {', '.join(ESTIMATORS)}")
    qs = check_unique([check_stream_q(q, "--qs") for q in opt.float_list(args.qs, "--qs")], "--qs")
    rhos = check_unique([check_rho(r, "--rhos") for r in opt.float_list(args.rhos, "--rhos")], "--rhos")
    bss = check_unique([check_batch_size(b, "--batch-sizes", adapting=True)
                        for b in opt.int_list(args.batch_sizes, "--batch-sizes")], "--batch-sizes")
    cons = check_unique([check_choice(c, CONSTRAINTS, "--constraints") for c in _names(args.constraints,
                                                                                       "--constraints")],
                        "--constraints")
    check(len(cons) >= 1, f"--constraints is empty; choose from {', '.join(CONSTRAINTS)}")
    robusts = check_unique([check_choice(r.strip(), ROBUSTS, "--robust") for r in str(args.robust).lower().split(",")],
                           "--robust")
    momentum = check_float(args.momentum, "--momentum", min=0.0, max=1.0, min_open=True,
                           hint="the weight of one image in the moving average; 1 = per-batch adaptation")
    window = check_count(args.window, "--window", min=2, hint="the window must hold at least 2 images")
    prior_n = check_float(args.prior_n, "--prior-n", min=0.0,
                          hint="the number of pseudo-images the training statistics count as")
    sigma = check_sigma(args.sigma, "--sigma")
    _check_poisoner(args)
    check_seed(args.seed, "--seed")
    out = opt.output(args, suffixes=(".json",))
    dev = opt.device(args)
    models = opt.load_models(args)
    threats = _threats(args, models) if "threat" in cons else None
    sel = opt.selection(args)
    res = stream_poison_table(models, sel, qs=qs, estimators=ests, robusts=robusts, rhos=rhos, batch_sizes=bss,
                              constraints=cons, threats=threats, momentum=momentum, window=window, prior_n=prior_n,
                              steps=args.steps, restarts=args.restarts, loss=args.loss, schedule=args.step_schedule,
                              start=args.poison_start, transfer=not args.no_transfer, sigma=sigma, runs=args.runs,
                              seed=args.seed, device=dev, quiet=args.quiet)
    opt.say(format_stream_poison_table(res.as_dict()))
    res.write(out)
    opt.say(f"wrote {out}")
    return 0


def _common(p: argparse.ArgumentParser, *, default_images: int, per_class: int | None) -> None:
    opt.add_model(p, multiple=True)
    opt.add_data(p, default_images=default_images)
    if per_class is not None:
        p.set_defaults(per_class=per_class)
    p.add_argument("--threat", default=None, metavar="linf|l2",
                   help="threat model (default: each model's card, i.e. the one it was trained against)")
    p.add_argument("--eps", type=float, default=None, help="attack radius in pixel units (default: each model's card)")
    p.add_argument("--steps", type=int, default=100, help="attack iterations (default 100, as the paper)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of every attack, on the whole batch "
                                                           "(default 1)")
    opt.add_seed(p)
    opt.add_device(p)  # attacks run in fp32: bf16/fp16 gradients are coarse and would weaken them
    opt.add_quiet(p)
    p.add_argument("--resume", action="store_true", help="continue a run: skip the batches already in the row file")
    p.add_argument("--shard", default=None, help="do shard i of N of the batches (i/N), e.g. 0/4; join with "
                                                 "attack-merge (each batch is independent)")
    p.add_argument("--out", required=True, help="result file X.json (the resumable rows go to X.rows.jsonl beside it)")


def register(sub) -> None:
    p = sub.add_parser("attack", help="adversarial robustness of the adapted model: the paper's EoT-PGD and the "
                                      "strongest honest worst case (Tables 2, 7)",
                       description="Attack each model without adaptation (PGD, APGD-CE, APGD-DLR) and as deployed "
                                   "with per-batch adaptive BN (the paper's EoT-PGD over m adapted-then-frozen models; "
                                   "PGD and APGD through the batch statistics; transfers). Every attack forwards whole "
                                   "batches; its final batch is fed to the deployed model. Prints the Table 2 and "
                                   "Table 7 layouts, every attack, the per-image worst case and sanity checks.")
    _common(p, default_images=2000, per_class=200)
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum of the deployed model (default 1)")
    p.add_argument("--batch-size", type=int, default=500, help="test batch size of the deployed model (default 500, "
                                                               "as the paper)")
    p.add_argument("--runs", type=int, default=3, help="repeated runs with reshuffled batches (default 3, as Table 2)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step size (default eps/4)")
    p.add_argument("--eot-m", default="10", help="EoT models m, comma-separated (default 10; Table 7: 1,5,10)")
    p.add_argument("--attacks", default="eot,pgd,apgd-ce,apgd-dlr,transfer",
                   help="attacks on the adapted model: eot (paper), pgd / apgd-ce / apgd-dlr / apgd-t (through the "
                        "statistics; apgd-t, the targeted APGD over 9 classes at about 9 times APGD's cost, is opt-in), "
                        "transfer (the no-adaptation attacks' batches); 'none' for no adaptation")
    p.add_argument("--no-adapt-attacks", default="pgd,apgd-ce,apgd-dlr",
                   help="attacks on the model without adaptation: pgd, apgd-ce, apgd-dlr, apgd-t (APGD-T, AutoAttack's "
                        "targeted DLR over 9 target classes, about 9 times APGD's cost; needs >= 4 classes) "
                        "(default pgd,apgd-ce,apgd-dlr; 'none' to skip)")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("attack-merge", help="merge the row files of `bnadapt attack --shard` (or `poison --shard`) runs")
    p.add_argument("shards", nargs="+", metavar="SHARD.rows.jsonl", help="the row files of the shard runs")
    p.add_argument("--out", required=True, help="merged result X.json (merged rows X.rows.jsonl beside it)")
    p.add_argument("--overwrite", dest="resume", action="store_true", help="replace an existing merged row file")
    p.set_defaults(func=cmd_attack_merge)

    p = sub.add_parser("poison", help="batch poisoning: benign accuracy when an attacker controls a fraction q of each "
                                      "test batch (Wu et al. 2023)",
                       description="The attacker changes only its own q share of each test batch (within the threat "
                                   "model around its clean images, or anywhere in [0, 1]) to maximize the error on "
                                   "the other images through the shared BN statistics. Reports benign accuracy "
                                   "against q for each robust statistic, rho and batch size, and the remedies immune "
                                   "to it: no adaptation, and adapt-then-freeze on trusted images.")
    _common(p, default_images=2048, per_class=None)
    p.add_argument("--qs", default="0.01,0.05,0.1,0.25", help="poisoned fractions q in (0, 1) (default 0.01,0.05,0.1,0.25)")
    p.add_argument("--rhos", default="1,0.5", help="adaptation momenta (default 1,0.5)")
    p.add_argument("--batch-sizes", default="64,512", help="test batch sizes (default 64,512)")
    p.add_argument("--constraints", default="threat,unconstrained",
                   help="threat: poison within the threat model around its clean images; unconstrained: anywhere in "
                        "[0, 1] (default both)")
    p.add_argument("--robust", default="none", metavar="none,median,trimmed",
                   help="test statistics of the deployed model, comma-separated: none (the paper's), median "
                        "(median/MAD), trimmed (10%%-trimmed mean/variance) (default none). The poison is crafted "
                        "through them and, for median/trimmed, also against the plain statistics and transferred; "
                        "the worse batch for the defender is kept")
    p.add_argument("--no-transfer", action="store_true",
                   help="on robust statistics, attack only through them (skip the transfer from the plain ones)")
    p.add_argument("--loss", default="ce-correct", metavar="ce-correct|ce|margin",
                   help="poisoning loss over the benign images: ce-correct (cross-entropy of those still correct; "
                        "default, measured strongest), ce (all of them), margin (capped CW margin)")
    p.add_argument("--step-schedule", default="cosine", metavar="cosine|constant",
                   help="step size eps/4 (0.25 unconstrained) decayed to 0 along a cosine (default), or constant")
    p.add_argument("--poison-start", default="random", metavar="random|clean",
                   help="first start of the poison: a random point of its constraint set (default) or its clean "
                        "images; restarts start at random points")
    p.add_argument("--runs", type=int, default=1, help="repeated runs with reshuffled batches (default 1)")
    p.add_argument("--trusted", type=int, default=2048,
                   help="adapt-then-freeze reference on N trusted train-split images (default 2048; 0: none)")
    o = p.add_argument_group("poisoning over time (--online): the selected images as one i.i.d. stream in "
                             "consecutive batches of each --batch-sizes, q of every batch the attacker's, against "
                             "online estimators (docs/stream.md); --qs may include 0 (the unpoisoned stream)")
    o.add_argument("--online", default=None, metavar="ema,window,prior",
                   help="poison a stream against these online estimators instead of per-batch adaptation")
    o.add_argument("--momentum", type=float, default=0.01, help="ema: weight of one image in (0, 1] (default 0.01)")
    o.add_argument("--window", type=int, default=256, help="window: the last W >= 2 images (default 256)")
    o.add_argument("--prior-n", type=float, default=16.0,
                   help="prior: the training statistics count as N >= 0 pseudo-images (default 16)")
    o.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise of the stream's images (default 0)")
    p.set_defaults(func=cmd_poison)
