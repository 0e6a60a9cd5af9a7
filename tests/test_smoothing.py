"""Tests for bnadapt.smoothing: soundness of the certificates, the model left untouched, runs on data
sets (resume, shards, torchrun) and summaries. Everything is tiny; the whole file runs in seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from bnadapt.errors import BnadaptError
from bnadapt.smoothing import (
    ABSTAIN,
    COLUMNS,
    DEFAULT_RADII,
    Smooth,
    certified_accuracy,
    certified_radius,
    certify_run,
    clopper_pearson_lower,
    envelope_rows,
    merge_shards,
    parse_shard,
    plain_sample_counts,
    plot_certified_accuracy,
    read_rows,
    summarize,
)

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_torchrun_certify", HERE / "_torchrun_certify.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)


# --------------------------------------------------------------------------------------------------
# A linear binary classifier with a known smoothed classifier
# --------------------------------------------------------------------------------------------------

class LinearBinary(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, on 1x2x2 images (float64)."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


W = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
X = torch.tensor([[[0.3, 0.6], [0.2, 0.9]]], dtype=torch.float64)  # 1x2x2


def linear_at(p_a: float, sigma: float, cls: int = 1):
    """A linear model and the point X where the smoothed classifier returns ``cls`` with P = p_a.

    Returns (model, true certified radius |margin| / ||w||)."""
    wn = float(W.norm())
    margin = sigma * wn * norm.ppf(p_a) * (1 if cls == 1 else -1)
    b = margin - float(W @ X.flatten())
    return LinearBinary(W, b), abs(margin) / wn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def not_more_than(failures: int, trials: int, rate: float, p: float = 1e-3) -> bool:
    """False when ``failures`` out of ``trials`` is significantly more than ``rate`` (upper binomial tail)."""
    return binom.sf(failures - 1, trials, rate) > p


# --------------------------------------------------------------------------------------------------
# Soundness
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [1, 0])
def test_certify_is_sound(cls):
    sigma, alpha, trials = 0.5, 0.05, 600
    model, true_r = linear_at(0.9, sigma, cls)
    smooth = Smooth(model, 2, sigma, batch_size=200)
    g = gen(10 + cls)
    failures = certified = 0
    for _ in range(trials):
        pred, r = smooth.certify(X, n0=16, n=200, alpha=alpha, generator=g)
        if pred == ABSTAIN:
            assert r == 0.0
            continue
        certified += 1
        failures += int(pred != cls or r > true_r)
    assert certified > 0.9 * trials  # p_A = 0.9 is certified almost always at n = 200
    assert not_more_than(failures, trials, alpha), (failures, trials)


def test_radius_approaches_true_radius():
    sigma, alpha = 0.5, 0.05
    model, true_r = linear_at(0.9, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=10_000)
    g = gen(3)
    gaps = []
    for n in (100, 1_000, 10_000):
        radii = [smooth.certify(X, 16, n, alpha, g)[1] for _ in range(12)]
        gaps.append(true_r - float(np.mean(radii)))
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps
    assert gaps[2] < 0.05 * true_r, gaps


def test_clopper_pearson_matches_cohen():
    # proportion_confint(k, n, alpha=2*alpha, method="beta")[0] closed forms:
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    assert clopper_pearson_lower(1, 10, 0.05) == pytest.approx(1 - 0.95 ** (1 / 10))
    assert certified_radius(50, 100, 0.05, 1.0) is None
    r = certified_radius(100, 100, 0.001, 0.5)
    assert r == pytest.approx(0.5 * norm.ppf(0.001 ** 0.01))


def test_predict_abstains_on_boundary_and_rarely_errs():
    sigma, alpha, trials = 0.5, 0.05, 300
    # On the decision boundary P(f = 0) = P(f = 1) = 1/2: g(x) is undefined, any answer is a coin flip.
    model, _ = linear_at(0.5, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=100)
    g = gen(4)
    answered = sum(smooth.predict(X, 100, alpha, g) != ABSTAIN for _ in range(trials))
    assert answered < trials / 2
    assert not_more_than(answered, trials, alpha), answered
    # Near the boundary (p_A = 0.6 for class 1): wrong answers at most ~alpha, right ones often.
    model, _ = linear_at(0.6, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=100)
    answers = [smooth.predict(X, 100, alpha, g) for _ in range(trials)]
    wrong = sum(a == 0 for a in answers)
    assert not_more_than(wrong, trials, alpha), wrong
    assert sum(a == 1 for a in answers) > trials / 5


# --------------------------------------------------------------------------------------------------
# The model is used as given
# --------------------------------------------------------------------------------------------------

def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def same(model, snap):
    state, flags, grads = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and [m.training for m in model.modules()] == flags
            and [p.requires_grad for p in model.parameters()] == grads)


def test_model_untouched(tmp_path):
    model = helper.build_model()
    snap = snapshot(model)
    smooth = Smooth(model, helper.NUM_CLASSES, 0.25, batch_size=16)
    x, _ = helper.build_dataset()[0]
    smooth.sample_counts(x, 40, gen(0))
    smooth.certify(x, 8, 40, 0.05, gen(0))
    smooth.predict(x, 40, 0.05, gen(0))
    certify_run(lambda s: Smooth(model, helper.NUM_CLASSES, s, batch_size=16), helper.build_dataset(), [0, 1],
                tmp_path / "r.tsv", sigmas=[0.25], n0=4, n=16, alpha=0.05, seed=0, progress=False)
    assert same(model, snap)


def test_batch_dependent_models_refused():
    model = helper.build_model().train()
    snap = snapshot(model)
    with pytest.raises(BnadaptError, match="training mode"):
        Smooth(model, helper.NUM_CLASSES, 0.25)
    assert same(model, snap)  # still in train mode, statistics untouched
    model.eval()
    smooth = Smooth(model, helper.NUM_CLASSES, 0.25)
    model[1].train()  # switched after construction: refused at sampling time
    with pytest.raises(BnadaptError, match="training mode"):
        smooth.sample_counts(helper.build_dataset()[0][0], 10)
    model.eval()

    class PerBatchBN(nn.Module):  # duck-typed bnadapt.adapt.AdaptiveBatchNorm before freezing
        frozen, rho = False, 1.0

        def forward(self, x):
            return x

    with pytest.raises(BnadaptError, match="per-batch adaptive BN"):
        Smooth(nn.Sequential(PerBatchBN(), nn.Flatten(), nn.Linear(4, 2)).eval(), 2, 0.25)


# --------------------------------------------------------------------------------------------------
# Fast sampler vs the published loop
# --------------------------------------------------------------------------------------------------

def test_sample_counts_matches_plain_loop():
    model = helper.build_model()
    x, _ = helper.build_dataset()[2]
    c = helper.NUM_CLASSES
    # Deterministic regime (tiny sigma): identical counts, last batch smaller.
    fast = Smooth(model, c, 1e-7, batch_size=64).sample_counts(x, 150, gen(0))
    torch.manual_seed(0)
    plain = plain_sample_counts(model, x, 150, 1e-7, 64, c)
    assert fast.dtype == np.int64 and fast.shape == (c,)
    assert np.array_equal(fast, plain) and fast.sum() == 150 and fast.max() == 150
    # Noisy regime: same total and the same distribution (two-sample chi-square).
    num, sigma = 6000, 0.5
    fast = Smooth(model, c, sigma, batch_size=1000).sample_counts(x, num, gen(1))
    torch.manual_seed(1)
    plain = plain_sample_counts(model, x, num, sigma, 700, c)
    assert fast.sum() == plain.sum() == num
    assert (fast > 0).sum() >= 2  # the test is not trivial
    from scipy.stats import chi2_contingency

    table = np.stack([fast, plain])
    table = table[:, table.sum(0) > 0]
    assert chi2_contingency(table).pvalue > 1e-3, table
    # Same generator seed: same counts; the linear model's frequency matches its known p_A.
    model, _ = linear_at(0.7, 0.5)
    smooth = Smooth(model, 2, 0.5, batch_size=999)
    a, b = smooth.sample_counts(X, 20_000, gen(7)), smooth.sample_counts(X, 20_000, gen(7))
    assert np.array_equal(a, b)
    assert abs(a[1] / 20_000 - 0.7) < 5 * math.sqrt(0.21 / 20_000)


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
                       resume=resume, shard=shard, callback=callback, progress=False, **params)


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

    def kill_after_3(row, seen=[]):
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
        with pytest.raises(BnadaptError, match="different parameters"):
            run(out, resume=True, **change)
    with pytest.raises(BnadaptError, match="different parameters"):
        run(out, resume=True, indices=[0, 1])
    with pytest.raises(BnadaptError, match="different parameters"):
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
    with pytest.raises(BnadaptError, match="different indices"):
        merge_shards([a, b], tmp_path / "m4.tsv", helper.INDICES[::-1])


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
    # Envelope: per image, best radius among sigmas where it is correct.
    rows = [dict(idx=0, sigma=0.25, correct=1, radius=0.4, correct_bonf=1, radius_bonf=0.35),
            dict(idx=0, sigma=0.5, correct=1, radius=0.9, correct_bonf=0, radius_bonf=0.0),
            dict(idx=1, sigma=0.25, correct=0, radius=0.0, correct_bonf=0, radius_bonf=0.0),
            dict(idx=1, sigma=0.5, correct=1, radius=0.2, correct_bonf=1, radius_bonf=0.1)]
    unc = certified_accuracy(envelope_rows(rows, bonferroni=False), [0.0, 0.3, 0.5])
    bon = certified_accuracy(envelope_rows(rows, bonferroni=True), [0.0, 0.3, 0.5])
    assert unc.tolist() == [1.0, 0.5, 0.5] and bon.tolist() == [1.0, 0.5, 0.0]


def test_summarize_and_plot(single, tmp_path):
    s = summarize(single, out_json=tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["num_rows"] == s["num_rows"] == 12
    assert s["radii"] == list(DEFAULT_RADII) and len(s["radii"]) == 12
    assert s["complete"] and s["num_images"] == len(helper.INDICES)
    assert s["alpha_bonf"] == pytest.approx(helper.RUN["alpha"] / 2)
    env, unc = np.array(s["envelope"]["certified_accuracy"]), np.array(s["envelope_uncorrected"]["certified_accuracy"])
    assert np.all(unc >= env)
    for d in s["per_sigma"].values():
        assert len(d["certified_accuracy"]) == 12 and d["num_images"] == len(helper.INDICES)
        assert np.all(env >= np.array(d["certified_accuracy_bonf"]) - 1e-12)
        assert np.all(unc >= np.array(d["certified_accuracy"]) - 1e-12)
        assert np.all(np.array(d["certified_accuracy"]) >= np.array(d["certified_accuracy_bonf"]))
        assert 0 <= d["abstain_rate"] <= d["abstain_rate_bonf"] <= 1 and d["mean_time_s"] > 0
    png = plot_certified_accuracy(s, tmp_path / "cert.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), "x"])
def test_bad_sigma(sigma):
    with pytest.raises(BnadaptError, match="sigma"):
        Smooth(LinearBinary(W, 0.0), 2, sigma)


@pytest.mark.parametrize("kw, word", [(dict(n0=0), "n0"), (dict(n=0), "n"), (dict(alpha=0.0), "alpha"),
                                      (dict(alpha=1.0), "alpha"), (dict(alpha=-0.1), "alpha")])
def test_bad_certify_args(kw, word):
    smooth = Smooth(LinearBinary(W, 0.0), 2, 0.5, batch_size=10)
    args = dict(n0=5, n=10, alpha=0.05) | kw
    with pytest.raises(BnadaptError, match=word):
        smooth.certify(X, args["n0"], args["n"], args["alpha"], gen(0))
    if "n0" not in kw:
        with pytest.raises(BnadaptError, match=word):
            smooth.predict(X, args["n"], args["alpha"], gen(0))


def test_bad_input_shape_and_classes(tmp_path):
    smooth = Smooth(LinearBinary(W, 0.0), 2, 0.5)
    with pytest.raises(BnadaptError, match=r"\(C, H, W\)"):
        smooth.certify(X[None], 5, 10, 0.05)
    with pytest.raises(BnadaptError, match="float image"):
        smooth.sample_counts((X * 255).to(torch.uint8), 5)
    with pytest.raises(BnadaptError, match="num_classes"):
        Smooth(LinearBinary(W, 0.0), 3, 0.5).sample_counts(X, 5)
    with pytest.raises(BnadaptError, match="batch_size"):
        Smooth(LinearBinary(W, 0.0), 2, 0.5, batch_size=0)
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
    certify_run(helper.factory, GetDataset(), helper.INDICES, out, progress=False, **helper.RUN)
    assert keyed(out) == keyed(single)
    assert json.loads(Path(str(out) + ".params.json").read_text())["params"]["dataset"] == "tiny"
