"""Tests for bnadapt.certify's runs over data sets: the TSV, resume, shards, torchrun, summaries (the two
honest multi-sigma summaries) and Cohen-layout files. Everything is tiny."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnadapt.errors import BnadaptError
from bnadapt.certify import (
    COLUMNS, DEFAULT_RADII, certified_accuracy, certify_run, cohen_tsv_path, merge_shards, parse_shard, read_rows,
    summarize, write_cohen_tsvs,
)
from bnadapt.certify.summary import envelope_of_curves, select_per_image
from bnadapt.smoothing import ABSTAIN, certified_radius

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_torchrun_certify", HERE / "_torchrun_certify.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)


# --------------------------------------------------------------------------------------------------
# Runs: resume, shards, torchrun, summaries
# --------------------------------------------------------------------------------------------------

def run(out, *, resume=False, shard=None, callback=None, indices=None, calls=None, **over):
    params = dict(helper.RUN, **over)

    def factory(sigma):
        if calls is not None:
            calls.append(sigma)
        return helper.factory(sigma)

    return certify_run(factory, helper.build_dataset(), helper.INDICES if indices is None else indices, out,
                       resume=resume, shard=shard, callback=callback, quiet=True, **params)


def keyed(path):
    """Rows keyed by (idx, sigma), without the time column."""
    rows = read_rows(path)
    out = {(r["idx"], r["sigma"]): {k: v for k, v in r.items() if k != "time"} for r in rows}
    assert len(out) == len(rows)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """An uninterrupted single-process run (one thread, like the torchrun ranks)."""
    out = tmp_path_factory.mktemp("single") / "single.tsv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run(out)
    finally:
        torch.set_num_threads(threads)
    assert res.written == len(helper.INDICES) * len(helper.RUN["sigmas"]) and res.skipped == 0
    return out


def test_tsv_layout(single):
    lines = single.read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert len(lines) == 1 + len(helper.INDICES) * 2
    rows = read_rows(single)
    k = len(helper.RUN["sigmas"])
    for r in rows:
        assert r["correct"] == int(r["predict"] == r["label"])
        assert r["radius_bonf"] <= r["radius"]
        expect = certified_radius(r["count"], helper.RUN["n"], helper.RUN["alpha"], r["sigma"])
        assert r["radius"] == (expect if expect is not None else 0.0)
        assert (r["predict"] == ABSTAIN) == (expect is None)
        bonf = certified_radius(r["count"], helper.RUN["n"], helper.RUN["alpha"] / k, r["sigma"])
        assert r["radius_bonf"] == (bonf if bonf is not None else 0.0)
        assert r["correct_bonf"] == int(bonf is not None and r["top"] == r["label"])
    assert len({r["predict"] for r in rows}) >= 2  # a non-trivial run: several outcomes
    params = json.loads(Path(str(single) + ".params.json").read_text())["params"]
    assert params["alpha_bonf"] == helper.RUN["alpha"] / k and params["shard"] is None


def test_resume_after_kill_equals_uninterrupted(single, tmp_path):
    out = tmp_path / "killed.tsv"

    def kill_after_3(row, seen=[]):  # noqa: B006 (the shared list counts the calls)
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(out, callback=kill_after_3)
    assert len(read_rows(out)) == 3
    res = run(out, resume=True)
    assert res.written == 9 and res.skipped == 3
    assert keyed(out) == keyed(single)
    # Resuming a finished run does nothing, not even build a model.
    calls = []
    res = run(out, resume=True, calls=calls)
    assert res.written == 0 and calls == []


def test_resume_drops_partial_row(single, tmp_path):
    out = tmp_path / "partial.tsv"
    shutil.copy(single, out)
    shutil.copy(str(single) + ".params.json", str(out) + ".params.json")
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    cut = sum(len(line) for line in lines[:7]) + len(lines[7]) // 2  # header + 6 rows + half a row
    out.write_bytes(data[:cut])
    assert len(read_rows(out)) == 6  # the partial row is ignored when reading
    res = run(out, resume=True)
    assert res.written == 6
    assert out.read_bytes().endswith(b"\n")
    assert keyed(out) == keyed(single)


def test_resume_refuses_other_parameters(single, tmp_path):
    out = tmp_path / "other.tsv"
    shutil.copy(single, out)
    shutil.copy(str(single) + ".params.json", str(out) + ".params.json")
    for change in (dict(n=65), dict(seed=124), dict(alpha=0.01), dict(sigmas=[0.25])):
        with pytest.raises(BnadaptError, match="other parameters"):
            run(out, resume=True, **change)
    with pytest.raises(BnadaptError, match="other parameters"):
        run(out, resume=True, indices=[0, 1])
    with pytest.raises(BnadaptError, match="other parameters"):
        run(out, resume=True, shard=(0, 2))
    with pytest.raises(BnadaptError, match="already exists"):
        run(out)


def test_shards_merge_to_single_run(single, tmp_path):
    a, b = tmp_path / "s0.tsv", tmp_path / "s1.tsv"
    run(a, shard=(0, 2))
    run(b, shard="1/2")
    assert {i for i, _ in keyed(a)} == set(helper.INDICES[0::2])
    assert summarize(a)["complete"] and summarize(a)["num_images"] == len(helper.INDICES[0::2])
    merged = merge_shards([a, b], tmp_path / "merged.tsv", helper.INDICES)
    assert keyed(merged) == keyed(single)
    order = [(r["idx"], r["sigma"]) for r in read_rows(merged)]
    assert order == [(i, s) for s in helper.RUN["sigmas"] for i in helper.INDICES]
    assert order == [(r["idx"], r["sigma"]) for r in read_rows(single)]  # same order as one run
    p_single = json.loads(Path(str(single) + ".params.json").read_text())["params"]
    p_merged = json.loads(Path(str(merged) + ".params.json").read_text())["params"]
    assert p_merged == p_single  # the merged file can be summarized or resumed like a single run
    assert run(merged, resume=True).written == 0
    with pytest.raises(BnadaptError, match="missing"):
        merge_shards([a], tmp_path / "m2.tsv", helper.INDICES)
    with pytest.raises(BnadaptError, match="twice"):
        merge_shards([a, a, b], tmp_path / "m3.tsv", helper.INDICES)
    with pytest.raises(BnadaptError, match="other images"):
        merge_shards([a, b], tmp_path / "m4.tsv", helper.INDICES[::-1])
    # the run's indices are in the sidecars, so the CLI merge needs none
    assert keyed(merge_shards([b, a], tmp_path / "m5.tsv")) == keyed(single)


def _has_gloo():
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _has_gloo(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_ranks(single, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_torchrun_certify.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "dist.tsv"
    assert (tmp_path / "dist.tsv.rank0").is_file() and (tmp_path / "dist.tsv.rank1").is_file()
    assert keyed(merged) == keyed(single)
    order = [(r["idx"], r["sigma"]) for r in read_rows(merged)]
    assert order == [(i, s) for s in helper.RUN["sigmas"] for i in helper.INDICES]
    assert order == [(r["idx"], r["sigma"]) for r in read_rows(single)]  # same order as one run


def test_certified_accuracy_by_hand():
    rows = [dict(idx=0, correct=1, radius=0.3), dict(idx=1, correct=1, radius=0.0),
            dict(idx=2, correct=0, radius=0.0), dict(idx=3, correct=1, radius=1.0)]
    acc = certified_accuracy(rows, [0.0, 0.25, 0.5, 1.0, 1.25])
    assert acc.tolist() == [0.75, 0.5, 0.25, 0.25, 0.0]


def _row(idx, sigma, label, top, count, n=100, alpha=0.05, k=2):
    r = certified_radius(count, n, alpha, sigma)
    rb = certified_radius(count, n, alpha / k, sigma)
    return dict(idx=idx, label=label, sigma=sigma, top=top, count=count, predict=top if r is not None else ABSTAIN,
                radius=r or 0.0, correct=int(r is not None and top == label), radius_bonf=rb or 0.0,
                correct_bonf=int(rb is not None and top == label), time=0.0)


def test_multi_sigma_summaries_never_read_the_label():
    # Image 0: sigma 0.25 certifies the right class with a small radius, sigma 0.5 the wrong class with a
    # larger one. The removed "envelope" picked the correct sigma after looking at the label (an oracle).
    rows = [_row(0, 0.25, label=1, top=1, count=80), _row(0, 0.5, label=1, top=2, count=99),
            _row(1, 0.25, label=0, top=0, count=100), _row(1, 0.5, label=0, top=0, count=100)]
    sel = {r["idx"]: r for r in select_per_image(rows, [0.25, 0.5], n=100, alpha_bonf=0.025)}
    assert sel[0]["sigma"] == 0.5 and sel[0]["correct"] == 0  # largest radius wins, then it is wrong
    assert sel[1]["sigma"] == 0.5 and sel[1]["correct"] == 1
    # The choice is the same whatever the labels are.
    flipped = [dict(r, label=7) for r in rows]
    assert [r["sigma"] for r in select_per_image(flipped, [0.25, 0.5], 100, 0.025)] == [r["sigma"] for r in sel.values()]
    # The envelope of curves is, at each radius, one fixed sigma's curve (named).
    env = envelope_of_curves({"0.25": [1.0, 0.5, 0.0], "0.5": [0.5, 0.5, 0.5]}, [0.0, 0.3, 0.6])
    assert env == {"certified_accuracy": [1.0, 0.5, 0.5], "sigma": [0.25, 0.25, 0.5]}
    # Every image abstains at every sigma: the selection abstains.
    ab = select_per_image([_row(3, 0.25, 0, 0, 50), _row(3, 0.5, 0, 0, 40)], [0.25, 0.5], 100, 0.025)
    assert ab[0]["predict"] == ABSTAIN and ab[0]["correct"] == 0


def test_summarize_and_cohen_files(single, tmp_path):
    s = summarize(single)
    assert s["num_rows"] == 12 and s["radii"] == list(DEFAULT_RADII) and len(s["radii"]) == 12
    assert s["complete"] and not s["partial"] and s["num_images"] == len(helper.INDICES)
    assert s["alpha_bonf"] == pytest.approx(helper.RUN["alpha"] / 2)
    curves = np.array([d["certified_accuracy"] for d in s["per_sigma"].values()])
    env = np.array(s["envelope_of_curves"]["certified_accuracy"])
    assert np.array_equal(env, curves.max(axis=0))  # the best fixed sigma, never more
    sel = np.array(s["per_image_selection"]["certified_accuracy"])
    assert np.all(sel <= 1) and s["per_image_selection"]["level"] == pytest.approx(helper.RUN["alpha"] / 2)
    for d in s["per_sigma"].values():
        assert len(d["certified_accuracy"]) == 12 and d["num_images"] == len(helper.INDICES)
        assert np.all(np.array(d["certified_accuracy"]) >= np.array(d["certified_accuracy_bonf"]))
        assert 0 <= d["abstain_rate"] <= d["abstain_rate_bonf"] <= 1 and d["mean_time_s"] > 0
        assert d["warmup_s"] is not None and d["warmup_s"] >= 0  # timed apart from the rows
        # the exact step curve agrees with the sampled radii
        from bnadapt.certify import accuracy_at

        assert np.allclose(accuracy_at(d["correct_radii"], d["num_images"], DEFAULT_RADII), d["certified_accuracy"])
    # One Cohen-layout file per sigma: their analysis on each file gives the per-sigma numbers.
    paths = write_cohen_tsvs(single)
    assert [p.name for p in paths] == [cohen_tsv_path(single, s).name for s in helper.RUN["sigmas"]]
    for p, d in zip(paths, s["per_sigma"].values()):
        lines = p.read_text().splitlines()
        assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
        body = [l.split("\t") for l in lines[1:]]
        for r_i, r in enumerate(DEFAULT_RADII[:4]):
            cohen = np.mean([int(b[4]) == 1 and float(b[3]) >= r for b in body])
            assert cohen == pytest.approx(d["certified_accuracy"][r_i], abs=1e-9)


def test_cohen_files_never_round_a_radius_up(tmp_path):
    """A radius just below a grid radius stays below it in the Cohen-layout file (it used to be written
    with 3 decimals, so 0.4996 became 0.500 and Cohen's ``radius >= 0.5`` counted it: an over-claim)."""
    from bnadapt.certify.rows import COLUMNS, _format_row

    tsv = tmp_path / "c.tsv"
    rows = [dict(idx=i, label=1, sigma=0.5, predict=1, radius=r, correct=1, radius_bonf=r, correct_bonf=1, top=1,
                 count=990, time=0.1) for i, r in enumerate((0.4996, 0.49999999, 0.5, 1.2345678901))]
    tsv.write_text("\t".join(COLUMNS) + "\n" + "".join(_format_row(r) for r in rows))
    (path,) = write_cohen_tsvs(tsv)
    radii = [float(line.split("\t")[3]) for line in path.read_text().splitlines()[1:]]
    assert radii == [r["radius"] for r in rows]
    assert sum(r >= 0.5 for r in radii) == 2


def test_shard_summary_is_partial(tmp_path):
    a = tmp_path / "s0.tsv"
    run(a, shard=(0, 2))
    s = summarize(a)
    assert s["partial"] and s["shard"] == [0, 2]


def test_failed_run_leaves_no_files(tmp_path):
    out = tmp_path / "fail.tsv"

    def broken(sigma):
        raise RuntimeError("factory failed")

    with pytest.raises(RuntimeError):
        certify_run(broken, helper.build_dataset(), helper.INDICES, out, quiet=True, **helper.RUN)
    assert not out.exists() and not Path(str(out) + ".params.json").exists()


def test_resume_error_says_only_what_differs(single, tmp_path):
    out = tmp_path / "other.tsv"
    shutil.copy(single, out)
    shutil.copy(str(single) + ".params.json", str(out) + ".params.json")
    with pytest.raises(BnadaptError) as e:
        run(out, resume=True, seed=124)
    msg = str(e.value)
    assert "seed: 123 in the file, 124 now" in msg and "--resume" not in msg.split("(")[0] and len(msg) < 400


def test_bad_run_args_leave_nothing(tmp_path):
    with pytest.raises(BnadaptError, match="sigma"):
        run(tmp_path / "bad.tsv", sigmas=[0.25, -1.0])
    with pytest.raises(BnadaptError, match="duplicates"):
        run(tmp_path / "bad.tsv", indices=[0, 0])
    assert not (tmp_path / "bad.tsv").exists()


@pytest.mark.parametrize("spec", ["3/2", "a/b", "2/2", "-1/2", "1", "0/0", ""])
def test_bad_shard_spec(spec):
    with pytest.raises(BnadaptError, match="shard"):
        parse_shard(spec)


def test_parse_shard_ok():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 4 ") == (3, 4)


def test_run_accepts_get_style_dataset(single, tmp_path):
    """bnadapt.data datasets expose get(indices) -> (NCHW images, labels) and a name."""
    items = helper.build_dataset()

    class GetDataset:
        name = "tiny"

        def get(self, idx):
            return torch.stack([items[i][0] for i in idx]), torch.tensor([items[i][1] for i in idx])

    out = tmp_path / "get.tsv"
    certify_run(helper.factory, GetDataset(), helper.INDICES, out, quiet=True, **helper.RUN)
    assert keyed(out) == keyed(single)
    assert json.loads(Path(str(out) + ".params.json").read_text())["params"]["dataset"] == "tiny"
