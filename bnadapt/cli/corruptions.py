"""``bnadapt corruptions generate|evaluate|table``: common corruptions (paper Tables 3 and 8)."""

from __future__ import annotations

from pathlib import Path

from bnadapt.cli import options as opt
from bnadapt.results import check_output
from bnadapt.errors import check, check_batch_size, check_count, check_rho, check_seed


def _corrupted_set(args):
    """The whole corrupted set named by ``--data`` (cifar10-c:DIR or imagenet-c:DIR)."""
    from bnadapt.data.corrupted import LAYOUTS, open_corrupted, parse_spec

    prefix, sep, rest = args.data.partition(":")
    layout = prefix.lower()
    check(bool(sep) and layout in LAYOUTS, f"--data {args.data!r} is not a corrupted set; use cifar10-c:DIR (our cache "
                                           "or CIFAR-10-C) or imagenet-c:DIR")
    folder, corruption, _ = parse_spec(layout, rest)
    check(corruption is None, f"--data names one corruption and severity; evaluate takes the whole set "
                              f"({layout}:DIR) and --corruptions to choose")
    size = lambda v, w: None if v in (None, "auto") else opt._size_option(v, w)  # noqa: E731
    return open_corrupted(layout, folder, resize=size(args.resize, "--resize"), crop=size(args.crop, "--crop"))


def _declare_params(cset, params: str | None):
    """Check ``--params`` against the set's manifest, or declare the table of a set without one
    (:meth:`CorruptedSet.severity_params`, the rule ``bnadapt stream --corrupted`` uses too). Returns
    the set to use: a copy when a table is declared (``open_corrupted`` caches sets per process, and a
    declaration must not stick to the cached one)."""
    import copy

    from bnadapt.corruptions.names import PARAM_LABELS

    table, how = cset.severity_params(params, "--params")
    if cset.params is None:
        cset = copy.copy(cset)
        cset.params, cset.params_source = table, f"{PARAM_LABELS[table]} ({how})"
    return cset


def cmd_generate(args) -> int:
    from bnadapt.corruptions.generate import generate
    from bnadapt.corruptions.names import PARAM_LABELS, check_params, parse_corruptions

    names = parse_corruptions(args.corruptions, "--corruptions")
    check_params(args.params, "--params")
    check_seed(args.seed, "--seed")
    check_count(args.workers, "--workers", min=0)
    check(not Path(args.out).is_file(), f"--out {args.out} is a file; give a folder for the corrupted sets")
    check_output(Path(args.out) / "manifest.json", "--out")  # a probe write: read-only, full, not allowed
    dev = opt.device(args)
    sel = opt.selection(args)
    res = generate(sel, args.out, corruptions=names, params=args.params, engine=args.engine, seed=args.seed,
                   workers=args.workers, device=dev, quiet=args.quiet)
    m = res["manifest"]
    opt.say(f"{res['dir']}: {len(m['corruptions'])} corruptions x 5 severities x {len(sel)} images of {sel.dataset.name} "
            f"({PARAM_LABELS[args.params]}, engine {m['identity']['engine']}, seed {args.seed}); generated "
            f"{len(res['generated'])} (corruption, severity) sets, reused {len(res['reused'])}, in {res['wall_s']:.1f} s")
    opt.say(f"read it as --data cifar10-c:{res['dir']} (evaluate) or cifar10-c:{res['dir']}:CORRUPTION:SEVERITY")
    return 0


def cmd_evaluate(args) -> int:
    from bnadapt.corruptions import evaluate as ev
    from bnadapt.corruptions import tables
    from bnadapt.corruptions.names import parse_corruptions
    from bnadapt.results import atomic_write_text, check_distinct

    names = parse_corruptions(args.corruptions, "--corruptions")
    check_rho(args.rho, "--rho")
    check_seed(args.seed, "--seed")
    check_batch_size(args.batch_size, "--batch-size", adapting=True)
    check_count(args.runs, "--runs")
    out = opt.output(args, suffixes=(".json",))
    csv = opt.output(args, "csv", suffixes=(".csv",))
    ref_out = opt.output(args, "reference_out", suffixes=(".json",))
    check_distinct({"--out": out, "--csv": csv, "--reference-out": ref_out})
    dev = opt.device(args)
    cset = _corrupted_set(args)
    cset = _declare_params(cset, args.params)
    models = opt.load_models(args)
    res, ref_path = ev.evaluate_set(models, cset, clean_spec=args.clean, split=args.split, images=args.images,
                                    per_class=args.per_class, subset_seed=args.subset_seed, corruptions=names,
                                    rho=args.rho, batch_size=args.batch_size, runs=args.runs, seed=args.seed,
                                    reference=args.reference or "default", reference_out=ref_out, device=dev,
                                    precision=args.precision, quiet=args.quiet,
                                    load_model=lambda s: opt.load_models(args, s)[0])
    if ref_path is not None:
        opt.say(f"reference table: {ref_path}")
    d = res.as_dict()
    opt.say(tables.format_table3(d))
    opt.say("")
    opt.say(tables.format_table8(d))
    if out:
        res.write(out)
        opt.say(f"wrote {out}")
    if csv:
        atomic_write_text(csv, tables.robustbench_csv(d))
        opt.say(f"wrote {csv}")
    return 0


def cmd_table(args) -> int:
    from bnadapt.corruptions import tables
    from bnadapt.results import atomic_write_text, read_result

    csv = opt.output(args, "csv", suffixes=(".csv",))
    d = read_result(args.result, "corruption_eval")
    if args.table in ("3", "all"):
        opt.say(tables.format_table3(d, markdown=args.markdown))
    if args.table == "all":
        opt.say("")
    if args.table in ("8", "all"):
        opt.say(tables.format_table8(d, markdown=args.markdown))
    if csv:
        atomic_write_text(csv, tables.robustbench_csv(d))
        opt.say(f"wrote {csv}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("corruptions", help="common corruptions: generate sets, evaluate with and without adaptive "
                                           "BN, mCE and relative mCE (Tables 3, 8)",
                       description="Common corruptions (Hendrycks & Dietterich 2019): generate corrupted copies of a "
                                   "data set, evaluate models on them (or on CIFAR-10-C / ImageNet-C) without and "
                                   "with adaptive BN, and print the paper's Table 3 and Table 8.")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    act = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))

    g = act.add_parser("generate", help="corrupt a data set (19 corruptions x 5 severities) into a reusable cache",
                       description="Corrupt every selected image with each corruption at severities 1-5 "
                                   "(imagecorruptions-imaug, worker processes; or the noise family in torch) into "
                                   "a cache folder in the CIFAR-10-C layout with a manifest. A finished cache is "
                                   "reused, an interrupted one completed.")
    opt.add_data(g)
    g.add_argument("--corruptions", default="all",
                   help="names or sets: all (default), common, noise, blur, weather, digital, hold-out")
    g.add_argument("--params", default="imagenet", help="severity parameter table: imagenet (default, all 19; "
                                                        "calibrated for 224 px) or cifar (noise family, torch)")
    g.add_argument("--engine", default="auto", help="auto (default: library for imagenet, torch for cifar), "
                                                    "library, or torch (noise family on --device)")
    opt.add_seed(g, "seed of every image's corruption (default 0)")
    g.add_argument("--workers", type=int, default=2, help="library worker processes (default 2; 0: this process)")
    opt.add_device(g, loading=False)
    opt.add_quiet(g)
    g.add_argument("--out", required=True, help="cache folder (created; reused when it holds the same request)")
    g.set_defaults(func=cmd_generate)

    e = act.add_parser("evaluate", help="accuracy per corruption and severity with and without adaptive BN; "
                                        "mCE, relative mCE; Tables 3 and 8",
                       description="Evaluate models on every corruption and severity of a corrupted set without and "
                                   "with per-batch adaptive BN (repeated runs: mean ± 2 sd), on the clean images, "
                                   "and compute mean corruption accuracy, gap, mCE and relative mCE.")
    opt.add_model(e, multiple=True)
    e.add_argument("--data", required=True, help="cifar10-c:DIR (bnadapt's cache or CIFAR-10-C) or imagenet-c:DIR")
    e.add_argument("--clean", default=None, help="clean data spec matching the set (default: the cache's source; "
                                                 "needed for CIFAR-10-C/ImageNet-C clean columns, e.g. cifar10:DIR)")
    e.add_argument("--split", default="test", choices=["train", "test"], help="split of --clean (default test)")
    e.add_argument("--images", type=int, default=None, help="a deterministic subset of N images of every set")
    e.add_argument("--per-class", type=int, default=None, help="at most K images per class in the subset")
    e.add_argument("--subset-seed", type=int, default=0, help="seed of the subset choice (default 0)")
    e.add_argument("--resize", default=None, help="imagenet-c: resize shorter side (default: none, images are 224)")
    e.add_argument("--crop", default=None, help="imagenet-c: center crop (default: none)")
    e.add_argument("--corruptions", default="all", help="names or sets (default all the set holds)")
    e.add_argument("--params", default=None, help="the set's severity table (imagenet|cifar): checked against the "
                                                  "manifest, declared for sets without one")
    e.add_argument("--rho", type=float, default=1.0, help="adaptation momentum rho (default 1)")
    e.add_argument("--batch-size", type=int, default=512, help="test batch size (default 512)")
    e.add_argument("--runs", type=int, default=3, help="repeated adapted runs, reshuffled (default 3, as the paper)")
    opt.add_seed(e)
    e.add_argument("--reference", default=None,
                   help="mCE reference: alexnet (ImageNet-C default), a corruption_reference .json, a model spec "
                        "(measured once, written beside the set; default zoo:baseline for Fashion-MNIST), or none")
    e.add_argument("--reference-out", default=None, help="where a model reference's table is written (.json)")
    opt.add_device(e, precision=True)
    opt.add_quiet(e)
    e.add_argument("--out", default=None, help="result file (.json)")
    e.add_argument("--csv", default=None, help="per-(corruption, severity) accuracies in RobustBench's unaggregated "
                                               "CSV layout (.csv)")
    e.set_defaults(func=cmd_evaluate)

    t = act.add_parser("table", help="Tables 3 and 8 (and the RobustBench CSV) from an evaluate result file")
    t.add_argument("result", help="result file written by `bnadapt corruptions evaluate --out`")
    t.add_argument("--table", default="all", choices=["3", "8", "all"], help="which table (default all)")
    t.add_argument("--markdown", action="store_true", help="Markdown tables")
    t.add_argument("--csv", default=None, help="also write the RobustBench CSV (.csv)")
    t.set_defaults(func=cmd_table)
