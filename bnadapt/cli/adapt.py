"""``bnadapt adapt``: adapt-then-freeze a model and write it as an ordinary checkpoint (deployment)."""

from __future__ import annotations

from bnadapt.cli import options as opt
from bnadapt.errors import check, check_batch_size, check_rho, check_seed, check_sigma


def _stream_defaults(args) -> None:
    for name, default in (("estimator", "ema"), ("momentum", 0.01), ("window", 256), ("robust", "none")):
        if getattr(args, name) is None:
            setattr(args, name, default)


def cmd_adapt(args) -> int:
    from bnadapt.adapt import check_model, to_plain
    from bnadapt.card import save_adapted
    from bnadapt.certify import adaptation_indices, adaptation_info, adapted_base

    rho = check_rho(args.rho, "--rho")
    sigma = check_sigma(args.sigma, "--sigma")
    batch = check_batch_size(args.batch_size, "--batch-size", adapting=not args.stream)
    if args.stream:
        from bnadapt.cli.stream import check_online_options

        _stream_defaults(args)
        online = check_online_options(args)
        check(len(online["estimators"]) == 1 and online["estimators"][0] in ("ema", "window"),
              f"--estimator {args.estimator} cannot be frozen: --stream snapshots the running estimate of one ema or "
              "window estimator (prior keeps none)")
    else:
        check(args.estimator is None and args.momentum is None and args.window is None and args.robust is None,
              "--estimator, --momentum, --window and --robust configure --stream; add --stream or drop them")
    seed = check_seed(args.seed, "--seed")
    out = opt.output(args, suffixes=(".safetensors",))
    ts = opt.output(args, "torchscript", suffixes=(".pt", ".ts"))
    card_path = out.with_suffix(".json")
    from bnadapt.results import check_distinct, check_output

    check_output(card_path, "the card of --out")
    check_distinct({"--out": out, "--torchscript": ts, "the card of --out": card_path})
    dev = opt.device(args)
    loaded, = opt.load_models(args)
    check(not loaded.is_torchscript, f"model {loaded.name} is TorchScript; adaptation swaps its BN layers, which needs "
                                     "the eager model: load it as a checkpoint or a state dict with --arch")
    check_model(loaded.model)
    sel = opt.selection(args)
    from bnadapt.models import check_model_on_data

    check_model_on_data(loaded, sel.image_shape, sel.num_classes)
    if args.adapt_on == "selected":
        idx = adaptation_indices(len(sel.dataset), sel.indices, adapt_on="test", seed=seed)
    else:
        idx = adaptation_indices(len(sel.dataset), sel.indices, adapt_on="calib", calib_n=args.calib_n, seed=seed)
    check(len(idx) >= 2, f"adaptation needs at least 2 images (got {len(idx)}); select more with --images")
    info = dict(adaptation_info(idx, adapt_on="test" if args.adapt_on == "selected" else "calib", rho=rho,
                                batch_size=batch, calib_n=args.calib_n), sigma=sigma, seed=seed, data=sel.describe())
    if args.stream:
        from bnadapt.certify import CALIB_KEY, sigma_key
        from bnadapt.stream import stream_then_freeze_on

        est = online["estimators"][0]
        frozen = stream_then_freeze_on(loaded.model, sel.dataset, idx, sigma=sigma, batch_size=batch, seed=seed,
                                       keys=(CALIB_KEY, sigma_key(sigma)), device=dev, rho=rho, estimator=est,
                                       momentum=online["momentum"], window=online["window"], robust=online["robust"])
        info.update(method=f"snapshot of the online {est} estimate after streaming the images in batches of {batch}",
                    estimator=est, momentum=online["momentum"] if est == "ema" else None,
                    window=online["window"] if est == "window" else None, robust=online["robust"])
    else:
        frozen = adapted_base(loaded.model, sel.dataset, idx, sigma=sigma, rho=rho, batch_size=batch, seed=seed,
                              device=dev)
    path = save_adapted(out, to_plain(frozen).cpu(), loaded, info, torchscript=ts or False,
                        example_shape=sel.image_shape, name=args.name)
    opt.say(f"wrote {path} and {card_path} (adapted on {len(idx)} images, sigma={sigma:g}, rho={rho:g})"
            + (f" and TorchScript {ts} (runs with plain torch.jit.load)" if ts else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("adapt", help="adapt-then-freeze a model on (noisy) images and write an ordinary checkpoint",
                       description="Adapt-then-freeze BN statistics on images with N(0, sigma^2) noise and write a "
                                   "plain checkpoint (+ card, optionally TorchScript) that loads without bnadapt. "
                                   "With the same calibration options it writes exactly the base classifier that "
                                   "`bnadapt certify --adapt` certifies at that sigma (--adapt-on calib: the "
                                   "calibration split of a certify run on the selected images; --adapt-on selected: "
                                   "the selected images themselves, as certify --adapt-on test).")
    opt.add_model(p)
    opt.add_data(p)
    p.add_argument("--adapt-on", choices=["selected", "calib"], default="selected",
                   help="selected: the images chosen by --data/--images (default); calib: --calib-n other images "
                        "of the same split, as certify --adapt-on calib")
    p.add_argument("--calib-n", type=int, default=512, help="images of the calibration split (default 512)")
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise added to the adaptation images (default 0)")
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum rho in [0, 1] (default 1)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="adaptation batch size (default 512; with --stream the stream's batch size, >= 1)")
    p.add_argument("--stream", action="store_true",
                   help="stream the images through an online estimator (--estimator ema|window) and freeze its "
                        "final running estimate instead of pooling all batches (docs/stream.md)")
    p.add_argument("--estimator", default=None, help="with --stream: ema (default) or window")
    p.add_argument("--momentum", type=float, default=None, help="with --stream: ema weight of one image (default 0.01)")
    p.add_argument("--window", type=int, default=None, help="with --stream: window length in images (default 256)")
    p.add_argument("--robust", default=None, metavar="none|median|trimmed",
                   help="with --stream: robust test statistics (default none)")
    opt.add_seed(p, "seed of the image order and the noise (default 0)")
    opt.add_device(p)
    p.add_argument("--name", default=None, help="name in the card (default: SOURCE+bn-sigmaS)")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors; its card .json is written beside it)")
    p.add_argument("--torchscript", default=None, help="also write a TorchScript file (.pt) here")
    p.set_defaults(func=cmd_adapt)
