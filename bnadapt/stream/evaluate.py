"""Online accuracy over a test stream (docs/stream.md, "Evaluation protocol").

For each run, one stream (:func:`~bnadapt.stream.scenarios.make_stream`, seeded ``(seed, run)``) is
classified, position by position in stream order, by every method on exactly the same images and
noise:

- ``standard``: the model as given (eval mode, training statistics). Its predictions do not depend on
  the batch size, so it runs once per stream (in batches of the largest batch size) and every row
  shows that number.
- ``per-batch``: the paper's adaptation (:func:`bnadapt.adapt.adapt`) on consecutive batches of ``b``
  stream images (a trailing single image joins the previous batch, as in ``bnadapt noise``). It cannot
  run at ``b = 1`` (one image has no batch statistics): that cell is ``None`` ("n/a"), never 0.
- each online estimator (:func:`bnadapt.adapt.stream_adapt`): a fresh model per stream and batch size,
  fed consecutive batches of ``b`` (the last one may be shorter), each classified right after it
  entered the estimate.

An image counts as correct when the arg-max of its logits is its label. Reported per (model, batch
size, method): the accuracy over the whole stream (mean ± 2 sd over runs, as the paper's tables), the
accuracy over the first L images for the ``lengths`` grid (all methods are causal, so that is exactly
the online accuracy of a stream of length L), and the accuracy in ``bins`` consecutive segments (the
curve along the stream, averaged over runs).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bnadapt.adapt import ESTIMATORS, adapt, stream_adapt
from bnadapt.errors import check, check_batch_size, check_choice, check_count, check_rho, check_seed, check_unique
from bnadapt.models.setup import setup_models
from bnadapt.noise import Cell
from bnadapt.results import Result, make_inputs
from bnadapt.robust_stats import ROBUST
from bnadapt.runs import Progress, autocast, batch_slices, generator
from bnadapt.stream.scenarios import NoiseCache, Stream, dataset_labels, make_stream, stream_batches
from bnadapt.tables import format_table, pct_cell

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 64)
DEFAULT_ESTIMATORS = ("ema", "window", "prior")


def lengths_grid(length: int, start: int = 50) -> list[int]:
    """Stream lengths at which prefix accuracies are reported: 50, 100, 200, 500, 1000, ... below
    ``length``, and ``length`` itself."""
    out, k = [], 0
    while True:
        v = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        k += 1
        if v >= length:
            break
        if v >= start:
            out.append(v)
    return out + [length]


@torch.inference_mode()
def stream_correct(net: nn.Module, dataset, stream: Stream, slices, *, device: torch.device,
                   precision: str = "fp32", progress: Progress | None = None) -> np.ndarray:
    """Whether ``net`` classifies each stream position correctly (bool array), feeding it the stream's
    batches given by ``slices`` in order. ``net`` must already be on ``device``."""
    check(stream.labels is not None, "online accuracy needs labels, but the data has none; use labeled data")
    out = torch.zeros(len(stream), dtype=torch.bool, device=device)
    noise = NoiseCache(dataset.image_shape, stream.seed, stream.run)
    with autocast(device, precision):
        for a, b, x, y in stream_batches(dataset, stream, slices, device=device, noise=noise):
            out[a:b] = net(x).argmax(1) == y.to(device)
            if progress is not None:
                progress.update(b - a)
    return out.cpu().numpy()


def online_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of ``batch_size`` stream positions (the last one may be shorter)."""
    return [slice(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


def _summary(corrects: list[np.ndarray], lengths: Sequence[int], edges: np.ndarray) -> dict:
    runs = [float(c.mean()) for c in corrects]
    cell = Cell(runs).as_dict()
    cell["prefix"] = [{"length": L, **{k: v for k, v in Cell([float(c[:L].mean()) for c in corrects]).as_dict().items()
                                       if k != "runs"}} for L in lengths]
    per_run = np.stack([[c[a:b].mean() for a, b in zip(edges[:-1], edges[1:])] for c in corrects])
    cell["curve"] = [float(v) for v in per_run.mean(0)]
    return cell


def stream_evaluation(
    models: Sequence,
    sel,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    rho: float = 1.0,
    momentum: float = 0.01,
    window: int = 256,
    prior_n: float = 16.0,
    reset_every: int | None = None,
    robust: str | None = None,
    scenario: str = "iid",
    sigma: float | None = None,
    sigma_start: float = 0.0,
    sigmas: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    change_at: float = 0.5,
    concentration: float = 0.1,
    stream_length: int | None = None,
    runs: int = 3,
    seed: int = 0,
    bins: int = 50,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    quiet: bool = False,
    corrupted=None,
    corruptions=None,
    severity: int = 3,
    severity_start: int | None = None,
    severities=None,
) -> Result:
    """Online accuracy of each model (``LoadedModel``) over ``runs`` streams of ``scenario`` (module
    docstring): standard inference, per-batch adaptation at ``rho`` and every online estimator, at each
    batch size. ``robust`` applies to per-batch adaptation and to the estimators. A TorchScript model
    gets the standard column only. Deterministic for equal arguments on one device.

    Noise streams: ``sigma`` (default 0.5), ``sigma_start``, ``sigmas``. Corrupted streams:
    ``corrupted`` (a :class:`~bnadapt.stream.scenarios.CorruptedSource`; ``sel`` from its
    ``selection()``), ``corruptions``, ``severity``, ``severity_start``, ``severities``
    (:func:`~bnadapt.stream.scenarios.check_corruption_domain`), ``sigma`` an added constant noise
    (default 0); the set's identity and severity table are recorded in the inputs."""
    estimators = check_unique([check_choice(e, ESTIMATORS, "estimator") for e in estimators], "estimators")
    batch_sizes = check_unique([check_batch_size(b, "batch sizes") for b in batch_sizes], "batch sizes")
    rho = check_rho(rho)
    runs = check_count(runs, "runs")
    seed = check_seed(seed)
    bins = check_count(bins, "bins")
    if robust is not None:
        check_choice(robust, ROBUST, "robust statistic")
    check(dataset_labels(sel.dataset) is not None, "online accuracy needs labels, but the data has none; use labeled data")
    online_kw = dict(momentum=momentum, window=window, prior_n=prior_n, reset_every=reset_every, robust=robust)
    scen_kw = dict(scenario=scenario, length=stream_length, sigma=sigma, sigma_start=sigma_start, sigmas=tuple(sigmas),
                   change_at=change_at, concentration=concentration, seed=seed)
    if corrupted is not None:
        scen_kw.update(corrupted=corrupted, corruptions=corruptions, severity=severity, severity_start=severity_start,
                       severities=None if severities is None else tuple(severities))
    streams = [make_stream(sel, run=r, **scen_kw) for r in range(runs)]  # validates the scenario before any work
    probe = nn.Sequential(nn.BatchNorm1d(1)).eval()
    for e in estimators:  # validates the estimator options before any work
        stream_adapt(probe, None if e == "prior" else rho, estimator=e, **online_kw)
    t0 = time.time()
    dev, precision, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=device, precision=precision,
                                           adapting="eager", images=len(sel))
    L = len(streams[0])
    lengths = lengths_grid(L)
    edges = np.unique(np.linspace(0, L, min(bins, L) + 1).astype(int))
    adaptable = [not m.is_torchscript for m in models]
    per_stream = sum(1 + (len(batch_sizes) * (len(estimators) + 1) if a else 0) for a in adaptable)
    methods = ["standard", "per-batch", *estimators]
    got: dict = {}
    with Progress(runs * per_stream * L, "stream", quiet=quiet) as bar:
        for stream in streams:
            for mi, (_m, net) in enumerate(zip(models, nets)):
                std = stream_correct(net, sel.dataset, stream, online_slices(L, max(batch_sizes)), device=dev,
                                     precision=precision, progress=bar)
                for b in batch_sizes:
                    row = got.setdefault((mi, b), {k: [] for k in methods})
                    row["standard"].append(std)
                    if not adaptable[mi]:
                        continue
                    if b >= 2:
                        pb = adapt(net, rho, robust=robust)
                        row["per-batch"].append(stream_correct(pb, sel.dataset, stream, batch_slices(L, b),
                                                               device=dev, precision=precision, progress=bar))
                    else:
                        bar.update(L)
                    for e in estimators:
                        on = stream_adapt(net, None if e == "prior" else rho, estimator=e, **online_kw)
                        row[e].append(stream_correct(on, sel.dataset, stream, online_slices(L, b), device=dev,
                                                     precision=precision, progress=bar))
    rows = []
    for mi, m in enumerate(models):
        for b in batch_sizes:
            row = got[(mi, b)]
            rows.append({"model": m.name, "batch_size": b,
                         "methods": {k: (_summary(row[k], lengths, edges) if row[k] else None) for k in methods}})
    results = {"methods": methods, "lengths": lengths, "bin_edges": [int(e) for e in edges],
               "sigma_curve": [float(streams[0].sigma[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])],
               "streams": [s.describe() for s in streams], "rows": rows}
    if corrupted is not None:
        results["severity_curve"] = [float(streams[0].severity[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    params = {"estimators": estimators, "batch_sizes": batch_sizes, "rho": rho, "momentum": float(momentum),
              "window": int(window), "prior_n": float(prior_n), "reset_every": reset_every, "robust": robust,
              "min_images": 2, "interpolate": "std", "standard_batch_size": max(batch_sizes), "runs": runs,
              "bins": bins, "stream": {"scenario": scenario, "length": L, **streams[0].params},
              "noise": "x + sigma_t * z_t in pixel space, no clipping; z_t unit normal per stream position and run"}
    data = sel.describe()
    if corrupted is not None:
        params.update(severity_params=corrupted.params, severity_params_label=corrupted.params_label,
                      corruption="position t shows the corrupted set's version of its source image at (corruption_t, "
                                 "severity_t), severity 0 = the clean image; then the noise")
        data["corrupted"] = corrupted.describe()
    inputs = make_inputs(models=[m.describe() for m in models], data=data, params=params, seed=seed,
                         device=dev, precision=precision)
    return Result("stream", inputs, results, time.time() - t0)


# ----------------------------------------------------------------------------------------- tables
def _method_label(name: str, prm: dict) -> str:
    return {"ema": f"ema m={prm['momentum']:g}", "window": f"window W={prm['window']}",
            "prior": f"prior N={prm['prior_n']:g}", "per-batch": f"per-batch rho={prm['rho']:g}"}.get(name, name)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        return ",".join(map(str, v))
    return str(v)


def format_stream_table(result: dict) -> str:
    """Online accuracy by model, batch size and method from a ``stream`` result (dict form)."""
    prm, res = result["inputs"]["params"], result["results"]
    methods = res["methods"]
    rows = [[r["model"], r["batch_size"]] + [pct_cell(r["methods"][k]) for k in methods] for r in res["rows"]]
    st = prm["stream"]
    desc = ", ".join([st["scenario"]] + [f"{k}={_value(v)}" for k, v in st.items() if k not in ("scenario", "length")])
    table = f"; {prm['severity_params_label']}" if prm.get("severity_params_label") else ""
    head = (f"Online top-1 accuracy (%) over streams of {st['length']} images ({desc}{table}), mean ± 2 sd over "
            f"{prm['runs']} runs" + (f", robust={prm['robust']}" if prm["robust"] else "")
            + (f", reset every {prm['reset_every']} images" if prm["reset_every"] else "") + "; n/a = cannot run")
    return head + "\n" + format_table(["model", "batch"] + [_method_label(k, prm) for k in methods], rows)


def format_length_table(result: dict, batch_size: int | None = None) -> str:
    """Online accuracy over the first L images (the ``lengths`` grid) at one batch size (default: the
    smallest) from a ``stream`` result."""
    prm, res = result["inputs"]["params"], result["results"]
    b = batch_size or min(prm["batch_sizes"])
    rows = []
    for r in res["rows"]:
        if r["batch_size"] != b:
            continue
        for k in res["methods"]:
            cell = r["methods"][k]
            rows.append([r["model"], _method_label(k, prm)] +
                        (["n/a"] * len(res["lengths"]) if cell is None else [pct_cell(c) for c in cell["prefix"]]))
    head = f"Online top-1 accuracy (%) over the first L images of the stream at batch size {b}, mean ± 2 sd"
    return head + "\n" + format_table(["model", "method"] + [f"L={L}" for L in res["lengths"]], rows)


# ----------------------------------------------------------------------------------------- snapshots
def stream_then_freeze_on(model: nn.Module, dataset, indices, *, sigma: float = 0.0, batch_size: int = 512,
                          seed: int = 0, keys: tuple[int, ...] = (), device: torch.device | str = "cpu",
                          **stream: object) -> nn.Module:
    """Stream ``dataset`` images ``indices`` (in that order, batches of ``batch_size``, noise exactly as
    :func:`bnadapt.adapt.adapt_then_freeze_on` draws it) through :func:`bnadapt.adapt.stream_adapt`
    ``(model, **stream)`` and return the :meth:`~bnadapt.adapt.StreamAdapted.snapshot` of the final
    estimate: the frozen model ``bnadapt adapt --stream`` writes."""
    import copy

    from bnadapt.adapt import noisy_batches
    from bnadapt.errors import check_sigma

    sigma = check_sigma(sigma)
    batch_size = check_batch_size(batch_size, "stream batch size")
    device = torch.device(device)
    src = model if next(model.parameters()).device == device else copy.deepcopy(model).to(device)
    net = stream_adapt(src, **stream)
    gen = generator(seed, *keys, device=device)
    with torch.no_grad():
        for x in noisy_batches(dataset, indices, sigma=sigma, batch_size=batch_size, gen=gen, device=device):
            net(x)
    return net.snapshot()
