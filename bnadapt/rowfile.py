"""Resumable row files for experiments made of independent units (batches): resume, shards, torchrun.

The approach of :mod:`bnadapt.certify.rows`, for JSON rows: a row file ``X.rows.jsonl`` holds one
header line ``{"format": "bnadapt-rows/1", "experiment", "inputs", "shard"}`` and then one JSON object
per finished unit, ``{"key": [...], ...}``, appended, flushed and fsync'd one at a time. A killed run
leaves at most a trailing partial line, which resume drops.

- **Units** are tuples of ints/strings (e.g. ``(model, run, batch)``) listed in the order a single
  uninterrupted run does them; each unit's row depends only on the unit and the inputs (its random
  draws come from generators seeded by the unit's key), so a resumed, sharded or distributed run writes
  exactly the rows of an uninterrupted one (on the same device type and thread count), apart from the
  timing fields.
- **Resume**: rows already in the file are skipped; the header's ``inputs`` must equal the run's.
- **Shards**: ``shard=(i, N)`` does ``units[i::N]``; :func:`merge_rows` joins shard files into the file a
  single run would have written (rows in unit order). :func:`run_units_distributed` does this under
  torchrun (rank ``r`` writes ``X.rank<r>``; rank 0 merges).
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bnadapt.errors import WRITE_ERRNOS, BnadaptError, check, write_error
from bnadapt.results import atomic_write_text, jsonable
from bnadapt.runs import Progress, world

FORMAT = "bnadapt-rows/1"


def parse_shard(spec: Any) -> tuple[int, int] | None:
    """``"i/N"`` (or ``(i, N)``) -> ``(i, N)`` with ``0 <= i < N``; ``None`` passes through."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        spec = f"{spec[0]}/{spec[1]}"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    check(m is not None, f"bad --shard {spec!r}; write it as i/N with 0 <= i < N, e.g. 0/4")
    i, count = int(m.group(1)), int(m.group(2))
    check(count >= 1 and 0 <= i < count, f"bad --shard {spec!r}: need 0 <= i < N; e.g. 0/{max(count, 2)}")
    return i, count


def _key(unit: Iterable) -> tuple:
    return tuple(unit)


def _dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)


def _complete_lines(path: Path) -> tuple[list[str], int]:
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(), end


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def inputs_diff(now: dict, stored: dict, *, limit: int = 3) -> str:
    """What differs between two nested dicts, as ``key: X in the file, Y now``."""
    a, b = _flatten(jsonable(now)), _flatten(jsonable(stored))
    short = lambda v: (repr(v)[:40] + "...") if len(repr(v)) > 43 else repr(v)  # noqa: E731
    diffs = [f"{k}: {short(b.get(k))} in the file, {short(a.get(k))} now" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def read_rows(path: str | os.PathLike, experiment: str | None = None) -> tuple[dict, list[dict]]:
    """The header and the complete rows of a row file (a trailing partial line is ignored)."""
    p = Path(path)
    check(p.is_file(), f"no row file at {p}; run the experiment first or fix the path")
    lines, _ = _complete_lines(p)
    check(len(lines) >= 1, f"{p} is empty; rerun the experiment")
    try:
        header = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as e:
        raise BnadaptError(f"{p} is not a readable row file ({e.msg}); rerun the experiment") from None
    check(isinstance(header, dict) and header.get("format") == FORMAT,
          f"{p} is not a bnadapt row file (format {FORMAT}); pass a .rows.jsonl written by bnadapt")
    if experiment is not None:
        check(header.get("experiment") == experiment,
              f"{p} holds {header.get('experiment')!r} rows, not {experiment!r}; pass the right file")
    return header, rows


def open_rows(path: str | os.PathLike, header: dict, *, resume: bool) -> tuple[dict[tuple, dict], bool]:
    """Prepare the row file: create it with ``header``, or (``resume``) check its header and drop a
    trailing partial line. Returns the finished rows by key and whether the file was created."""
    p = Path(path)
    header = jsonable(header)
    if not p.exists() or p.stat().st_size == 0:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, _dumps(header) + "\n")
        return {}, True
    check(resume, f"{p} already exists; pass --resume to continue that run, or choose another --out")
    lines, end = _complete_lines(p)
    if not lines:
        atomic_write_text(p, _dumps(header) + "\n")
        return {}, True
    stored, rows = read_rows(p)
    check(stored.get("experiment") == header.get("experiment"),
          f"{p} holds {stored.get('experiment')!r} rows; choose another --out")
    for k in ("inputs", "shard"):
        check(stored.get(k) == header.get(k), f"cannot resume {p}: it was made with other inputs "
                                               f"({inputs_diff(header.get(k), stored.get(k))}); rerun with the same "
                                               "options or choose another --out")
    if end != p.stat().st_size:
        with open(p, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return {_key(r["key"]): r for r in rows}, False


def run_units(path: str | os.PathLike, header: dict, units: Sequence[tuple], do_unit: Callable[[tuple], dict], *,
              resume: bool = False, shard: tuple[int, int] | str | None = None, quiet: bool = False,
              desc: str = "units", size: Callable[[tuple], int] | None = None) -> list[dict]:
    """Do every unit of ``units`` (or of the shard) not yet in the row file; return the shard's rows in
    unit order. ``do_unit(unit) -> row`` (``key`` is added); ``size(unit)`` counts progress (images).
    If the run fails before writing any row, a file it created is removed."""
    shard = parse_shard(shard)
    header = dict(header, format=FORMAT, shard=list(shard) if shard else None)
    p = Path(path)
    done, created = open_rows(p, header, resume=resume)
    mine = [_key(u) for u in (units[shard[0]::shard[1]] if shard else units)]
    extra = set(done) - set(mine)
    if extra:
        raise BnadaptError(f"{p} holds rows of units outside this run (e.g. {sorted(extra)[0]}); choose another --out")
    todo = [u for u in mine if u not in done]
    size = size or (lambda u: 1)
    written = 0
    try:
        with open(p, "a", encoding="utf-8") as f, Progress(sum(size(u) for u in todo), desc, quiet=quiet) as bar:
            for u in todo:
                row = dict(do_unit(u))
                row["key"] = list(u)
                done[u] = jsonable(row)
                f.write(_dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
                written += 1
                bar.update(size(u))
    except BaseException as e:
        if created and written == 0:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            msg = str(write_error(p, e))
            raise BnadaptError(msg + (f" (its {written} finished rows are kept: --resume continues from them)"
                                      if written else "")) from None
        raise
    return [done[u] for u in mine]


def merge_rows(paths: Sequence[str | os.PathLike], out: str | os.PathLike, units: Sequence[tuple] | None = None,
               *, experiment: str | None = None) -> tuple[dict, list[dict]]:
    """Merge shard row files into ``out`` (rows in unit order, header with ``shard: null``), written
    atomically; ``units`` default to the unit list in the headers. All shards must come from one run
    and together hold every unit exactly once. Returns the merged header and rows."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    check(len(paths) >= 1, "no shard files to merge; pass the .rows.jsonl files of the shard runs")
    check(out.resolve() not in {p.resolve() for p in paths}, f"merge output {out} is also an input; choose another path")
    base, by_key = None, {}
    for p in paths:
        header, rows = read_rows(p, experiment)
        h = {k: v for k, v in header.items() if k != "shard"}
        if base is None:
            base = h
        check(h == base, f"shard {p} was made with other inputs ({inputs_diff(h, base)}); merge the shards of one run only")
        for r in rows:
            k = _key(r["key"])
            check(k not in by_key, f"unit {list(k)} appears twice across shards; merge each shard once")
            by_key[k] = r
    assert base is not None
    if units is None:
        units = [tuple(u) for u in base.get("units") or []]
    expected = [_key(u) for u in units]
    missing = [k for k in expected if k not in by_key]
    if missing:
        raise BnadaptError(f"merge: {len(missing)} of {len(expected)} units missing (e.g. {list(missing[0])}); "
                           "finish or --resume the shard runs first")
    check(len(by_key) == len(expected), "merge: shards hold units outside the run; merge the shards of one run only")
    header = dict(base, shard=None)
    rows = [by_key[k] for k in expected]
    atomic_write_text(out, "".join(_dumps(x) + "\n" for x in [header] + rows))
    return header, rows


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def split_over_ranks(out: str | os.PathLike, run_shard: Callable[[str, tuple[int, int]], Any],
                     merge: Callable[[list[str]], Any], *, resume: bool = False,
                     timeout_s: float = 7 * 24 * 3600) -> tuple[Any, Any]:
    """The torchrun split every resumable experiment uses. In an initialized ``torch.distributed`` job,
    rank ``r`` of ``N`` runs ``run_shard("<out>.rank<r>", (r, N))``; all ranks wait; rank 0 runs
    ``merge([the N shard paths])``. Returns ``(this rank's result, the merge's result or None)`` on every
    rank, once the merge is done. The waits go through a gloo group with ``timeout_s`` (default a week),
    so a slow shard does not trip the default collective timeout, and a failure on any rank (or in the
    merge) is raised on every rank instead of hanging the others."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    out = Path(out)
    result, merged, error, errors = None, None, None, [None] * world
    try:
        check(resume or not out.exists(), f"{out} already exists; pass --resume to continue that run, or choose "
                                          "another --out")
        result = run_shard(f"{out}.rank{rank}", (rank, world))
    except Exception as e:  # reported to every rank below
        error = e
    dist.all_gather_object(errors, None if error is None else _one_line(error), group=group)
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        dist.destroy_process_group(group)
        if error is not None:
            raise error
        raise BnadaptError(f"rank {failed[0][0]} failed ({failed[0][1]}); fix it and rerun with --resume")
    note: list = [None]
    if rank == 0:
        try:
            merged = merge([f"{out}.rank{r}" for r in range(world)])
        except Exception as e:
            error = e
            note = [_one_line(e)]
    dist.broadcast_object_list(note, src=0, group=group)
    dist.destroy_process_group(group)
    if note[0] is not None:
        if error is not None:
            raise error
        raise BnadaptError(f"rank 0 could not merge the shard files ({note[0]}); fix it and rerun with --resume")
    return result, merged


def run_units_distributed(path: str | os.PathLike, header: dict, units: Sequence[tuple], do_unit, *,
                          timeout_s: float = 7 * 24 * 3600, **kwargs) -> list[dict] | None:
    """:func:`run_units` split across the ranks of an initialized ``torch.distributed`` job (else just
    :func:`run_units`) by :func:`split_over_ranks`: rank 0 merges the shard files into ``path`` and returns
    all rows; other ranks return None."""
    import torch.distributed as dist

    check("shard" not in kwargs, "run_units_distributed shards by rank; do not pass shard")
    if not (dist.is_available() and dist.is_initialized()):
        return run_units(path, header, units, do_unit, **kwargs)
    if dist.get_rank() != 0:
        kwargs["quiet"] = True
    _, merged = split_over_ranks(path, lambda p, shard: run_units(p, header, units, do_unit, shard=shard, **kwargs),
                                 lambda paths: merge_rows(paths, path, units)[1], resume=kwargs.get("resume", False),
                                 timeout_s=timeout_s)
    return merged


def on_shard_or_ranks(shard: tuple[int, int] | None, single: Callable[[tuple[int, int] | None], Any],
                      distributed: Callable[[], Any]) -> Any:
    """The one split every resumable experiment makes: under torchrun (``WORLD_SIZE > 1``) the ranks
    split the work (``distributed()``; ``shard`` must be None: a one-line error says to use one of
    them), else this process runs ``single(shard)`` (its ``--shard``, or everything)."""
    if world()[1] > 1:
        check(shard is None, "--shard and torchrun both split the work; use one of them")
        return distributed()
    return single(shard)


def run_units_split(path: str | os.PathLike, header: dict, units: Sequence[tuple], do_unit, *,
                    shard: tuple[int, int] | None = None, **kwargs) -> list[dict] | None:
    """:func:`run_units` on ``shard``, or over the torchrun ranks (:func:`run_units_distributed`), by
    :func:`on_shard_or_ranks`: the rows (all of them, or the shard's), None on ranks other than 0."""
    return on_shard_or_ranks(shard, lambda s: run_units(path, header, units, do_unit, shard=s, **kwargs),
                             lambda: run_units_distributed(path, header, units, do_unit, **kwargs))
