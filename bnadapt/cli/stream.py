"""``bnadapt stream``: online accuracy over a test stream (online estimators vs standard inference vs
per-batch adaptation, by batch size and stream length; docs/stream.md)."""

from __future__ import annotations

from bnadapt.cli import options as opt
from bnadapt.errors import (check, check_batch_size, check_choice, check_count, check_float, check_rho, check_seed,
                            check_sigma, check_unique)

ROBUST_CHOICES = ("none", "median", "trimmed")


def check_online_options(args) -> dict:
    """The online-estimator options, validated with their option names (shared with ``bnadapt adapt --stream``)."""
    from bnadapt.adapt import ESTIMATORS

    estimators = check_unique([check_choice(e.strip(), ESTIMATORS, "--estimator")
                               for e in str(args.estimator).split(",") if e.strip()], "--estimator")
    momentum = check_float(args.momentum, "--momentum", min=0.0, max=1.0, min_open=True,
                           hint="the weight of one image in the moving average; 1 = per-batch adaptation")
    window = check_count(args.window, "--window", min=2, hint="the window must hold at least 2 images")
    robust = check_choice(args.robust, ROBUST_CHOICES, "--robust")
    out = {"estimators": estimators, "momentum": momentum, "window": window,
           "robust": None if robust == "none" else robust}
    if hasattr(args, "prior_n"):
        out["prior_n"] = check_float(args.prior_n, "--prior-n", min=0.0,
                                     hint="the number of pseudo-images the training statistics count as")
    if getattr(args, "reset_every", None) is not None:
        out["reset_every"] = check_count(args.reset_every, "--reset-every", hint="reset the estimate every k images")
    return out


CORRUPTED_OPTIONS = {"corruptions": "--corruptions", "severity": "--severity", "severity_start": "--severity-start",
                     "severities": "--severities", "scenario": "--scenario"}
SOURCE_OPTIONS = {"data": "--data", "split": "--split", "params": "--params", "corrupted": "--corrupted"}


def check_domain_options(args) -> dict | None:
    """The stream's domain options, validated with their option names: None for a noise stream, else
    the corruption domain (``check_corruption_domain``). Options of the other domain type are refused."""
    from bnadapt.stream import check_corruption_domain

    if args.corrupted is None:
        given = [o for o, v in (("--corruptions", args.corruptions), ("--severity", args.severity),
                                ("--severity-start", args.severity_start), ("--severities", args.severities),
                                ("--params", args.params)) if v is not None]
        check(not given, f"{given[0] if given else ''} applies to corrupted streams; give the set with --corrupted DIR "
                         "(a cache of `bnadapt corruptions generate`, cifar10-c:DIR or imagenet-c:DIR)")
        return None
    noisy = [o for o, v in (("--sigma-start", args.sigma_start), ("--sigmas", args.sigmas)) if v is not None]
    check(not noisy, f"{noisy[0] if noisy else ''} sets the noise of a noise stream; a corrupted stream drifts, mixes "
                     "or shifts --corruptions and --severity (--severity-start, --severities; --sigma adds constant "
                     "noise)")
    check(args.corruptions is not None, "--corrupted needs --corruptions NAME[,NAME...], e.g. --corruptions fog "
                                        "(mixed: several, shift: one or two)")
    sev = None if args.severities is None else opt.int_list(args.severities, "--severities")
    severity = 3 if args.severity is None else args.severity
    return check_corruption_domain(args.scenario, args.corruptions, severity=severity, severity_start=args.severity_start,
                                   severities=sev, names=CORRUPTED_OPTIONS)


def cmd_stream(args) -> int:
    from bnadapt import stream
    from bnadapt.stream import check_scenario, dataset_labels

    online = check_online_options(args)
    check_scenario(args.scenario, what="--scenario")
    batch_sizes = check_unique([check_batch_size(b, "--batch-sizes") for b in opt.int_list(args.batch_sizes,
                                                                                           "--batch-sizes")],
                               "--batch-sizes")
    dom = check_domain_options(args)
    sigma = check_sigma((0.5 if dom is None else 0.0) if args.sigma is None else args.sigma, "--sigma")
    sigma_start = check_sigma(0.0 if args.sigma_start is None else args.sigma_start, "--sigma-start")
    sigmas = check_unique([check_sigma(s, "--sigmas") for s in opt.float_list(args.sigmas or "0,0.25,0.5,0.75",
                                                                              "--sigmas")], "--sigmas")
    check_float(args.change_at, "--change-at", min=0.0, max=1.0)
    check_float(args.concentration, "--concentration", min=0.0, min_open=True,
                hint="the Dirichlet concentration: small = long same-class runs, e.g. 0.1")
    rho = check_rho(args.rho, "--rho")
    length = None if args.stream_length is None else check_count(args.stream_length, "--stream-length")
    runs = check_count(args.runs, "--runs")
    seed = check_seed(args.seed, "--seed")
    out = opt.output(args, suffixes=(".json",))
    png = opt.output(args, "plot", suffixes=(".png",))
    from bnadapt.results import check_distinct

    check_distinct({"--out": out, "--plot": png})
    dev = opt.device(args)
    source, corrupted_kw = None, {}
    if dom is not None:  # the set and its clean images first: a mismatch is an error before any model loads
        source = stream.corrupted_source(args.corrupted, args.data, split=args.split, params=args.params,
                                         names=SOURCE_OPTIONS)
        source.check_corruptions(dom["corruptions"], "--corruptions")
        sel = source.selection(images=args.images, per_class=args.per_class, subset_seed=args.subset_seed,
                               names=("--images", "--per-class", "--subset-seed"))
        corrupted_kw = dict(corrupted=source, corruptions=dom["corruptions"], severity=dom["severity"],
                            severity_start=dom["severity_start"], severities=dom["severities"])
        models = opt.load_models(args)
    else:
        args.data, args.split = args.data or "fashion-mnist", args.split or "test"
        models = opt.load_models(args)
        sel = opt.selection(args)
    labeled = dataset_labels(sel.dataset) is not None
    check_scenario(args.scenario, labeled=labeled, what="--scenario")
    check(labeled, "online accuracy needs labels, but the data has none; use labeled data")
    res = stream.stream_evaluation(
        models, sel, estimators=online["estimators"], batch_sizes=batch_sizes, rho=rho, momentum=online["momentum"],
        window=online["window"], prior_n=online["prior_n"], reset_every=online.get("reset_every"),
        robust=online["robust"], scenario=args.scenario, sigma=sigma, sigma_start=sigma_start, sigmas=sigmas,
        change_at=args.change_at, concentration=args.concentration, stream_length=length, runs=runs, seed=seed,
        device=dev, precision=args.precision, quiet=args.quiet, **corrupted_kw)
    d = res.as_dict()
    opt.say(stream.format_stream_table(d))
    opt.say(stream.format_length_table(d))
    if out:
        res.write(out)
        opt.say(f"wrote {out}")
    if png:
        from bnadapt.viz import plot_stream

        opt.say(f"wrote {plot_stream(d, png)}")
    return 0


def add_online_options(p, *, prior: bool = True) -> None:
    """--estimator, --momentum, --window, --prior-n, --robust (shared with ``bnadapt adapt --stream``)."""
    p.add_argument("--estimator", default="ema,window,prior" if prior else "ema",
                   help="online estimator(s), comma-separated: ema, window" + (", prior (default all three)" if prior
                                                                              else " (default ema)"))
    p.add_argument("--momentum", type=float, default=0.01,
                   help="ema: weight of one image in (0, 1]; a batch of b gets 1-(1-m)^b; 1 = per-batch (default 0.01)")
    p.add_argument("--window", type=int, default=256, help="window: the last W >= 2 images (default 256)")
    if prior:
        p.add_argument("--prior-n", type=float, default=16.0,
                       help="prior: the training statistics count as N >= 0 pseudo-images, rho = b/(b+N) (default 16)")
    p.add_argument("--robust", default="none", metavar="none|median|trimmed",
                   help="robust test statistics: median/MAD or 10%%-trimmed mean/variance (default none)")


def register(sub) -> None:
    p = sub.add_parser("stream", help="online accuracy over a test stream: online BN estimators vs standard and "
                                      "per-batch adaptation, by batch size and stream length",
                       description="Classify a seeded stream of test images (i.i.d., sorted by class, drifting, mixed "
                                   "or shifting noise, or corruptions and severities of a corrupted set) batch by "
                                   "batch, down to one image: standard inference, the paper's per-batch adaptation "
                                   "(n/a at batch 1) and online estimators that keep a running estimate of the test "
                                   "statistics (docs/stream.md).")
    opt.add_model(p, multiple=True)
    opt.add_data(p)
    p.set_defaults(data=None, split=None)  # fashion-mnist / test for noise streams; with --corrupted, the set's source
    add_online_options(p)
    p.add_argument("--rho", type=float, default=1.0,
                   help="mix of test and training statistics for per-batch, ema and window (default 1)")
    p.add_argument("--reset-every", type=int, default=None, help="empty the running estimate every k images (default never)")
    p.add_argument("--scenario", default="iid", metavar="iid|class-sorted|gradual|mixed|shift",
                   help="the stream's order and shift (default iid)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level; gradual: the last image's, shift: after the change (default 0.5; with "
                        "--corrupted: constant noise added to every image, default 0)")
    p.add_argument("--sigma-start", type=float, default=None, help="gradual: the first image's sigma; shift: before "
                                                                   "the change (default 0)")
    p.add_argument("--sigmas", default=None, help="mixed: the interleaved noise levels (default 0,0.25,0.5,0.75)")
    p.add_argument("--change-at", type=float, default=0.5, help="shift: fraction of the stream before the change (default 0.5)")
    p.add_argument("--concentration", type=float, default=0.1,
                   help="class-sorted: Dirichlet concentration, smaller = longer same-class runs (default 0.1)")
    c = p.add_argument_group("corrupted streams (the sets of `corruptions generate` or CIFAR-10-C; each image shown as "
                             "the set's version of the same "
                             "source image)")
    c.add_argument("--corrupted", default=None, metavar="DIR|cifar10-c:DIR|imagenet-c:DIR",
                   help="a corrupted set: a cache of `bnadapt corruptions generate` (DIR), CIFAR-10-C or ImageNet-C. "
                        "--data is then its clean source (default: the one the cache's manifest records; a released "
                        "set needs --data), and --images/--per-class/--subset-seed pick images of the set")
    c.add_argument("--corruptions", "--corruption", dest="corruptions", default=None, metavar="NAME[,NAME...]",
                   help="corruption(s) or sets (noise, blur, weather, digital, ...), in order: iid, class-sorted, "
                        "gradual one; shift one (clean -> it) or two (first -> second); mixed several (interleaved)")
    c.add_argument("--severity", type=int, default=None,
                   help="severity 1..5; gradual: the last image's, shift: after the change (default 3)")
    c.add_argument("--severity-start", type=int, default=None,
                   help="gradual: the first image's severity (steps to --severity in equal plateaus); shift: before "
                        "the change; 0 = clean (default 0; a shift between two corruptions: --severity)")
    c.add_argument("--severities", default=None, metavar="S[,S...]",
                   help="mixed: the interleaved severities 0..5 (0 = clean) for every corruption (default --severity)")
    c.add_argument("--params", default=None, metavar="imagenet|cifar",
                   help="severity parameter table of a set without manifest (default: the released set's own); a "
                        "cache's manifest records it")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,64", help="stream batch sizes (default 1,2,4,8,16,64)")
    p.add_argument("--stream-length", type=int, default=None,
                   help="images in the stream (default: the selected images; longer repeats them with fresh noise)")
    p.add_argument("--runs", type=int, default=3, help="streams (reshuffled, fresh noise) per setting (default 3)")
    opt.add_seed(p)
    opt.add_device(p, precision=True)
    opt.add_quiet(p)
    p.add_argument("--out", default=None, help="result file (.json)")
    p.add_argument("--plot", default=None, help="also draw accuracy along the stream (.png)")
    p.set_defaults(func=cmd_stream)
