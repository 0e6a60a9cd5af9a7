"""Top-1 accuracy per corruption and severity, without and with adaptive BN (paper Tables 3 and 8).

Protocol: every (corruption, severity) set is evaluated on its own with THE accuracy loop,
:func:`bnadapt.noise.accuracy` (no noise added): the images are shuffled with the run's seed and cut
into test batches of ``batch_size``; with adaptation each batch is classified by the per-batch adapted
model at ``rho``, so statistics never mix corruptions or severities. Adapted cells repeat ``runs``
times (reshuffled; mean and 2 sample sd, as the paper's 3 runs). Without adaptation the accuracy does
not depend on the order, so it is measured once (2 sd = 0, as the paper's "±0.0"). Run ``r`` of every
set and of the clean images uses the stream ``(seed, r)``; metrics (:mod:`.metrics`) are computed per
run and then aggregated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bnadapt.corruptions.metrics import aggregate, alexnet_reference, reference_from_accuracies, summarize
from bnadapt.corruptions.names import PARAM_LABELS, SEVERITIES, parse_corruptions
from bnadapt.errors import BnadaptError, check, check_batch_size, check_count, check_rho, check_seed
from bnadapt.models.setup import setup_models
from bnadapt.noise import repeated
from bnadapt.results import Result, make_inputs, read_result
from bnadapt.runs import Progress, indices_sha256


def params_label(cset) -> str:
    """The severity parameter table a set was made with, in words (said beside every number)."""
    return PARAM_LABELS.get(cset.params, f"severity parameters {cset.params_source}")


def _measure(models, cset, *, clean, positions, names, adapt: bool, rho, batch_size, runs, seed, device, precision,
             quiet, desc) -> tuple[list[dict], torch.device, str]:
    """Accuracies of every model: ``[{"clean": {"standard": Cell, "adapted": Cell|None},
    "sets": {c: {"standard": [Cell x5], "adapted": [...]|None}}}]``."""
    dev, precision, nets, _ = setup_models(models, cset.image_shape, len(cset.class_names), device=device,
                                           precision=precision, adapting="eager" if adapt else "no")
    can_adapt = [adapt and not m.is_torchscript for m in models]
    n_sets = len(names) * len(SEVERITIES) + (clean is not None)
    per_set = sum(1 + (runs if a else 0) for a in can_adapt)
    out = [{"clean": None, "sets": {c: {"standard": [], "adapted": [] if a else None} for c in names}}
           for a in can_adapt]
    kw = dict(batch_size=batch_size, seed=seed, device=dev, precision=precision)

    def both(ds, idx, bar):
        cells = []
        for net, a in zip(nets, can_adapt):
            std = repeated(net, ds, idx, runs=1, rho=None, progress=bar, **kw)
            ada = repeated(net, ds, idx, runs=runs, rho=rho, progress=bar, **kw) if a else None
            cells.append((std, ada))
        return cells

    with Progress(n_sets * per_set * len(positions), desc, quiet=quiet) as bar:
        if clean is not None:
            for row, (std, ada) in zip(out, both(clean[0], clean[1], bar)):
                row["clean"] = {"standard": std, "adapted": ada}
        for c in names:
            for s in SEVERITIES:
                bar.set_postfix(set=f"{c}/{s}")
                for row, (std, ada) in zip(out, both(cset.dataset(c, s), positions, bar)):
                    row["sets"][c]["standard"].append(std)
                    if ada is not None:
                        row["sets"][c]["adapted"].append(ada)
    return out, dev, precision


def _run_metrics(row: dict, key: str, runs: int, reference) -> dict:
    clean = row["clean"][key] if row["clean"] is not None else None
    per_run = []
    for r in range(runs):
        accs = {c: [cell.accs[r] for cell in d[key]] for c, d in row["sets"].items()}
        per_run.append(summarize(None if clean is None else clean.accs[r], accs, reference))
    return aggregate(per_run)


def _data(cset, clean, positions, images, per_class, subset_seed) -> dict:
    return {"set": cset.describe(), "n": len(positions), "images": images, "per_class": per_class,
            "subset_seed": subset_seed, "positions_sha256": indices_sha256(positions),
            "clean": None if clean is None else clean[2]}


def evaluate(models: Sequence, cset, *, clean=None, positions: np.ndarray | None = None,
             corruptions: Sequence[str] | str | None = None, rho: float = 1.0, batch_size: int = 512, runs: int = 3,
             seed: int = 0, reference: dict | None = None, device=None, precision: str = "fp32", quiet: bool = False,
             subset: dict | None = None) -> Result:
    """Paper Tables 3 and 8 for each model (``LoadedModel``) on the corrupted set ``cset``
    (:class:`bnadapt.data.corrupted.CorruptedSet`): accuracy per corruption and severity without and
    with per-batch adaptation, clean accuracy (``clean = (dataset, indices aligned with the set's
    positions, description)`` or None), and the metrics against ``reference`` (see
    :mod:`.metrics`; None leaves mCE undefined). ``positions`` selects images of the set (default all).
    TorchScript models are evaluated without adaptation only."""
    names = [c for c in parse_corruptions(corruptions) if c in cset.available]
    check(bool(names), f"{cset.root} holds none of the requested corruptions (it has {', '.join(cset.available)})")
    rho, seed = check_rho(rho), check_seed(seed)
    batch_size = check_batch_size(batch_size, "batch size", adapting=True)
    runs = check_count(runs, "runs")
    positions = np.arange(cset.n) if positions is None else np.asarray(positions, dtype=np.int64)
    t0 = time.time()
    raw, dev, precision = _measure(models, cset, clean=clean, positions=positions, names=names, adapt=True, rho=rho,
                                   batch_size=batch_size, runs=runs, seed=seed, device=device, precision=precision,
                                   quiet=quiet, desc="corruptions")
    rows = []
    for m, row in zip(models, raw):
        adapted = row["sets"][names[0]]["adapted"] is not None
        rows.append({
            "model": m.name,
            "clean": None if row["clean"] is None else {
                "standard": row["clean"]["standard"].as_dict(),
                "adapted": row["clean"]["adapted"].as_dict() if adapted else None},
            "accuracy": {c: {"standard": [x.as_dict() for x in d["standard"]],
                             "adapted": [x.as_dict() for x in d["adapted"]] if adapted else None}
                         for c, d in row["sets"].items()},
            "metrics": {"standard": _run_metrics(row, "standard", 1, reference),
                        "adapted": _run_metrics(row, "adapted", runs, reference) if adapted else None}})
    sub = subset or {}
    params = {"corruptions": names, "severities": list(SEVERITIES), "rho": rho, "batch_size": batch_size,
              "runs": runs, "runs_without_adaptation": 1, "interpolate": "std",
              "severity_params": cset.params, "severity_params_label": params_label(cset),
              "reference": None if reference is None else {k: reference[k] for k in ("name", "kind", "source")}}
    inputs = make_inputs(models=[m.describe() for m in models],
                         data=_data(cset, clean, positions, sub.get("images"), sub.get("per_class"),
                                    sub.get("subset_seed", 0)),
                         params=params, seed=seed, device=dev, precision=precision)
    return Result("corruption_eval", inputs, {"reference": reference, "rows": rows}, time.time() - t0)


def reference_table(model, cset, *, clean=None, positions=None, corruptions=None, batch_size: int = 512,
                    device=None, precision: str = "fp32", quiet: bool = False) -> Result:
    """The error table of a reference model (no adaptation) on ``cset``: the reusable result file
    (experiment ``corruption_reference``) that normalizes mCE and relative mCE on data sets without
    a published reference."""
    names = [c for c in parse_corruptions(corruptions) if c in cset.available]
    batch_size = check_batch_size(batch_size)
    positions = np.arange(cset.n) if positions is None else np.asarray(positions, dtype=np.int64)
    t0 = time.time()
    raw, dev, precision = _measure([model], cset, clean=clean, positions=positions, names=names, adapt=False, rho=None,
                                   batch_size=batch_size, runs=1, seed=0, device=device, precision=precision,
                                   quiet=quiet, desc=f"reference {model.name}")
    row = raw[0]
    res = {"model": model.name, "clean": None if row["clean"] is None else row["clean"]["standard"].mean,
           "accuracy": {c: [x.mean for x in d["standard"]] for c, d in row["sets"].items()}}
    inputs = make_inputs(models=[model.describe()], data=_data(cset, clean, positions, None, None, 0),
                         params={"corruptions": names, "batch_size": batch_size, "severity_params": cset.params,
                                 "severity_params_label": params_label(cset)},
                         seed=0, device=dev, precision=precision)
    return Result("corruption_reference", inputs, res, time.time() - t0)


def load_reference(path: str | Path, cset=None, positions=None) -> dict:
    """A reference table from a ``corruption_reference`` result file; with ``cset``/``positions``,
    a one-line error unless it was measured on the same set (checksums) and images."""
    d = read_result(path, "corruption_reference")
    data = d["inputs"]["data"]
    if cset is not None:
        mine, theirs = cset.describe()["checksums"], data["set"].get("checksums") or {}
        check(not mine or not theirs or all(theirs.get(c) == h for c, h in mine.items() if c in theirs),
              f"reference {path} was measured on another corrupted set; recompute it on {cset.root}")
    if positions is not None:
        check(data["positions_sha256"] == indices_sha256(positions),
              f"reference {path} was measured on other images of the set; use the same --images/--per-class, or "
              "recompute it")
    r = d["results"]
    return reference_from_accuracies(r["model"], r["clean"], r["accuracy"],
                                     f"{Path(path).name} (inputs {d['inputs_sha256'][:12]})")


def resolve_reference(spec: str | None, cset, *, clean=None, positions=None, corruptions=None, out: Path | None = None,
                      batch_size: int = 512, device=None, precision: str = "fp32", quiet: bool = False,
                      load_model=None) -> tuple[dict | None, Path | None]:
    """The reference table named by ``spec``: ``None``/``none`` (no reference), ``alexnet``, a
    ``corruption_reference`` result file (.json), or a model spec. A model's table is measured once
    and written to ``out`` (default ``<set folder>/reference-<model>-<images hash>.json``), and a
    matching file there is reused. Returns (table, path written or reused)."""
    if spec is None or spec.lower() == "none":
        return None, None
    if spec.lower() == "alexnet":
        return alexnet_reference(), None
    if spec.endswith(".json"):
        return load_reference(spec, cset, positions), Path(spec)
    check(load_model is not None, "a model reference needs a model loader")  # pragma: no cover
    model = load_model(spec)
    positions = np.arange(cset.n) if positions is None else positions
    path = Path(out) if out is not None else cset.root / f"reference-{model.name}-{indices_sha256(positions)[:8]}.json"
    if path.is_file():
        d = read_result(path, "corruption_reference")
        if d["inputs"]["models"][0].get("tensors_sha256") == model.describe().get("tensors_sha256"):
            return load_reference(path, cset, positions), path
        raise BnadaptError(f"{path} holds the reference of another model; remove it or pass --reference-out")
    res = reference_table(model, cset, clean=clean, positions=positions, corruptions=corruptions,
                          batch_size=batch_size, device=device, precision=precision, quiet=quiet)
    try:
        res.write(path)
    except OSError as e:
        raise BnadaptError(f"cannot write the reference table {path} ({e.strerror}); pass --reference-out FILE.json") \
            from None
    return load_reference(path, cset, positions), path


def clean_set(cset, spec: str | None = None, split: str | None = None):
    """The clean images matching ``cset`` position by position, as ``(dataset, indices, description)``,
    or None when there is no way to know them (a set without manifest and no ``spec``). The match is
    :func:`bnadapt.data.corrupted.corrupted_source`'s: for bnadapt's cache the manifest's source
    selection is rebuilt (from ``spec`` if given, e.g. another root of the same data; on the recorded
    split, whatever ``split`` says) and its index and content hashes must match; otherwise ``spec``
    (``split``, default test) must hold exactly the set's N images with the same labels and shape.
    Mismatches are one-line errors naming ``--clean``."""
    from bnadapt.data.corrupted import corrupted_source

    src = (cset.manifest or {}).get("identity", {}).get("source")
    if src is None and spec is None:
        return None
    m = corrupted_source(cset, spec, split=None if src is not None else split or "test",
                         names={"data": "--clean", "split": "--split", "params": "--params", "corrupted": "--data"})
    return m.dataset, m.indices, m.clean.describe()


def default_reference(cset) -> str:
    """AlexNet for ImageNet-C, the zoo baseline for sets made from Fashion-MNIST, else none (mCE n/a)."""
    src = ((cset.manifest or {}).get("identity", {}).get("source") or {}).get("name", "")
    return "alexnet" if cset.layout == "imagenet-c" else "zoo:baseline" if src.startswith("fashion-mnist") else "none"


def evaluate_set(models: Sequence, cset, *, clean_spec: str | None = None, split: str | None = None,
                 images: int | None = None, per_class: int | None = None, subset_seed: int = 0,
                 corruptions=None, rho: float = 1.0, batch_size: int = 512, runs: int = 3, seed: int = 0,
                 reference: str | None = "default", reference_out: Path | None = None, device=None,
                 precision: str = "fp32", quiet: bool = False, load_model=None) -> tuple[Result, Path | None]:
    """:func:`evaluate` on ``images`` of the set (at most ``per_class`` per class, chosen with
    ``subset_seed``; default all), with the matching clean images (:func:`clean_set`) and the reference
    named by ``reference`` (``"default"``: :func:`default_reference`; see :func:`resolve_reference`).
    Returns the result and the reference file written or reused."""
    from bnadapt.data import subset_indices
    from bnadapt.errors import check_seed

    positions = None
    if images is not None or per_class is not None:
        n = check_count(images, "--images") if images is not None else cset.n
        k = check_count(per_class, "--per-class") if per_class is not None else None
        positions = subset_indices(cset.labels, n, k, seed=check_seed(subset_seed, "--subset-seed"))
    clean = clean_set(cset, clean_spec, split)
    if clean is not None and positions is not None:
        clean = (clean[0], clean[1][positions], clean[2])
    if load_model is None:
        from bnadapt.models import load_model
    ref_spec = default_reference(cset) if reference == "default" else reference
    table, ref_path = resolve_reference(ref_spec, cset, clean=clean, positions=positions, corruptions=corruptions,
                                        out=reference_out, batch_size=batch_size, device=device, precision=precision,
                                        quiet=quiet, load_model=load_model)
    res = evaluate(models, cset, clean=clean, positions=positions, corruptions=corruptions, rho=rho,
                   batch_size=batch_size, runs=runs, seed=seed, reference=table, device=device, precision=precision,
                   quiet=quiet, subset={"images": images, "per_class": per_class, "subset_seed": subset_seed})
    return res, ref_path


# ------------------------------------------------------------------- the reference, for bnadapt reproduce
def reference_spec(reference: str | None, sel) -> str:
    """The mCE reference spec the corruption stage uses: ``default`` resolved as
    :func:`bnadapt.corruptions.evaluate.default_reference` resolves it for a set made from ``sel``."""
    from types import SimpleNamespace

    if reference is None:
        return "none"
    if reference != "default":
        return reference
    made_from = SimpleNamespace(layout="cifar10-c", manifest={"identity": {"source": {"name": sel.dataset.name}}})
    return default_reference(made_from)


def reference_identity(spec: str) -> dict | None:
    """What the reference's numbers depend on, for the stage's inputs hash: none, AlexNet's published
    table, a reference file's content hash, or a reference model's description (its weights' hashes)."""
    from bnadapt.results import file_sha256

    if spec.lower() == "none":
        return None
    if spec.lower() == "alexnet":
        return {"spec": "alexnet", "table": alexnet_reference()}
    if spec.endswith(".json"):
        p = Path(spec)
        return {"spec": spec, "sha256": file_sha256(p) if p.is_file() else None}
    from bnadapt.models import load_model

    return {"spec": spec, "model": load_model(spec).describe()}


def refresh_reference(cset, spec: str, *, batch_size: int, device=None, quiet: bool = True) -> Path | None:
    """Make sure the reference table of the model ``spec`` beside ``cset`` covers every corruption the
    set holds: measured when missing (as :func:`bnadapt.corruptions.evaluate.resolve_reference` does),
    and **measured again** when a table there was made from fewer corruptions (e.g. by an earlier
    ``corruptions evaluate --corruptions ...``), which would otherwise leave mCE n/a. The same model on
    the same images without adaptation gives the same numbers, so the new table only adds corruptions.
    Result files and ``alexnet``/``none`` are left as they are (the report names what they lack)."""
    from bnadapt.models import load_model

    if spec.lower() in ("none", "alexnet") or spec.endswith(".json"):
        return None
    clean = clean_set(cset)
    table, path = resolve_reference(spec, cset, clean=clean, batch_size=batch_size, device=device, quiet=quiet,
                                    load_model=load_model)
    lacking = [c for c in cset.available if c not in ((table or {}).get("errors") or {})]
    if lacking and path is not None:
        reference_table(load_model(spec), cset, clean=clean, batch_size=batch_size, device=device,
                        quiet=quiet).write(path)
    return path
