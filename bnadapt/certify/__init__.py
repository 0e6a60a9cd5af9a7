"""Randomized-smoothing certification of an adapted, frozen model (paper Fig. 1, 3, Table 6).

At each sigma the base classifier is the model adapted-then-frozen (:func:`adapted_base`) on images
with ``N(0, sigma^2 I)`` noise at that sigma (``adapt=True``), or the model as given (the paper's
comparison rows). Which images it adapts on (:func:`adaptation_indices`):

- ``adapt_on="calib"`` (default): ``calib_n`` images of the same split that are *not* certified,
  chosen with the seed. The base classifier is fixed before any certified image is seen, so each
  certificate is exactly Cohen et al.'s for a fixed classifier.
- ``adapt_on="test"``: the certified images themselves (the paper: adapt on the test batch). The
  classifier then depends on the certified images through the BN statistics; each certificate is
  still a valid statement about *that* classifier, but it was chosen after seeing the test set
  (transductive).

The adaptation noise comes from the stream ``(seed, CALIB_KEY, round(sigma * 1e6))``, in a seeded
order of the adaptation images, so ``bnadapt adapt`` with the same calibration arguments writes the
identical model, and ``save_models`` writes each sigma's base classifier as an ordinary checkpoint.

:func:`certify` runs the rows (:mod:`bnadapt.certify.rows`: TSV, resume, shards, torchrun) and returns
the summary (:mod:`bnadapt.certify.summary`) as a result in the one format.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from bnadapt.certify.rows import (
    COLUMNS, RunResult, _warm_up, certify_run, certify_run_distributed, cohen_tsv_path, merge_shards, params_path,
    parse_shard, read_rows, read_sidecar, write_cohen_tsvs,
)
from bnadapt.certify.summary import DEFAULT_RADII, accuracy_at, certified_accuracy, summarize
from bnadapt.errors import (
    check, check_alpha, check_batch_size, check_choice, check_count, check_rho, check_seed, check_sigma, check_unique,
)
from bnadapt.results import Result, atomic_write_text, make_inputs
from bnadapt.rowfile import on_shard_or_ranks
from bnadapt.runs import Progress, check_precision, image_seed, indices_sha256, device_copy, prepare_model, resolve_device, world
from bnadapt.smoothing import ABSTAIN, Smooth
from bnadapt.tables import format_table, pct

__all__ = [
    "ADAPT_ON", "CALIB_KEY", "COLUMNS", "DEFAULT_RADII", "RunResult", "accuracy_at", "adaptation_indices",
    "adapted_base", "certified_accuracy", "certify", "certify_plan_inputs", "certify_run", "certify_run_distributed", "cohen_tsv_path",
    "format_certify_table", "merge_shards", "params_path", "parse_shard", "predict", "read_rows", "read_sidecar",
    "sigma_key", "summarize", "summary_paths", "write_cohen_tsvs",
]

CALIB_KEY = 1_000_003
ADAPT_ON = ("calib", "test")


def sigma_key(sigma: float) -> int:
    """The integer that names a noise level in seed streams (micro-units: 0.5 -> 500000)."""
    return int(round(float(sigma) * 1_000_000))


def adaptation_indices(n_data: int, cert_indices: Sequence[int], *, adapt_on: str = "calib", calib_n: int = 512,
                       seed: int = 0) -> np.ndarray:
    """The images the base classifier adapts on, in the order they are batched.

    ``calib``: ``calib_n`` images (fewer if fewer remain) drawn with ``seed`` from those not certified;
    ``test``: the certified images in a seeded order."""
    check_choice(adapt_on, ADAPT_ON, "--adapt-on")
    cert = np.asarray(cert_indices, dtype=np.int64)
    if adapt_on == "test":
        return cert[np.random.default_rng([int(seed), 8]).permutation(len(cert))]
    calib_n = check_count(calib_n, "--calib-n", min=2, hint="the calibration split estimates BN statistics")
    pool = np.setdiff1d(np.arange(n_data), cert)
    check(len(pool) >= 2, f"only {len(pool)} image(s) are left for a calibration split once the {len(cert)} certified "
                          "ones are set aside; certify fewer images or use --adapt-on test")
    return np.random.default_rng([int(seed), 7]).choice(pool, min(calib_n, len(pool)), replace=False)


def adapted_base(model: nn.Module, dataset, adapt_idx: np.ndarray, *, sigma: float, rho: float = 1.0,
                 batch_size: int = 512, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen base classifier at ``sigma``: :func:`bnadapt.adapt.adapt_then_freeze_on` on
    ``adapt_idx`` with noise from the stream ``(seed, CALIB_KEY, sigma_key(sigma))``."""
    from bnadapt.adapt import adapt_then_freeze_on

    return adapt_then_freeze_on(model, dataset, adapt_idx, rho=rho, sigma=sigma, batch_size=batch_size, seed=seed,
                                keys=(CALIB_KEY, sigma_key(sigma)), device=device)


def adaptation_info(adapt_idx: np.ndarray, *, adapt_on: str, rho: float, batch_size: int, calib_n: int | None) -> dict:
    """How the base classifiers were adapted (recorded in results and model cards)."""
    return {"method": "adapt-then-freeze on noisy images at each sigma", "adapt_on": adapt_on, "rho": rho,
            "interpolate": "std", "images": int(len(adapt_idx)), "calib_n": calib_n if adapt_on == "calib" else None,
            "batch_size": batch_size, "indices_sha256": indices_sha256(adapt_idx),
            "noise_stream": f"(seed, {CALIB_KEY}, round(sigma * 1e6))"}


def summary_paths(out_tsv: str | Path) -> dict[str, Path]:
    """``X.tsv`` -> rows ``X.tsv``, summary ``X.json``, plot ``X.png`` (a summary can never overwrite rows)."""
    p = Path(out_tsv)
    check(p.name.endswith(".tsv") and len(p.name) > 4,
          f"--out {p} must name the rows file and end in .tsv (the summary X.json and plot X.png go beside it)")
    return {"tsv": p, "json": p.with_suffix(".json"), "png": p.with_suffix(".png")}


def _num_classes(loaded, sel) -> int:
    from bnadapt.models import check_model_on_data

    outputs = check_model_on_data(loaded, sel.image_shape, sel.num_classes)
    return int(loaded.num_classes or outputs)


def _base_factory(loaded, sel, *, adapt: bool, adapt_on: str, calib_n: int, rho: float, adapt_batch_size: int,
                  seed: int, device: torch.device, compile: bool, save_models: Path | None):
    """``sigma -> base classifier`` and the adaptation info (None without adaptation)."""
    if not adapt:
        net = device_copy(loaded.model, device, compile=compile)
        return (lambda sigma: net), None
    from bnadapt.adapt import check_model, to_plain

    check(not loaded.is_torchscript, f"model {loaded.name} is TorchScript: it can be certified as it is (drop --adapt), "
                                     "but adaptation needs the eager model (a checkpoint, or a state dict with --arch)")
    check_model(loaded.model)
    adapt_idx = adaptation_indices(len(sel.dataset), sel.indices, adapt_on=adapt_on, calib_n=calib_n, seed=seed)
    info = adaptation_info(adapt_idx, adapt_on=adapt_on, rho=rho, batch_size=adapt_batch_size, calib_n=calib_n)

    def factory(sigma: float) -> nn.Module:
        frozen = adapted_base(loaded.model, sel.dataset, adapt_idx, sigma=sigma, rho=rho,
                              batch_size=adapt_batch_size, seed=seed, device=device)
        factory.built.add(sigma)
        if save_models is not None and world()[0] == 0:
            from bnadapt.card import adapted_name, save_adapted

            full = dict(info, sigma=sigma, seed=seed, data=sel.describe())
            save_adapted(save_models / f"{adapted_name(loaded.name, full)}.safetensors", to_plain(frozen), loaded,
                         full, torchscript=True, example_shape=sel.image_shape)
        return prepare_model(frozen, device, compile=compile)

    factory.built = set()  # the sigmas whose base classifier was built (and, with save_models, written)
    return factory, info


def certify_inputs(loaded, sel, *, sigmas, n0, n, alpha, seed, adapt_info, sample_batch, compile, shard,
                   device, precision) -> dict:  # noqa: D417 - the certification's inputs block
    """The ``inputs`` of a certification result (also what its rows' sidecar records)."""
    return make_inputs(models=[loaded.describe()], data=sel.describe(),
                       params={"sigmas": list(sigmas), "n0": n0, "n": n, "alpha": alpha, "adapt": adapt_info,
                               "sample_batch": sample_batch, "compile": compile,
                               "shard": list(shard) if shard else None},
                       seed=seed, device=device.type, precision=precision)


def _certify_params(loaded, *, sigmas: Sequence[float] = (0.25, 0.5, 0.75), adapt: bool = False,
                    adapt_on: str = "calib", calib_n: int = 512, rho: float = 1.0, adapt_batch_size: int = 512,
                    n0: int = 100, n: int = 100_000, alpha: float = 0.001, sample_batch: int = 1000, seed: int = 0,
                    device=None, precision: str = "fp32", compile: bool | None = None,
                    shard: tuple[int, int] | str | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    return {
        "sigmas": check_unique([check_sigma(s, "--sigmas", positive=True) for s in sigmas], "--sigmas"),
        "adapt": bool(adapt), "adapt_on": check_choice(adapt_on, ADAPT_ON, "--adapt-on"), "calib_n": calib_n,
        "rho": check_rho(rho, "--rho"), "n0": check_count(n0, "--n0"), "n": check_count(n, "--samples"),
        "adapt_batch_size": check_batch_size(adapt_batch_size, "--adapt-batch-size", adapting=True),
        "alpha": check_alpha(alpha, "--alpha"), "sample_batch": check_count(sample_batch, "--sample-batch"),
        "seed": check_seed(seed, "--seed"), "device": dev, "precision": check_precision(precision, dev, "--precision"),
        "compile": (not loaded.is_torchscript) if compile is None else bool(compile and not loaded.is_torchscript),
        "shard": parse_shard(shard) if isinstance(shard, str) else (tuple(shard) if shard else None),
    }


def certify_plan_inputs(loaded, sel, **kw) -> dict:
    """The ``inputs`` of :func:`certify` for these keyword arguments, computed without certifying."""
    p = _certify_params(loaded, **kw)
    info = None
    if p["adapt"]:
        idx = adaptation_indices(len(sel.dataset), sel.indices, adapt_on=p["adapt_on"], calib_n=p["calib_n"],
                                 seed=p["seed"])
        info = adaptation_info(idx, adapt_on=p["adapt_on"], rho=p["rho"], batch_size=p["adapt_batch_size"],
                               calib_n=p["calib_n"])
    return certify_inputs(loaded, sel, adapt_info=info, **{k: p[k] for k in (
        "sigmas", "n0", "n", "alpha", "seed", "sample_batch", "compile", "shard", "device", "precision")})


def certify(loaded, sel, out_tsv: str | Path, *, resume: bool = False, quiet: bool = False,
            save_models: str | Path | None = None, **kw) -> Result | None:
    """Certify ``sel``'s images at every sigma into ``out_tsv`` and return the summary result.

    Keywords (see ``bnadapt certify --help``): sigmas, adapt, adapt_on, calib_n, rho, adapt_batch_size,
    n0, n, alpha, sample_batch, seed, device, precision, compile, shard. Under torchrun every rank
    certifies its share and rank 0 merges; ranks other than 0 return None. ``compile`` (default: yes,
    unless the model is TorchScript) ``torch.compile``s the base classifier; its warm-up is timed apart
    from the rows. ``save_models`` writes each sigma's adapted base classifier there as a checkpoint +
    TorchScript."""
    p = _certify_params(loaded, **kw)
    paths = summary_paths(out_tsv)
    dev, precision, sigmas = p["device"], p["precision"], p["sigmas"]
    num_classes = _num_classes(loaded, sel)
    save_dir = Path(save_models) if save_models is not None else None
    t0 = time.time()
    factory, adapt_info = _base_factory(loaded, sel, adapt=p["adapt"], adapt_on=p["adapt_on"], calib_n=p["calib_n"],
                                        rho=p["rho"], adapt_batch_size=p["adapt_batch_size"], seed=p["seed"],
                                        device=dev, compile=p["compile"], save_models=save_dir)
    inputs = certify_inputs(loaded, sel, adapt_info=adapt_info, **{k: p[k] for k in (
        "sigmas", "n0", "n", "alpha", "seed", "sample_batch", "compile", "shard", "device", "precision")})

    def smooth_factory(sigma: float) -> Smooth:
        return Smooth(factory(sigma), num_classes, sigma, batch_size=p["sample_batch"], precision=precision)

    extra = {k: v for k, v in inputs.items() if k != "seed"}  # seed and shard are run parameters of their own
    extra["params"] = {k: v for k, v in extra["params"].items() if k != "shard"}
    kwargs = dict(sigmas=sigmas, n0=p["n0"], n=p["n"], alpha=p["alpha"], seed=p["seed"], resume=resume, quiet=quiet,
                  params=extra)
    on_shard_or_ranks(p["shard"],
                      lambda s: certify_run(smooth_factory, sel.dataset, sel.indices, paths["tsv"], shard=s, **kwargs),
                      lambda: certify_run_distributed(smooth_factory, sel.dataset, sel.indices, paths["tsv"], **kwargs))
    if world()[0] != 0:  # another torchrun rank: rank 0 summarizes
        return None
    if save_dir is not None and p["adapt"]:
        for sigma in sigmas:  # sigmas finished before a --resume were never built in this run: write them too
            if sigma not in factory.built:
                factory(sigma)
    results = summarize(paths["tsv"])
    results["warnings"] = settings_warnings(inputs["params"])
    results["cohen_tsvs"] = [str(p) for p in write_cohen_tsvs(paths["tsv"])]
    return Result("certify", inputs, results, time.time() - t0)


def predict(
    loaded,
    sel,
    out_tsv: str | Path,
    *,
    sigma: float = 0.5,
    adapt: bool = False,
    adapt_on: str = "calib",
    calib_n: int = 512,
    rho: float = 1.0,
    adapt_batch_size: int = 512,
    n: int = 100_000,
    alpha: float = 0.001,
    sample_batch: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    compile: bool | None = None,
    quiet: bool = False,
) -> Result:
    """Cohen et al.'s PREDICT of the smoothed (adapted, frozen) classifier on every image of ``sel``:
    rows ``idx label predict correct time`` in ``out_tsv`` and a summary result (accuracy, abstention)."""
    sigma = check_sigma(sigma, "--sigma", positive=True)
    n, alpha = check_count(n, "--samples"), check_alpha(alpha, "--alpha")
    sample_batch, seed = check_count(sample_batch, "--sample-batch"), check_seed(seed, "--seed")
    rho = check_rho(rho, "--rho")
    adapt_batch_size = check_batch_size(adapt_batch_size, "--adapt-batch-size", adapting=True)
    paths = summary_paths(out_tsv)
    dev = resolve_device(device)
    precision = check_precision(precision, dev, "--precision")
    compile = (not loaded.is_torchscript) if compile is None else bool(compile and not loaded.is_torchscript)
    num_classes = _num_classes(loaded, sel)
    t0 = time.time()
    factory, adapt_info = _base_factory(loaded, sel, adapt=adapt, adapt_on=adapt_on, calib_n=calib_n, rho=rho,
                                        adapt_batch_size=adapt_batch_size, seed=seed, device=dev, compile=compile,
                                        save_models=None)
    smooth = Smooth(factory(sigma), num_classes, sigma, batch_size=sample_batch, precision=precision)
    # every sampling batch shape once before the first timed image (torch.compile happens here)
    warmup_s = _warm_up(smooth, sel.dataset.get([int(sel.indices[0])])[0][0], n, n) if len(sel) else 0.0
    lines = ["idx\tlabel\tpredict\tcorrect\ttime"]
    correct = abstain = 0
    with Progress(len(sel), "predict", quiet=quiet) as bar:
        for idx in sel.indices:
            x, y = sel.dataset.get([int(idx)])
            gen = torch.Generator(device=smooth.device).manual_seed(image_seed(seed, int(idx), 0))
            t = time.perf_counter()
            p = smooth.predict(x[0], n, alpha, gen)
            dt = time.perf_counter() - t
            ok = int(p == int(y[0]))
            correct += ok
            abstain += int(p == ABSTAIN)
            lines.append(f"{int(idx)}\t{int(y[0])}\t{p}\t{ok}\t{dt:.4f}")
            bar.update(1)
    atomic_write_text(paths["tsv"], "\n".join(lines) + "\n")
    inputs = make_inputs(models=[loaded.describe()], data=sel.describe(),
                         params={"sigma": sigma, "n": n, "alpha": alpha, "adapt": adapt_info,
                                 "sample_batch": sample_batch, "compile": compile},
                         seed=seed, device=dev.type, precision=precision)
    results = {"tsv": str(paths["tsv"]), "images": len(sel), "accuracy": correct / len(sel),
               "abstain_rate": abstain / len(sel), "warmup_s": round(warmup_s, 4)}
    return Result("smoothed_predict", inputs, results, time.time() - t0)


def settings_warnings(params: dict) -> list[str]:
    """Warnings about settings that run but are almost always a mistake (stored in the result, printed
    under the table): fewer estimation samples (``n``) than selection samples (``n0``)."""
    out = []
    n0, n = params.get("n0"), params.get("n")
    if n0 is not None and n is not None and n < n0:
        out.append(f"--samples {n} is smaller than --n0 {n0}: the radius is estimated from fewer samples than the "
                   "class was selected with (Cohen et al. use n0=100, n=100000); were the two swapped?")
    return out


def format_certify_table(result: dict) -> str:
    """Certified accuracy (%) at each radius: one row per sigma, plus the two multi-sigma summaries."""
    res = result["results"]
    radii = res["radii"]
    rows = [[f"sigma = {float(s):g}"] + [pct(a) for a in d["certified_accuracy"]] for s, d in res["per_sigma"].items()]
    if "envelope_of_curves" in res:
        env = res["envelope_of_curves"]
        rows.append(["envelope of curves (best fixed sigma)"] + [pct(a) for a in env["certified_accuracy"]])
        rows.append(["  ... its sigma"] + [f"{s:g}" for s in env["sigma"]])
        rows.append([f"per-image selection (label-free, alpha/{len(res['sigmas'])})"]
                    + [pct(a) for a in res["per_image_selection"]["certified_accuracy"]])
    state = ""
    if res.get("partial"):
        state = f" (PARTIAL: shard {res['shard'][0]}/{res['shard'][1]} only; merge the shards for the whole run)"
    elif not res.get("complete"):
        state = " (INCOMPLETE run: resume it with --resume)"
    head = (f"Certified accuracy (%) at L2 radius, {res['num_images']} images, n={res['n']}, alpha={res['alpha']}"
            f"{state}")
    warn = "".join(f"\nWARNING: {w}" for w in res.get("warnings", []))
    return head + "\n" + format_table(["L2 radius"] + [f"{r:g}" for r in radii], rows) + warn
