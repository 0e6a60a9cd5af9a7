"""``bnadapt certify`` and ``bnadapt predict``: randomized smoothing of a (BN-adapted, frozen) model.

The base classifier at each sigma is the model adapted-then-frozen (:func:`bnadapt.adapt.adapt_then_freeze`)
on batches with ``N(0, sigma^2 I)`` noise drawn at that sigma (``--adapt``), or the model as it is
(without ``--adapt``; the paper's comparison rows). Adaptation images:

- ``--adapt-on calib`` (default): ``--calib-n`` images of the same split that are *not* certified,
  chosen with the seed. The base classifier is fixed before any certified image is seen, so the
  certificate is exactly Cohen et al.'s for a fixed classifier.
- ``--adapt-on test``: the certified images themselves (the paper's protocol: adapt on the test
  batch). The classifier then depends on the certified images through the BN statistics; each
  certificate is still a valid statement about *that* classifier, but the classifier was chosen after
  seeing the test set (transductive).

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank certifies its shard and rank 0 merges the rows.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt.errors import BnadaptError, check


def _base_factory(args, loaded, ds, cert_indices):
    """sigma -> frozen base classifier (adapted on noisy images at sigma, or the model as given)."""
    from bnadapt.adapt import adapt_then_freeze, check_model, check_rho
    from bnadapt.noise import batch_slices, prepare, run_generator

    if not args.adapt:
        model = prepare(loaded.model, compile=args.compile)
        return (lambda sigma, j: model), None
    check_model(loaded.model)
    rho = check_rho(args.rho)
    check(args.adapt_batch_size >= 2, f"--adapt-batch-size must be >= 2 (got {args.adapt_batch_size})")
    if args.adapt_on == "test":
        adapt_idx = np.asarray(cert_indices, dtype=np.int64)
    else:
        pool = np.setdiff1d(np.arange(len(ds)), np.asarray(cert_indices))
        check(len(pool) >= 2, "no images left for a calibration split; certify fewer images or use --adapt-on test")
        n_cal = min(args.calib_n, len(pool))
        adapt_idx = np.sort(np.random.default_rng([args.seed, 7]).choice(pool, n_cal, replace=False))

    def factory(sigma: float, j: int):
        gen = run_generator(args.seed, 1_000_003, j)

        def batches():
            for sl in batch_slices(len(adapt_idx), args.adapt_batch_size):
                x, _ = ds.get(adapt_idx[sl])
                yield x + sigma * torch.randn(x.shape, generator=gen)

        return prepare(adapt_then_freeze(loaded.model, batches(), rho), compile=args.compile)

    info = {"adapt_on": args.adapt_on, "rho": rho, "images": int(len(adapt_idx)),
            "batch_size": args.adapt_batch_size,
            "indices_sha256": __import__("hashlib").sha256(adapt_idx.tobytes()).hexdigest()}
    return factory, info


def _num_classes(loaded, ds) -> int:
    n = loaded.num_classes or len(ds.class_names)
    check(n >= 2, "cannot tell the number of classes; give a model with a card")
    return int(n)


def _dist_init() -> bool:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def _print_summary(summary: dict) -> None:
    from bnadapt.noise import format_table

    radii = summary["radii"]
    rows = [[f"sigma = {float(s):g}"] + [f"{100 * a:.1f}" for a in d["certified_accuracy"]]
            for s, d in summary["per_sigma"].items()]
    if len(summary["per_sigma"]) > 1:
        rows.append(["envelope (Bonferroni)"] + [f"{100 * a:.1f}" for a in summary["envelope"]["certified_accuracy"]])
        rows.append(["envelope (uncorrected)"] + [f"{100 * a:.1f}" for a in summary["envelope_uncorrected"]["certified_accuracy"]])
    print(f"Certified accuracy (%) at L2 radius, {summary['num_images']} images, alpha={summary['alpha']}"
          + ("" if summary["complete"] else " (INCOMPLETE run)"))
    print(format_table(["L2 radius"] + [f"{r:g}" for r in radii], rows))


def _setup(args):
    """Validate the sampling arguments, load model and data, and build the per-sigma base classifier:
    (out path, loaded model, dataset, data description, image indices, factory, adaptation info)."""
    from bnadapt.commands import check_output_path, data_from_args, model_from_args, validate_shape

    check(args.samples >= 1, f"--samples must be >= 1 (got {args.samples})")
    check(0 < args.alpha < 1, f"--alpha must lie in (0, 1) (got {args.alpha})")
    check(args.batch >= 1, f"--batch must be >= 1 (got {args.batch})")
    out = check_output_path(args.out)
    loaded = model_from_args(args)
    ds, indices, data = data_from_args(args)
    validate_shape(loaded, ds)
    idx = list(range(len(ds))) if indices is None else [int(i) for i in indices]
    factory, adapt_info = _base_factory(args, loaded, ds, idx)
    return out, loaded, ds, data, idx, factory, adapt_info


def cmd_certify(args) -> int:
    from bnadapt.commands import model_desc, parse_float_list
    from bnadapt.smoothing import Smooth, certify_run, certify_run_distributed, parse_shard, plot_certified_accuracy, summarize

    sigmas = parse_float_list(args.sigmas, "--sigmas")
    check(all(s > 0 for s in sigmas), f"every sigma must be > 0 (got {sigmas})")
    check(args.n0 >= 1, f"--n0 must be >= 1 (got {args.n0})")
    shard = parse_shard(args.shard) if args.shard else None
    out, loaded, ds, data, cert_idx, factory, adapt_info = _setup(args)
    num_classes = _num_classes(loaded, ds)
    params = {"model": model_desc(loaded), "data": data, "adapt": adapt_info, "batch": args.batch}

    def smooth_factory(sigma: float):
        return Smooth(factory(sigma, sigmas.index(sigma)), num_classes, sigma, batch_size=args.batch)

    kwargs = dict(sigmas=sigmas, n0=args.n0, n=args.samples, alpha=args.alpha, seed=args.seed,
                  resume=args.resume, progress=not args.quiet, params=params)
    t0 = time.time()
    distributed = _dist_init()
    if distributed:
        check(shard is None, "--shard and torchrun both split the work; use one of them")
        certify_run_distributed(smooth_factory, ds, cert_idx, out, **kwargs)
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return 0
    else:
        certify_run(smooth_factory, ds, cert_idx, out, shard=shard, **kwargs)
    summary = summarize(out, out_json=out.with_suffix(".json"))
    plot_certified_accuracy(summary, out.with_suffix(".png"),
                            title=f"{loaded.card.get('name') or Path(loaded.source).stem}"
                                  f"{' + adaptive BN' if args.adapt else ''}")
    _print_summary(summary)
    print(f"wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.png')} ({time.time() - t0:.0f} s)")
    return 0


def cmd_predict(args) -> int:
    from bnadapt.commands import model_desc
    from bnadapt.results import atomic_write_text, provenance, write_json
    from bnadapt.smoothing import ABSTAIN, Smooth, image_seed

    check(args.sigma > 0, f"--sigma must be > 0 (got {args.sigma})")
    out, loaded, ds, data, idx_list, factory, adapt_info = _setup(args)
    smooth = Smooth(factory(args.sigma, 0), _num_classes(loaded, ds), args.sigma, batch_size=args.batch)
    from tqdm import tqdm

    lines = ["idx\tlabel\tpredict\tcorrect\ttime"]
    correct = abstain = 0
    for idx in tqdm(idx_list, desc="predict", unit="img", disable=args.quiet):
        x, y = ds.get([idx])
        gen = torch.Generator().manual_seed(image_seed(args.seed, idx, 0))
        t = time.perf_counter()
        p = smooth.predict(x[0], args.samples, args.alpha, gen)
        dt = time.perf_counter() - t
        ok = int(p == int(y[0]))
        correct += ok
        abstain += int(p == ABSTAIN)
        lines.append(f"{idx}\t{int(y[0])}\t{p}\t{ok}\t{dt:.4f}")
    atomic_write_text(out, "\n".join(lines) + "\n")
    summary = {"experiment": "smoothed_predict", "accuracy": correct / len(idx_list), "abstain_rate": abstain / len(idx_list),
               "images": len(idx_list), "params": {"sigma": args.sigma, "n": args.samples, "alpha": args.alpha,
                                                   "seed": args.seed, "batch": args.batch, "adapt": adapt_info},
               "model": model_desc(loaded), "data": data, "provenance": provenance()}
    write_json(out.with_suffix(".json"), summary)
    print(f"smoothed accuracy {100 * summary['accuracy']:.1f}% (abstained {100 * summary['abstain_rate']:.1f}%) "
          f"on {len(idx_list)} images at sigma={args.sigma}; wrote {out}")
    return 0


def cmd_plot_certified(args) -> int:
    """Overlay certified-accuracy curves of several certify summaries (paper Fig. 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bnadapt.results import atomic_write_bytes

    out = Path(args.out)
    check(out.suffix == ".png", "--out must be a .png path")
    curves = []
    for item in args.summaries:
        path, _, label = item.partition("=")
        try:
            summary = json.loads(Path(path).read_text())
            radii = summary["radii"]
            per_sigma = summary["per_sigma"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BnadaptError(f"{path} is not a certify summary JSON ({type(e).__name__}); pass the .json that certify wrote") from None
        if len(per_sigma) == 1:
            (sig, d), = per_sigma.items()
            acc, what = d["certified_accuracy"], f"sigma = {float(sig):g}"
        else:
            acc, what = summary["envelope"]["certified_accuracy"], "envelope (Bonferroni)"
        curves.append((radii, acc, f"{label or Path(path).stem}, {what}"))
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for radii, acc, label in curves:
        ax.plot(radii, [100 * a for a in acc], marker="o", ms=3, lw=1.5, label=label)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(args.title or "Certified accuracy (randomized smoothing)")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out}")
    return 0


def _add_common(p, default_n: int) -> None:
    from bnadapt.commands import add_data_args, add_model_args

    add_model_args(p)
    add_data_args(p, default_n=default_n)
    p.add_argument("--adapt", action="store_true", help="adapt-then-freeze BN on noisy batches at each sigma (the paper's method)")
    p.add_argument("--adapt-on", choices=["calib", "test"], default="calib",
                   help="calib: a split of non-certified images (default); test: the certified images (paper)")
    p.add_argument("--calib-n", type=int, default=512, help="calibration images for --adapt-on calib (default 512)")
    p.add_argument("--rho", type=float, default=1.0, help="adaptation momentum (default 1)")
    p.add_argument("--adapt-batch-size", type=int, default=512, help="adaptation batch size (default 512)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--samples", type=int, default=100_000, help="Monte Carlo samples n (default 100,000)")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward (default 1,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="do not torch.compile the base classifier (compiling costs seconds once, then samples faster)")
    p.add_argument("--out", required=True, help="output TSV (a .json summary and .png plot are written beside it)")


def register(sub) -> None:
    p = sub.add_parser("certify", help="certify L2 robustness by randomized smoothing (Cohen et al.) of the adapted model")
    _add_common(p, default_n=100)
    p.set_defaults(per_class=None)
    p.add_argument("--sigmas", default="0.25,0.5,0.75", help="noise levels (default 0.25,0.5,0.75)")
    p.add_argument("--n0", type=int, default=100, help="selection samples n0 (default 100)")
    p.add_argument("--resume", action="store_true", help="continue a run: skip finished rows")
    p.add_argument("--shard", default=None, help="certify shard i of N (i/N), e.g. 0/4")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("plot-certified", help="overlay certified-accuracy curves of several certify runs (Fig. 1)")
    p.add_argument("summaries", nargs="+", metavar="SUMMARY.json[=LABEL]",
                   help="certify summaries; a multi-sigma run contributes its Bonferroni envelope")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot_certified)

    p = sub.add_parser("predict", help="smoothed prediction (Cohen et al. PREDICT) of the adapted model")
    _add_common(p, default_n=100)
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.set_defaults(func=cmd_predict)
