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


def cmd_stream(args) -> int:
    from bnadapt import stream
    from bnadapt.stream import check_scenario, dataset_labels

    online = check_online_options(args)
    check_scenario(args.scenario, what="--scenario")
    batch_sizes = check_unique([check_batch_size(b, "--batch-sizes") for b in opt.int_list(args.batch_sizes,
                                                                                           "--batch-sizes")],
                               "--batch-sizes")
    sigma = check_sigma(args.sigma, "--sigma")
    check_sigma(args.sigma_start, "--sigma-start")
    sigmas = check_unique([check_sigma(s, "--sigmas") for s in opt.float_list(args.sigmas, "--sigmas")], "--sigmas")
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
    models = opt.load_models(args)
    sel = opt.selection(args)
    labeled = dataset_labels(sel.dataset) is not None
    check_scenario(args.scenario, labeled=labeled, what="--scenario")
    check(labeled, "online accuracy needs labels, but the data has none; use labeled data")
    res = stream.stream_evaluation(
        models, sel, estimators=online["estimators"], batch_sizes=batch_sizes, rho=rho, momentum=online["momentum"],
        window=online["window"], prior_n=online["prior_n"], reset_every=online.get("reset_every"),
        robust=online["robust"], scenario=args.scenario, sigma=sigma, sigma_start=args.sigma_start, sigmas=sigmas,
        change_at=args.change_at, concentration=args.concentration, stream_length=length, runs=runs, seed=seed,
        device=dev, precision=args.precision, quiet=args.quiet)
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
                                   "or shifting noise) batch by batch, down to one image: standard inference, the "
                                   "paper's per-batch adaptation (n/a at batch 1) and online estimators that keep a "
                                   "running estimate of the test statistics (docs/stream.md).")
    opt.add_model(p, multiple=True)
    opt.add_data(p)
    add_online_options(p)
    p.add_argument("--rho", type=float, default=1.0,
                   help="mix of test and training statistics for per-batch, ema and window (default 1)")
    p.add_argument("--reset-every", type=int, default=None, help="empty the running estimate every k images (default never)")
    p.add_argument("--scenario", default="iid", metavar="iid|class-sorted|gradual|mixed|shift",
                   help="the stream's order and shift (default iid)")
    p.add_argument("--sigma", type=float, default=0.5,
                   help="noise level; gradual: the last image's, shift: after the change (default 0.5)")
    p.add_argument("--sigma-start", type=float, default=0.0, help="gradual: the first image's sigma; shift: before the "
                                                                  "change (default 0)")
    p.add_argument("--sigmas", default="0,0.25,0.5,0.75", help="mixed: the interleaved noise levels (default 0,0.25,0.5,0.75)")
    p.add_argument("--change-at", type=float, default=0.5, help="shift: fraction of the stream before the change (default 0.5)")
    p.add_argument("--concentration", type=float, default=0.1,
                   help="class-sorted: Dirichlet concentration, smaller = longer same-class runs (default 0.1)")
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
