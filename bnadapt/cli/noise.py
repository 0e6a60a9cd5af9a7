"""``bnadapt noise`` (Table 1) and ``bnadapt sweep rho|batch-size`` (Tables 4, 5)."""

from __future__ import annotations

from bnadapt.cli import options as opt
from bnadapt.errors import check_rho, check_seed, check_sigma


def cmd_noise(args) -> int:
    from bnadapt import noise

    sigmas = [check_sigma(s, "--sigmas") for s in opt.float_list(args.sigmas, "--sigmas")]
    check_rho(args.rho, "--rho")
    check_seed(args.seed, "--seed")
    from bnadapt.errors import check_batch_size, check_count

    check_batch_size(args.batch_size, "--batch-size", adapting=True)
    check_count(args.runs, "--runs")
    out = opt.output(args, suffixes=(".json",))
    dev = opt.device(args)
    models = opt.load_models(args)
    sel = opt.selection(args)
    res = noise.noise_table(models, sel, sigmas=sigmas, rho=args.rho, batch_size=args.batch_size, runs=args.runs,
                            seed=args.seed, device=dev, precision=args.precision, quiet=args.quiet)
    opt.say(noise.format_noise_table(res.as_dict()))
    if out:
        res.write(out)
        opt.say(f"wrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from bnadapt import noise

    check_sigma(args.sigma, "--sigma")
    check_seed(args.seed, "--seed")
    check_rho(args.rho, "--rho")
    from bnadapt.errors import check_batch_size, check_count

    check_batch_size(args.batch_size, "--batch-size", adapting=True)
    check_count(args.runs, "--runs")
    if args.over == "rho":
        values = [check_rho(v, "--values") for v in opt.float_list(args.values, "--values")] if args.values else None
    else:
        values = opt.int_list(args.values, "--values") if args.values else None
    out = opt.output(args, suffixes=(".json",))
    dev = opt.device(args)
    models = opt.load_models(args)
    sel = opt.selection(args)
    res = noise.sweep(models, sel, over=args.over, values=values, sigma=args.sigma, rho=args.rho,
                      batch_size=args.batch_size, runs=args.runs, seed=args.seed, device=dev,
                      precision=args.precision, quiet=args.quiet)
    opt.say(noise.format_sweep(res.as_dict()))
    if out:
        res.write(out)
        opt.say(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("noise", help="accuracy under Gaussian noise with and without adaptive BN (Table 1)",
                       description="Accuracy of each model under Gaussian noise, without and with per-batch "
                                   "adaptive BN, mean ± 2 sd over repeated runs (paper Table 1). A TorchScript "
                                   "model is evaluated without adaptation only.")
    opt.add_model(p, multiple=True)
    opt.add_data(p)
    p.add_argument("--sigmas", default="0,0.25,0.5,0.75", help="noise levels in pixel units (default 0,0.25,0.5,0.75)")
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum rho in [0, 1] (default 1)")
    p.add_argument("--batch-size", type=int, default=512, help="test batch size (default 512)")
    p.add_argument("--runs", type=int, default=5, help="repeated runs: reshuffle and resample noise (default 5)")
    opt.add_seed(p)
    opt.add_device(p, precision=True)
    opt.add_quiet(p)
    p.add_argument("--out", default=None, help="result file (.json)")
    p.set_defaults(func=cmd_noise)

    p = sub.add_parser("sweep", help="sweep rho (Table 4) or the test batch size (Table 5) under Gaussian noise",
                       description="Accuracy under Gaussian noise as rho (at a fixed batch size) or the test batch "
                                   "size (at a fixed rho) varies; the '-' column is the model without adaptation.")
    p.add_argument("over", choices=["rho", "batch-size"], help="what to sweep")
    opt.add_model(p, multiple=True)
    opt.add_data(p)
    p.add_argument("--values", default=None,
                   help="comma-separated values (default: the paper's grid, rho 0,0.1,0.3,0.5,0.7,0.9,1 or "
                        "batch sizes 8,16,32,64,128,256,512)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.add_argument("--rho", type=float, default=1.0, help="rho when sweeping the batch size (default 1)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="batch size when sweeping rho, and of the no-adaptation column (default 512)")
    p.add_argument("--runs", type=int, default=5, help="repeated runs (default 5)")
    opt.add_seed(p)
    opt.add_device(p, precision=True)
    opt.add_quiet(p)
    p.add_argument("--out", default=None, help="result file (.json)")
    p.set_defaults(func=cmd_sweep)
