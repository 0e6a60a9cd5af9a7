"""Certification runs over a data set: the TSV of rows, resume, shards and torchrun.

``certify_run(smooth_factory, dataset, indices, out_tsv, sigmas=..., n0=..., n=..., alpha=..., seed=...)``
certifies every index at every sigma. ``smooth_factory(sigma)`` returns the
:class:`~bnadapt.smoothing.Smooth` for that sigma; it is called once per sigma with work left, sigma
by sigma, and its result is used only until the next call.

* **TSV** (tab-separated, one header line, one row per image per sigma; :data:`COLUMNS`)::

      idx label sigma predict radius correct radius_bonf correct_bonf top count time

  ``idx label predict radius correct time`` are Cohen et al.'s columns (``predict`` is -1 when it
  abstains, ``radius`` is 0.0 then; ``time`` is seconds for that image at that sigma, warm-up and
  compilation excluded). ``top`` is the class picked from the ``n0`` selection samples and ``count``
  how many of the ``n`` estimation samples fell into it, so every radius can be recomputed at any
  level; ``radius_bonf``/``correct_bonf`` are at ``alpha / k`` for ``k`` sigmas. Rows are appended,
  flushed and fsync'd one at a time; a crash can leave at most a trailing partial line, which resume
  drops. Because one file holds several sigmas, Cohen et al.'s analysis must filter by sigma:
  :func:`write_cohen_tsvs` writes one Cohen-layout file per sigma (``X.sigma0.25.tsv``).
* **Sidecar** ``X.tsv.params.json``: the run's parameters (checked on resume), the image indices,
  and warm-up times per sigma.
* **Seeds**: image ``idx`` at the ``j``-th sigma uses a generator seeded from ``(seed, idx, j)`` only
  (:func:`~bnadapt.runs.image_seed`); its ``n0`` selection samples are drawn first, then its ``n``
  estimation samples. A resumed, sharded or distributed run therefore writes exactly the rows of an
  uninterrupted one (except ``time``), on the same device type, batch size and thread count.
* **Shards**: ``shard=(i, N)`` certifies ``indices[i::N]``; :func:`merge_shards` joins shard files
  (``bnadapt certify-merge``). :func:`certify_run_distributed` does this under torchrun.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from bnadapt.errors import WRITE_ERRNOS, BnadaptError, check, check_alpha, check_count, check_seed, check_sigma, check_unique, write_error
from bnadapt.results import atomic_write_text, jsonable, write_json
from bnadapt.rowfile import inputs_diff, parse_shard, split_over_ranks
from bnadapt.runs import Progress, image_seed, indices_sha256
from bnadapt.smoothing import ABSTAIN, Smooth, certified_radius

COLUMNS = ("idx", "label", "sigma", "predict", "radius", "correct",
           "radius_bonf", "correct_bonf", "top", "count", "time")
"""Columns of a certification TSV, in order."""

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
"""Columns of Cohen et al.'s certify output (one file per sigma)."""

_COLUMN_TYPES = (int, int, float, int, float, int, float, int, int, int, float)
_FORMAT = "bnadapt-certify-v1"
_HEADER = "\t".join(COLUMNS) + "\n"


# ----------------------------------------------------------------------------------------- rows
def _format_row(row: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return repr(float(v)) if isinstance(v, float) else str(int(v))
    return "\t".join(fmt(row[c]) for c in COLUMNS) + "\n"


def _parse_line(line: str, path: Any, lineno: int) -> dict[str, Any]:
    fields = line.rstrip("\n").split("\t")
    check(len(fields) == len(COLUMNS),
          f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated fields, got {len(fields)}; the file is corrupt")
    try:
        return {c: t(f) for c, t, f in zip(COLUMNS, _COLUMN_TYPES, fields)}
    except ValueError:
        raise BnadaptError(f"{path}:{lineno}: unparsable row {line.strip()!r}; the file is corrupt") from None


def _read_complete_lines(path: Path) -> tuple[list[str], int]:
    """Complete lines of ``path`` (a trailing line without newline is left out) and their byte length."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(keepends=True), end


def read_rows(tsv_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a certification TSV as dicts (typed per :data:`COLUMNS`); a trailing partial line is ignored."""
    path = Path(tsv_path)
    check(path.is_file(), f"no certification file at {path}; run bnadapt certify first or fix the path")
    lines, _ = _read_complete_lines(path)
    if not lines:
        return []
    check(lines[0] == _HEADER, f"{path} does not start with the certification header; pass a TSV written by bnadapt certify")
    return [_parse_line(line, path, i + 2) for i, line in enumerate(lines[1:])]


def params_path(tsv_path: str | os.PathLike) -> Path:
    """The sidecar ``X.tsv.params.json`` of ``X.tsv``."""
    return Path(str(tsv_path) + ".params.json")


def read_sidecar(tsv_path: str | os.PathLike) -> dict | None:
    """The sidecar of a TSV (``params``, ``indices``, ``warmup_s``), or None when it is missing."""
    p = params_path(tsv_path)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        d["params"]  # noqa: B018 - must exist
        return d
    except (ValueError, KeyError, TypeError):
        raise BnadaptError(f"{p} is unreadable; restore it or start a new output path") from None


def cohen_tsv_path(tsv_path: str | os.PathLike, sigma: float) -> Path:
    """``X.tsv`` -> ``X.sigma<s>.tsv``: the Cohen-layout rows of one sigma."""
    p = Path(tsv_path)
    stem = p.name[:-4] if p.name.endswith(".tsv") else p.name
    return p.with_name(f"{stem}.sigma{sigma:g}.tsv")


def write_cohen_tsvs(tsv_path: str | os.PathLike) -> list[Path]:
    """One file per sigma with Cohen et al.'s columns (``idx label predict radius correct time``), so
    their analysis (``(df.correct & (df.radius >= r)).mean()``) reads each file correctly. The combined
    file stays the one that resumes. Radii are written at full precision (``repr``), never rounded: a
    radius of 0.4996 rounded to ``0.500`` would be counted as certified at 0.5 (an over-claim)."""
    rows = read_rows(tsv_path)
    out = []
    for s in sorted({r["sigma"] for r in rows}):
        mine = [r for r in rows if r["sigma"] == s]
        text = "\t".join(COHEN_COLUMNS) + "\n" + "".join(
            f"{r['idx']}\t{r['label']}\t{r['predict']}\t{float(r['radius'])!r}\t{r['correct']}\t{r['time']:.4f}\n"
            for r in mine)
        path = cohen_tsv_path(tsv_path, s)
        atomic_write_text(path, text)
        out.append(path)
    return out


# ----------------------------------------------------------------------------------------- shards
def _check_shard(shard: Any) -> tuple[int, int] | None:
    check(shard is None or isinstance(shard, (str, tuple, list)), f"shard must be (i, N) or 'i/N' (got {shard!r})")
    return parse_shard(shard)


# ----------------------------------------------------------------------------------------- runs
def _get_item(dataset: Any, idx: int) -> tuple[torch.Tensor, int]:
    if hasattr(dataset, "get"):  # bnadapt ImageDataset: get(indices) -> (NCHW, labels)
        x, y = dataset.get([idx])
        return x[0], int(y[0])
    x, y = dataset[idx]
    return x, int(y)


@dataclass
class RunResult:
    """What :func:`certify_run` did: ``written`` new rows, ``skipped`` rows already in the file."""

    out: Path
    written: int
    skipped: int


def _run_params(dataset: Any, indices: list[int], sigmas: list[float], n0: int, n: int, alpha: float,
                seed: int, shard: tuple[int, int] | None, extra: dict | None) -> dict[str, Any]:
    return jsonable({
        "format": _FORMAT, "sigmas": sigmas, "n0": n0, "n": n, "alpha": alpha, "alpha_bonf": alpha / len(sigmas),
        "seed": seed, "num_indices": len(indices), "indices_sha256": indices_sha256(indices),
        "dataset": getattr(dataset, "name", None), "shard": list(shard) if shard is not None else None,
        "extra": extra or {},
    })


params_diff = inputs_diff  # what differs between a run's parameters and a file's


def _validate_run_args(indices: Iterable[int], sigmas: Sequence[float], n0: int, n: int, alpha: float,
                       seed: int) -> tuple[list[int], list[float], int, int, float, int]:
    indices = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
    check(len(indices) >= 1, "no images to certify; give at least one image index")
    check(min(indices) >= 0, "image indices must be >= 0")
    check(len(set(indices)) == len(indices), "image indices contain duplicates; give each image once")
    check(isinstance(sigmas, (list, tuple, np.ndarray)), f"sigmas must be a list of noise levels (got {sigmas!r})")
    sigmas = check_unique([check_sigma(s, "sigmas", positive=True) for s in sigmas], "sigmas")
    return (indices, sigmas, check_count(n0, "n0"), check_count(n, "n"), check_alpha(alpha), check_seed(seed))


def _open_for_run(out: Path, params: dict, indices: list[int], resume: bool) -> tuple[set[tuple[int, float]], bool]:
    """Prepare ``out`` (header, sidecar); return the finished (idx, sigma) pairs and whether we created it."""
    ppath = params_path(out)
    sidecar = {"params": params, "indices": indices, "warmup_s": {}}
    if not out.exists():
        write_json(ppath, sidecar)
        atomic_write_text(out, _HEADER)
        return set(), True
    check(resume, f"{out} already exists; pass --resume to continue that run, or choose another --out")
    lines, end = _read_complete_lines(out)
    if not lines:  # empty or a partial header only
        write_json(ppath, sidecar)
        atomic_write_text(out, _HEADER)
        return set(), True
    check(lines[0] == _HEADER, f"{out} is not a certification TSV (unexpected header); choose another --out")
    stored = read_sidecar(out)
    check(stored is not None, f"{out} has no {ppath.name}, so its parameters cannot be checked; "
                              "restore it or choose another --out")
    check(stored["params"] == params, f"cannot resume {out}: it was made with other parameters "
                                      f"({params_diff(params, stored['params'])}); rerun with the same options or "
                                      "choose another --out")
    if end != out.stat().st_size:  # drop the trailing partial row of a killed run
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows = [_parse_line(line, out, i + 2) for i, line in enumerate(lines[1:])]
    return {(r["idx"], r["sigma"]) for r in rows}, False


def _warm_up(smooth: Smooth, x: torch.Tensor, n0: int, n: int) -> float:
    """Run every batch shape the certification will use once (compilation happens here, not in the
    first image's time); noise from a throwaway generator, so no row changes. Returns seconds."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=smooth.device).manual_seed(0)
    b = smooth.batch_size
    for m in {min(n0, b), n0 % b, min(n, b), n % b} - {0}:
        smooth.sample_counts(x, m, gen)
    if smooth.device.type == "cuda":
        torch.cuda.synchronize(smooth.device)
    return time.perf_counter() - t0


def certify_run(
    smooth_factory: Callable[[float], Smooth],
    dataset: Any,
    indices: Iterable[int],
    out_tsv: str | os.PathLike,
    *,
    sigmas: Sequence[float],
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    quiet: bool = False,
    params: dict | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Certify ``dataset`` images ``indices`` (or the shard ``indices[i::N]``) at every sigma into ``out_tsv``.

    ``dataset`` is a bnadapt ``ImageDataset`` (``get``) or anything with ``dataset[idx] -> (x, y)``.
    Each row holds the result of :meth:`Smooth.certify` at ``alpha`` (``predict``, ``radius``,
    ``correct``) and at ``alpha / len(sigmas)`` (``radius_bonf``, ``correct_bonf``) from the same
    samples. ``params`` are extra caller parameters (model hash, adaptation, batch size...) recorded in
    the sidecar and checked on resume. ``callback`` gets each row once it is on disk. Guarantee per row:
    with probability >= 1 - alpha (``radius``) and >= 1 - alpha/k (``radius_bonf``) the smoothed
    classifier at that sigma is robust within the radius at that image. If the run fails before
    writing any row, the files it created are removed (nothing half-made is left behind).
    """
    indices, sigmas, n0, n, alpha, seed = _validate_run_args(indices, sigmas, n0, n, alpha, seed)
    shard = _check_shard(shard)
    check(params is None or isinstance(params, dict), "params must be a dict of extra run parameters")
    out = Path(out_tsv)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_params = _run_params(dataset, indices, sigmas, n0, n, alpha, seed, shard, params)
    done, created = _open_for_run(out, run_params, indices, resume)

    todo = indices[shard[0]::shard[1]] if shard is not None else indices
    alpha_bonf = alpha / len(sigmas)
    work = [(j, s, [i for i in todo if (i, s) not in done]) for j, s in enumerate(sigmas)]
    total = sum(len(w) for _, _, w in work)
    written = 0
    try:
        with open(out, "a", encoding="utf-8", newline="") as f, Progress(total, "certify", quiet=quiet) as bar:
            for j, sigma, pending in work:
                if not pending:
                    continue
                smooth = smooth_factory(sigma)
                check(isinstance(smooth, Smooth), f"smooth_factory({sigma}) returned {type(smooth).__name__}; return a Smooth")
                check(smooth.sigma == sigma, f"smooth_factory({sigma}) returned a Smooth with sigma {smooth.sigma}; "
                                             "build it with the sigma it is given")
                warm = _warm_up(smooth, _get_item(dataset, pending[0])[0], n0, n)
                _record_warmup(out, sigma, warm)
                bar.set_postfix(sigma=sigma)
                for idx in pending:
                    x, label = _get_item(dataset, idx)
                    gen = torch.Generator(device=smooth.device)
                    gen.manual_seed(image_seed(seed, idx, j))
                    t0 = time.perf_counter()
                    top, count = smooth.certify_counts(x, n0, n, gen)
                    r = certified_radius(count, n, alpha, sigma)
                    r_bonf = certified_radius(count, n, alpha_bonf, sigma)
                    elapsed = time.perf_counter() - t0
                    predict = top if r is not None else ABSTAIN
                    row = {
                        "idx": idx, "label": label, "sigma": sigma,
                        "predict": predict, "radius": r if r is not None else 0.0, "correct": int(predict == label),
                        "radius_bonf": r_bonf if r_bonf is not None else 0.0,
                        "correct_bonf": int(r_bonf is not None and top == label),
                        "top": top, "count": count, "time": elapsed,
                    }
                    f.write(_format_row(row))
                    f.flush()
                    os.fsync(f.fileno())
                    written += 1
                    bar.update(1)
                    if callback is not None:
                        callback(row)
    except BaseException as e:
        if created and written == 0:
            out.unlink(missing_ok=True)
            params_path(out).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            msg = str(write_error(out, e))
            raise BnadaptError(msg + (f" (its {written} finished rows are kept: --resume continues from them)"
                                      if written else "")) from None
        raise
    return RunResult(out=out, written=written, skipped=len(todo) * len(sigmas) - written)


def _record_warmup(out: Path, sigma: float, seconds: float) -> None:
    side = read_sidecar(out) or {}
    side.setdefault("warmup_s", {})[repr(float(sigma))] = round(seconds, 4)
    write_json(params_path(out), side)


def merge_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                 indices: Iterable[int] | None = None) -> Path:
    """Merge shard TSVs into ``out``, ordered as a single uninterrupted run writes them: by sigma, then by
    position in the run's indices (read from the sidecars unless given).

    Each shard needs its sidecar; all must come from the same run (equal parameters except ``shard``)
    and together hold every (idx, sigma) row exactly once. ``out`` and its sidecar (``shard: null``)
    are written atomically, so ``out`` equals what a single run would hold (up to ``time``) and can be
    summarized or resumed like one."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    check(len(paths) >= 1, "no shard files to merge; pass the .rank<r> or --shard TSVs")
    check(out.resolve() not in {p.resolve() for p in paths}, f"merge output {out} is also an input; choose another path")
    base: dict | None = None
    run_indices: list[int] | None = None if indices is None else [int(i) for i in np.asarray(list(indices)).reshape(-1)]
    warm: dict = {}
    for p in paths:
        side = read_sidecar(p)
        check(side is not None, f"shard {p} has no {params_path(p).name}; merge only files written by bnadapt certify")
        prm = dict(side["params"], shard=None)
        if run_indices is None:
            run_indices = [int(i) for i in side.get("indices") or []]
        check(prm.get("indices_sha256") == indices_sha256(run_indices),
              f"shard {p} was run on other images than the other shards; merge the shards of one run only")
        if base is None:
            base = prm
        check(prm == base, f"shard {p} was made with other parameters ({params_diff(prm, base)}); "
                           "merge the shards of one run only")
        warm.update(side.get("warmup_s") or {})
    assert base is not None and run_indices is not None
    sigmas = [float(s) for s in base["sigmas"]]
    by_key: dict[tuple[int, float], dict] = {}
    for p in paths:
        for row in read_rows(p):
            key = (row["idx"], row["sigma"])
            check(key not in by_key, f"row idx={key[0]} sigma={key[1]} appears twice across shards; merge each shard once")
            by_key[key] = row
    expected = [(i, s) for s in sigmas for i in run_indices]  # the order of a single uninterrupted run
    missing = [k for k in expected if k not in by_key]
    check(not missing, f"merge: {len(missing)} of {len(expected)} rows missing (e.g. idx={missing[0][0] if missing else ''} "
                       f"sigma={missing[0][1] if missing else ''}); finish or --resume the shard runs first")
    check(len(by_key) == len(expected), "merge: shards hold rows of images outside the run; merge the shards of one run only")
    write_json(params_path(out), {"params": base, "indices": run_indices, "warmup_s": warm,
                                  "merged_from": [str(p) for p in paths]})
    atomic_write_text(out, _HEADER + "".join(_format_row(by_key[k]) for k in expected))
    return out


def certify_run_distributed(
    smooth_factory: Callable[[float], Smooth],
    dataset: Any,
    indices: Iterable[int],
    out_tsv: str | os.PathLike,
    *,
    timeout_s: float = 7 * 24 * 3600,
    **kwargs: Any,
) -> RunResult:
    """:func:`certify_run` split across the ranks of an initialized ``torch.distributed`` job (torchrun;
    gloo on CPU, nccl on GPU, each rank's ``smooth_factory`` putting its model on its own device) by
    :func:`bnadapt.rowfile.split_over_ranks`: rank ``r`` of ``N`` certifies ``indices[r::N]`` into
    ``<out_tsv>.rank<r>`` (resumable like any run) and rank 0 merges the shard files into ``out_tsv``
    (:func:`merge_shards`); every rank returns once the merge is done. Without a process group this is
    :func:`certify_run`. Same keyword arguments as :func:`certify_run` except ``shard``."""
    import torch.distributed as dist

    check("shard" not in kwargs, "certify_run_distributed shards by rank; do not pass shard")
    if not (dist.is_available() and dist.is_initialized()):
        return certify_run(smooth_factory, dataset, indices, out_tsv, **kwargs)
    indices = list(indices)
    if dist.get_rank() != 0:
        kwargs["quiet"] = True
    result, _ = split_over_ranks(
        out_tsv, lambda p, shard: certify_run(smooth_factory, dataset, indices, p, shard=shard, **kwargs),
        lambda paths: merge_shards(paths, out_tsv, indices), resume=kwargs.get("resume", False), timeout_s=timeout_s)
    return result
