"""``bnadapt certify``, ``predict``, ``certify-merge`` and ``plot-certified``: randomized smoothing of a
(BN-adapted, frozen) model. Under torchrun (``torchrun --nproc_per_node=K -m bnadapt.cli certify ...``)
every rank certifies its share on its own device and rank 0 merges."""

from __future__ import annotations

import argparse
from pathlib import Path

from bnadapt.cli import options as opt
from bnadapt.errors import check, check_alpha, check_count, check_seed, check_sigma


def _validate_common(args) -> None:
    check_count(args.samples, "--samples")
    check_alpha(args.alpha, "--alpha")
    check_count(args.sample_batch, "--sample-batch")
    check_seed(args.seed, "--seed")
    from bnadapt.errors import check_batch_size, check_rho

    check_rho(args.rho, "--rho")
    check_batch_size(args.adapt_batch_size, "--adapt-batch-size", adapting=True)
    if args.adapt and args.adapt_on == "calib":
        check_count(args.calib_n, "--calib-n", min=2, hint="the calibration split estimates BN statistics")


def _outputs(args):
    from bnadapt.certify import summary_paths
    from bnadapt.results import check_distinct, check_output

    paths = summary_paths(opt.output(args, suffixes=(".tsv",)))
    check_output(paths["json"], "the summary beside --out")
    check_output(paths["png"], "the plot beside --out")
    check_distinct({"--out": paths["tsv"], "the summary": paths["json"], "the plot": paths["png"]})
    return paths


def cmd_certify(args) -> int:
    from bnadapt import certify as C
    from bnadapt.runs import distributed, world
    from bnadapt.viz import certified_series, plot_certified

    sigmas = [check_sigma(s, "--sigmas", positive=True) for s in opt.float_list(args.sigmas, "--sigmas")]
    check_count(args.n0, "--n0")
    _validate_common(args)
    shard = C.parse_shard(args.shard) if args.shard else None
    paths = _outputs(args)
    check(args.resume or not paths["tsv"].exists(),
          f"{paths['tsv']} already exists; pass --resume to continue that run, or choose another --out")
    if args.save_models:
        check(not Path(args.save_models).is_file(), f"--save-models {args.save_models} is a file; give a folder")
        from bnadapt.results import check_output

        check_output(Path(args.save_models) / "model.safetensors", "--save-models")
    dev = opt.device(args)
    loaded, = opt.load_models(args)
    sel = opt.selection(args)
    with distributed(dev):
        res = C.certify(loaded, sel, paths["tsv"], sigmas=sigmas, adapt=args.adapt, adapt_on=args.adapt_on,
                        calib_n=args.calib_n, rho=args.rho, adapt_batch_size=args.adapt_batch_size, n0=args.n0,
                        n=args.samples, alpha=args.alpha, sample_batch=args.sample_batch, seed=args.seed, device=dev,
                        precision=args.precision, compile=args.compile, resume=args.resume, shard=shard,
                        quiet=args.quiet, save_models=args.save_models)
        if world()[0] != 0 or res is None:
            return 0
    d = res.as_dict()
    res.write(paths["json"])
    title = f"{loaded.name}{' + adaptive BN' if args.adapt else ''}: certified accuracy"
    plot_certified(certified_series(d), paths["png"], title=title)
    opt.say(C.format_certify_table(d))
    warm = [v["warmup_s"] for v in d["results"]["per_sigma"].values() if v.get("warmup_s") is not None]
    opt.say(f"mean time per image and sigma {d['results']['mean_time_s'] or 0:.2f} s"
            + (f" (plus warm-up/compilation {sum(warm):.1f} s in all)" if warm else ""))
    opt.say(f"wrote {paths['tsv']} (+ one Cohen-layout TSV per sigma), {paths['json']} and {paths['png']}")
    return 0


def cmd_predict(args) -> int:
    from bnadapt import certify as C

    sigma = check_sigma(args.sigma, "--sigma", positive=True)
    _validate_common(args)
    paths = _outputs(args)
    dev = opt.device(args)
    loaded, = opt.load_models(args)
    sel = opt.selection(args)
    res = C.predict(loaded, sel, paths["tsv"], sigma=sigma, adapt=args.adapt, adapt_on=args.adapt_on,
                    calib_n=args.calib_n, rho=args.rho, adapt_batch_size=args.adapt_batch_size, n=args.samples,
                    alpha=args.alpha, sample_batch=args.sample_batch, seed=args.seed, device=dev,
                    precision=args.precision, compile=args.compile, quiet=args.quiet)
    res.write(paths["json"])
    r = res.results
    opt.say(f"smoothed accuracy {100 * r['accuracy']:.1f}% (abstained {100 * r['abstain_rate']:.1f}%) "
            f"on {r['images']} images at sigma={sigma:g}; wrote {paths['tsv']} and {paths['json']}")
    return 0


def cmd_merge(args) -> int:
    from bnadapt import certify as C
    from bnadapt.results import Result
    from bnadapt.viz import certified_series, plot_certified

    paths = _outputs(args)
    check(not paths["tsv"].exists() or args.overwrite, f"{paths['tsv']} exists; pass --overwrite or choose another --out")
    C.merge_shards(args.shards, paths["tsv"])
    side = C.read_sidecar(paths["tsv"])
    extra = side["params"]["extra"]
    inputs = dict(extra, seed=side["params"]["seed"])
    inputs["params"] = dict(inputs["params"], shard=None)
    results = C.summarize(paths["tsv"])
    results["warnings"] = C.settings_warnings(inputs["params"])
    results["cohen_tsvs"] = [str(p) for p in C.write_cohen_tsvs(paths["tsv"])]
    res = Result("certify", inputs, results, run={"merged_from": args.shards})
    d = res.as_dict()
    res.write(paths["json"])
    plot_certified(certified_series(d), paths["png"])
    opt.say(C.format_certify_table(d))
    opt.say(f"merged {len(args.shards)} shard(s) into {paths['tsv']}; wrote {paths['json']} and {paths['png']}")
    return 0


def cmd_plot(args) -> int:
    from bnadapt.results import read_result
    from bnadapt.viz import certified_series, plot_certified

    out = opt.output(args, suffixes=(".png",))
    series = []
    for item in args.summaries:
        path, _, label = item.partition("=")
        d = read_result(path, "certify")
        series += certified_series(d, label=label or None, summary_only=True)
    plot_certified(series, out, title=args.title or "Certified accuracy (randomized smoothing)")
    opt.say(f"wrote {out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    opt.add_model(p)
    opt.add_data(p, default_images=100)
    p.add_argument("--adapt", action="store_true",
                   help="adapt-then-freeze BN on noisy images at each sigma (the paper's method); needs an eager model")
    p.add_argument("--adapt-on", choices=["calib", "test"], default="calib",
                   help="calib: --calib-n images not certified (default; a classifier fixed in advance); "
                        "test: the certified images (the paper; transductive)")
    p.add_argument("--calib-n", type=int, default=512, help="images of the calibration split (default 512)")
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum (default 1)")
    p.add_argument("--adapt-batch-size", type=int, default=512, help="adaptation batch size (default 512)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--samples", type=int, default=100_000, help="Monte Carlo samples n (default 100,000)")
    p.add_argument("--sample-batch", "--batch", dest="sample_batch", type=int, default=1000,
                   help="noisy copies per forward pass (default 1,000; --batch is the old spelling)")
    opt.add_seed(p)
    opt.add_device(p, precision=True)
    opt.add_quiet(p)
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="do not torch.compile the base classifier (compiling costs seconds once, timed apart, then "
                        "samples faster; TorchScript models are never compiled)")


def register(sub) -> None:
    p = sub.add_parser("certify", help="certify L2 robustness by randomized smoothing (Cohen et al.) of the adapted model",
                       description="Certify each image at each sigma (Cohen et al.'s CERTIFY) with the model adapted "
                                   "and frozen at that sigma (--adapt) or as it is. Writes the rows (X.tsv, resumable), "
                                   "one Cohen-layout TSV per sigma (X.sigmaS.tsv), the summary (X.json) and a plot "
                                   "(X.png). A TorchScript model is certified as a fixed model (no --adapt).")
    _add_common(p)
    p.add_argument("--sigmas", default="0.25,0.5,0.75", help="noise levels (default 0.25,0.5,0.75)")
    p.add_argument("--n0", type=int, default=100, help="selection samples n0 (default 100)")
    p.add_argument("--resume", action="store_true", help="continue a run: skip finished rows")
    p.add_argument("--shard", default=None, help="certify shard i of N (i/N), e.g. 0/4; join with certify-merge")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="write each sigma's adapted base classifier here (checkpoint + card + TorchScript)")
    p.add_argument("--out", required=True, help="rows file X.tsv (X.json summary, X.png plot and X.sigmaS.tsv beside it)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("certify-merge", help="merge the TSVs of --shard runs into one run's rows, summary and plot")
    p.add_argument("shards", nargs="+", metavar="SHARD.tsv", help="the shard rows files (each with its .params.json)")
    p.add_argument("--out", required=True, help="merged rows file X.tsv (X.json and X.png beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("plot-certified", help="overlay the certified-accuracy curves of several certify runs (Fig. 1)")
    p.add_argument("summaries", nargs="+", metavar="SUMMARY.json[=LABEL]",
                   help="certify summaries (X.json); a multi-sigma run contributes its envelope of curves")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("predict", help="smoothed prediction (Cohen et al. PREDICT) of the adapted model",
                       description="Cohen et al.'s PREDICT on each image: the smoothed class or abstain. Writes the "
                                   "rows X.tsv (idx label predict correct time) and the summary X.json.")
    _add_common(p)
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.add_argument("--out", required=True, help="rows file X.tsv (the summary X.json goes beside it)")
    p.set_defaults(func=cmd_predict)
