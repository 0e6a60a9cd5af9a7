"""``bnadapt reproduce``: the paper's whole protocol on any models and data, as a plain list of stages.

Each stage is one library call that writes one result file (the project's format) under the output
folder. Before running a stage, its inputs are computed (model and data hashes, parameters, seed,
device) and the stage is **skipped when a result file with the same inputs hash exists** (the hash is
recorded in the file's ``run.stage_inputs_sha256``; for most stages it is the result's own
``inputs_sha256``, and for the corruption stages it also covers the generation of the corrupted set
(the cache's whole identity, which must be fixed before the evaluation's own inputs exist) and the mCE
reference (its weights or file hash)): every parameter that changes a stage's numbers is in its hash,
so changing one reruns that stage. An interrupted run therefore resumes at the first unfinished stage
(certification resumes inside its row file, corruption generation inside its cache, which is named by
its identity hash). ``force`` redoes named stages or groups; ``stages`` picks groups. The report
(:mod:`bnadapt.report`) is built from the files at the end.

Each result file written by a stage records in its ``run`` block the stage's name, its whole wall time
(``stage_wall_s``: for the corruption stage that includes generating the set and the reference table;
``wall_s`` stays the experiment's own time) and the standalone command(s) that give the same inputs and
numbers (``commands``: e.g. ``bnadapt noise ...``; for stages without a command of their own, the
``bnadapt reproduce`` call that redoes that stage alone), which the report prints under each table.

Groups, in order: ``noise`` (Table 1, Tables 4-5), ``certify`` (Fig. 1, 3, Table 6), ``attacks`` (Tables
2, 7, poisoning), ``corruptions`` (Tables 3, 8), ``gradients`` (Figs. 2, 4), ``stream`` (online adaptation
over test streams, beyond the paper). Two protocols:
``quick`` (reduced sizes, every reduction stated in the report; the zoo's report in at most 20
minutes on a 2-core CPU) and ``full`` (the paper's parameters).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from bnadapt.errors import BnadaptError
from bnadapt.results import Result, inputs_sha256, locate, read_result, write_result
from bnadapt.runs import resolve_device, world
from bnadapt.stages import GROUPS, PAPER, PROTOCOLS, ZOO_MODELS, Stage, plan  # noqa: F401  (importable from here)

MANIFEST = "reproduce.json"

def reproduce(
    out_dir: str | Path,
    *,
    models: Sequence[str] = ZOO_MODELS,
    data: str = "fashion-mnist",
    protocol: str = "quick",
    stages: Sequence[str] | None = None,
    force: Sequence[str] = (),
    device=None,
    seed: int = 0,
    reference: str | None = "default",
    quiet: bool = False,
    log: Callable[[str], None] = print,
    report: bool = True,
) -> list[dict]:
    """Run (or reuse) every stage for ``models`` on ``data`` and build the report; returns one status
    dict per stage: name, group, file, status (cached|ran), ``wall_s`` (the stage's whole wall time when
    it ran, e.g. generation + reference + evaluation for the corruption stage) and ``experiment_wall_s``
    (the experiment's own timer, the result file's ``run.wall_s``)."""
    from bnadapt.models import load_model

    out = Path(out_dir)
    wanted = _names(stages, GROUPS, "--stages") if stages else list(GROUPS)
    loaded = [load_model(s) for s in models]
    all_stages = plan(loaded, data, out, protocol, device=device, seed=seed, quiet=quiet, reference=reference,
                      groups=wanted)
    forced = _names(force, list(GROUPS) + [s.name for s in all_stages], "--force")
    rank, size = world()
    statuses = []
    t_all = time.time()
    for st in all_stages:
        if st.group not in wanted:
            continue
        want_hash = inputs_sha256(st.inputs())
        done = st.path.exists() and read_result(st.path)["run"].get("stage_inputs_sha256") == want_hash
        if done and st.name not in forced and st.group not in forced:
            log(f"[{st.name}] cached: {st.path}")
            statuses.append(_status(st, "cached", read_result(st.path)["run"]))
            continue
        if size > 1 and not st.distributed:
            if rank == 0:
                res = _run(st, log, want_hash)
            _barrier()
            if rank != 0:
                continue
        else:
            res = _run(st, log, want_hash)
            if res is None:  # a non-zero rank of a distributed stage
                continue
        statuses.append(_status(st, "ran", res.run, res.wall_s))
    if rank == 0:
        inputs = {"models": [m.describe() for m in loaded], "data": {"spec": data},
                  "params": {"protocol": protocol, "sizes": PROTOCOLS[protocol], "paper": PAPER},
                  "seed": seed, "device": resolve_device(device).type, "precision": "fp32"}
        statuses = _merge_manifest(out / MANIFEST, inputs, statuses)
        write_result(out / MANIFEST, "reproduce", inputs, {"stages": statuses, "protocol": protocol},
                     wall_s=time.time() - t_all)
        if report:
            from bnadapt.report import build_report

            paths = build_report(out)
            log(f"wrote {paths['md']} and {paths['html']}")
    return statuses


def _merge_manifest(path: Path, inputs: dict, statuses: list[dict]) -> list[dict]:
    """This run's stage statuses, plus the earlier run's for stages not run now (``--stages``), when that
    run had the same models, data and protocol and its result files still exist; in group order."""
    if path.exists():
        try:
            old = read_result(path, "reproduce")
        except BnadaptError:
            old = None
        if old is not None and inputs_sha256(old["inputs"]) == inputs_sha256(inputs):
            now = {s["stage"] for s in statuses}
            files = {s["stage"]: locate(path.parent, s["file"]) for s in old["results"]["stages"]}
            kept = [dict(s, file=str(files[s["stage"]]), **_walls(read_result(files[s["stage"]])["run"]))
                    for s in old["results"]["stages"]
                    if s["stage"] not in now and files[s["stage"]].exists()]  # times as the file records them
            statuses = kept + statuses
    return sorted(statuses, key=lambda s: GROUPS.index(s["group"]) if s.get("group") in GROUPS else len(GROUPS))


def _walls(run: dict, experiment_wall_s: float | None = None) -> dict:
    """``wall_s``: the stage's whole wall time (None for a file written before bnadapt recorded it);
    ``experiment_wall_s``: the experiment's own timer (the result file's ``run.wall_s``)."""
    exp = experiment_wall_s if experiment_wall_s is not None else run.get("wall_s")
    sec = lambda v: None if v is None else round(round(float(v), 3), 1)  # noqa: E731  as the file rounds it, first
    return {"wall_s": sec(run.get("stage_wall_s")), "experiment_wall_s": sec(exp)}


def _status(st: Stage, status: str, run: dict, experiment_wall_s: float | None = None) -> dict:
    """A stage's line in the manifest (its times: :func:`_walls`)."""
    return {"stage": st.name, "group": st.group, "file": str(st.path), "status": status,
            **_walls(run, experiment_wall_s)}


def _run(st: Stage, log, stage_hash: str) -> Result | None:
    """Run one stage and write its result with the stage's record in ``run``: the skip hash, the stage
    name, its whole wall time (``stage_wall_s``; the experiment's own stays ``wall_s``) and the
    standalone command(s) that give the same result."""
    log(f"[{st.name}] running")
    t = time.time()
    res = st.run()
    if res is None:
        return None
    wall = time.time() - t
    res.run["stage_inputs_sha256"] = stage_hash  # what the skip check compares
    res.run["stage"] = st.name
    res.run["stage_wall_s"] = round(wall, 3)
    if st.commands is not None:
        res.run["commands"] = st.commands()
    res.write(st.path)
    log(f"[{st.name}] done in {wall:.0f} s: {st.path}")
    return res


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _names(values: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    out = []
    for v in values:
        for name in str(v).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in allowed:
                raise BnadaptError(f"unknown stage {name!r} in {what}; choose from {', '.join(GROUPS)} "
                                   "(or a stage name listed by a previous run)")
            out.append(name)
    return out
