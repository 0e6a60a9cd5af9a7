"""Accuracy of a (possibly adapted) model on any image set, under Gaussian noise or none (paper
Table 1, Tables 4 and 5); the one accuracy loop that the noise table, the sweeps and the corruption
evaluation share.

Protocol of one run (:func:`accuracy`): the evaluated images are shuffled with the run's seed, cut
into test batches of ``batch_size`` in that order (a trailing batch of one image joins the previous
one), and each batch gets fresh noise ``N(0, sigma^2 I)`` in pixel space (no clipping; none at
sigma 0). Without adaptation the model is used as given (eval mode). With adaptation each batch is
classified by the per-batch adapted model (:func:`bnadapt.adapt.adapt`), i.e. normalized with its own
statistics mixed at ``rho``. Run ``r`` draws its order and noise from the stream ``(seed, r)``
(:func:`bnadapt.runs.generator`); on CUDA the noise comes from a CUDA generator with the same seed, so
CUDA runs are reproducible but not bit-equal to CPU runs. Repeated runs reshuffle and resample; tables
report the mean and two sample standard deviations (ddof=1), as the paper does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from bnadapt.adapt import adapt
from bnadapt.data.pipeline import WaitClock, batches, to_float
from bnadapt.errors import (check_adapt_images, check_batch_size, check_choice, check_count, check_rho, check_seed,
                            check_sigma, check_unique)
from bnadapt.models.setup import setup_models
from bnadapt.results import Result, make_inputs, runs_cell
from bnadapt.runs import Progress, autocast, batch_slices, check_precision, generator, resolve_device, to_device
from bnadapt.tables import format_table, pct_cell

if TYPE_CHECKING:
    from bnadapt.data import Selection

DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75)
DEFAULT_RHOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
NOISE = "N(0, sigma^2 I) in pixel space, no clipping, fresh per image and run"


@torch.inference_mode()
def accuracy(
    model: nn.Module,
    dataset,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    sigma: float = 0.0,
    rho: float | None = None,
    batch_size: int = 512,
    seed: int = 0,
    run: int = 0,
    interpolate: str = "std",
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: Progress | None = None,
    clock: WaitClock | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (or ``indices`` of it) for one run of the protocol
    above. ``rho=None`` evaluates the model as given; a number the per-batch adapted model at that rho.
    The model must already be on ``device`` (default: where its parameters are). Deterministic for a
    given (seed, run, device, batch size), whatever the loading settings (:mod:`bnadapt.data.pipeline`:
    decoding workers, decoded cache); ``clock`` accumulates the time spent waiting for batches;
    ``model`` is never modified."""
    sigma = check_sigma(sigma)
    if rho is not None:
        rho = check_rho(rho)
        batch_size = check_batch_size(batch_size, "batch size", adapting=True)
        net = adapt(model, rho, interpolate=interpolate)
    else:
        batch_size = check_batch_size(batch_size)
        net = model
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = generator(seed, run)  # CPU: the order (and, on the CPU, the noise: the foundation's stream)
    noise_gen = gen if dev.type == "cpu" else generator(seed, run, device=dev)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    order = idx[torch.randperm(len(idx), generator=gen).numpy()]
    if rho is not None:
        check_adapt_images(len(order))
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    try:
        with autocast(dev, precision):
            chunks = [order[sl] for sl in batch_slices(len(order), batch_size)]
            for x, y in batches(dataset, chunks, pin=dev.type == "cuda", clock=clock):
                if sigma > 0:
                    if dev.type == "cpu":
                        x = to_float(x) + sigma * torch.randn(x.shape, generator=gen)
                        x = to_device(x, dev)
                    else:
                        x = to_float(to_device(x, dev))
                        x = x + sigma * torch.randn(x.shape, generator=noise_gen, device=dev)
                else:
                    x = to_float(to_device(x, dev))
                correct += (net(x).argmax(1) == y.to(dev)).sum()
                if progress is not None:
                    progress.update(len(y))
    finally:
        net.train(was_training)
    return int(correct) / max(len(order), 1)


@dataclass
class Cell:
    """Accuracies of repeated runs for one setting; :meth:`as_dict` is the shared repeated-runs cell
    (:func:`bnadapt.results.runs_cell`: mean, the paper's 2 sd, standard error, runs)."""

    accs: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    def as_dict(self) -> dict:
        return runs_cell(self.accs)


def repeated(model, dataset, indices, *, runs: int, seed: int, **kw) -> Cell:
    """``runs`` repetitions of :func:`accuracy` (run ``r`` uses the stream ``(seed, r)``)."""
    runs = check_count(runs, "runs")
    return Cell([accuracy(model, dataset, indices, seed=seed, run=r, **kw) for r in range(runs)])


def _noise_params(*, sigmas=DEFAULT_SIGMAS, rho=1.0, batch_size=512, runs=5, seed=0, device=None,
                  precision="fp32") -> dict:
    dev = resolve_device(device)
    return {"sigmas": check_unique([check_sigma(s, "sigmas") for s in sigmas], "sigmas"), "rho": check_rho(rho),
            "batch_size": check_batch_size(batch_size, "batch size", adapting=True), "runs": check_count(runs, "runs"),
            "seed": check_seed(seed), "device": dev, "precision": check_precision(precision, dev)}


def noise_inputs(models: Sequence, sel: Selection, **kw) -> dict:
    """The ``inputs`` of :func:`noise_table` for these arguments (computed without running it)."""
    p = _noise_params(**kw)
    return make_inputs(models=[m.describe() for m in models], data=sel.describe(),
                       params={"sigmas": p["sigmas"], "rho": p["rho"], "batch_size": p["batch_size"], "runs": p["runs"],
                               "interpolate": "std", "noise": NOISE},
                       seed=p["seed"], device=p["device"], precision=p["precision"])


def noise_table(models: Sequence, sel: Selection, *, quiet: bool = False, **kw) -> Result:
    """Paper Table 1: accuracy of each model (``LoadedModel``) under each noise level (``sigmas``), without
    and with per-batch adaptation at ``rho``, in test batches of ``batch_size``, ``runs`` times (keywords
    as :func:`noise_inputs`: sigmas, rho, batch_size, runs, seed, device, precision). A TorchScript
    model is evaluated without adaptation only (its layers cannot be swapped); its ``adapted`` cells are
    ``None``."""
    p = _noise_params(**kw)
    t0 = time.time()
    dev, precision, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=p["device"],
                                           precision=p["precision"], adapting="eager", images=len(sel))
    per_model = sum(2 - int(m.is_torchscript) for m in models)
    rows = []
    with Progress(per_model * len(p["sigmas"]) * p["runs"] * len(sel), "noise", quiet=quiet) as bar:
        for m, net in zip(models, nets):
            for s in p["sigmas"]:
                cell = dict(sigma=s, batch_size=p["batch_size"], runs=p["runs"], seed=p["seed"], device=dev,
                            precision=precision, progress=bar)
                std = repeated(net, sel.dataset, sel.indices, rho=None, **cell)
                ada = None if m.is_torchscript else repeated(net, sel.dataset, sel.indices, rho=p["rho"], **cell)
                rows.append({"model": m.name, "sigma": s, "standard": std.as_dict(),
                             "adapted": None if ada is None else ada.as_dict()})
    return Result("noise_table", noise_inputs(models, sel, **kw), {"rows": rows}, time.time() - t0)


def _sweep_params(*, over: str, values=None, sigma=0.5, rho=1.0, batch_size=512, runs=5, seed=0, device=None,
                  precision="fp32") -> dict:
    over = check_choice(over, ("rho", "batch-size"), "sweep")
    dev = resolve_device(device)
    p = {"over": over, "sigma": check_sigma(sigma), "runs": check_count(runs, "runs"), "seed": check_seed(seed),
         "batch_size": check_batch_size(batch_size, "batch size", adapting=True), "rho": check_rho(rho),
         "device": dev, "precision": check_precision(precision, dev)}
    if over == "rho":
        p["values"] = check_unique([check_rho(v, "rho values") for v in (values or DEFAULT_RHOS)], "rho values")
        p["settings"] = [(v, p["batch_size"]) for v in p["values"]]
    else:
        p["values"] = check_unique([check_batch_size(v, "batch-size values", adapting=True)
                                    for v in (values or DEFAULT_BATCH_SIZES)], "batch-size values")
        p["settings"] = [(p["rho"], v) for v in p["values"]]
    return p


def sweep_inputs(models: Sequence, sel: Selection, **kw) -> dict:
    """The ``inputs`` of :func:`sweep` for these arguments (computed without running it)."""
    p = _sweep_params(**kw)
    params = {"over": p["over"], "values": p["values"], "sigma": p["sigma"], "runs": p["runs"], "interpolate": "std",
              "noise": NOISE}
    params.update({"batch_size": p["batch_size"]} if p["over"] == "rho"
                  else {"rho": p["rho"], "no_adaptation_batch_size": p["batch_size"]})
    return make_inputs(models=[m.describe() for m in models], data=sel.describe(), params=params, seed=p["seed"],
                       device=p["device"], precision=p["precision"])


def sweep(models: Sequence, sel: Selection, *, quiet: bool = False, **kw) -> Result:
    """Paper Table 4 (``over="rho"``: rho over ``values`` at ``batch_size``) or Table 5
    (``over="batch-size"``: batch size over ``values`` at ``rho``), under noise ``sigma``, with the
    model without adaptation as the first column (evaluated in batches of ``batch_size``); keywords as
    :func:`sweep_inputs`: over, values, sigma, rho, batch_size, runs, seed, device, precision."""
    p = _sweep_params(**kw)
    t0 = time.time()
    dev, precision, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=p["device"],
                                           precision=p["precision"], adapting="all", needs="a sweep (it adapts the model)",
                                           images=len(sel))
    rows = []
    with Progress(len(models) * (len(p["settings"]) + 1) * p["runs"] * len(sel), f"sweep {p['over']}", quiet=quiet) as bar:
        for m, net in zip(models, nets):
            cell = dict(sigma=p["sigma"], runs=p["runs"], seed=p["seed"], device=dev, precision=precision, progress=bar)
            base = repeated(net, sel.dataset, sel.indices, rho=None, batch_size=p["batch_size"], **cell)
            cells = [repeated(net, sel.dataset, sel.indices, rho=r, batch_size=b, **cell) for r, b in p["settings"]]
            rows.append({"model": m.name, "no_adaptation": base.as_dict(),
                         "settings": [{"rho": r, "batch_size": b, **c.as_dict()} for (r, b), c in zip(p["settings"], cells)]})
    return Result(f"sweep_{p['over'].replace('-', '_')}", sweep_inputs(models, sel, **kw), {"over": p["over"], "rows": rows},
                  time.time() - t0)


# ----------------------------------------------------------------------------------------- tables
def format_noise_table(result: dict) -> str:
    """The Table 1 layout from a ``noise_table`` result (dict form)."""
    prm, res = result["inputs"]["params"], result["results"]
    sigmas = prm["sigmas"]
    rows = []
    names = list(dict.fromkeys(r["model"] for r in res["rows"]))
    for name in names:
        mine = [r for r in res["rows"] if r["model"] == name]
        rows.append([name] + [pct_cell(r["standard"]) for r in mine])
        rows.append(["  + adaptive BN"] + [pct_cell(r["adapted"]) if r["adapted"] else "n/a (TorchScript)" for r in mine])
    head = (f"Top-1 accuracy (%) under Gaussian noise, mean ± 2 sd over {prm['runs']} runs, "
            f"{result['inputs']['data']['n']} images, batch {prm['batch_size']}, rho={prm['rho']:g}")
    return head + "\n" + format_table(["model"] + [f"sigma={s:g}" for s in sigmas], rows)


def format_sweep(result: dict) -> str:
    """The Table 4 / Table 5 layout from a sweep result (dict form)."""
    prm, res = result["inputs"]["params"], result["results"]
    over = res["over"]
    label = "rho" if over == "rho" else "batch"
    header = ["model", "-"] + [f"{label}={v:g}" for v in prm["values"]]
    rows = [[r["model"], pct_cell(r["no_adaptation"])] + [pct_cell(s) for s in r["settings"]] for r in res["rows"]]
    fixed = f"batch {prm['batch_size']}" if over == "rho" else f"rho={prm['rho']:g}"
    head = (f"Top-1 accuracy (%) at sigma={prm['sigma']:g}, {fixed}, mean ± 2 sd over {prm['runs']} runs, "
            f"{result['inputs']['data']['n']} images; '-' = no adaptation")
    return head + "\n" + format_table(header, rows)
