"""Poisoning over time against the online estimators (bnadapt/stream/poison.py, ``bnadapt poison
--online``): q = 0 is the unpoisoned stream evaluation exactly, the poison stays inside its threat model
and changes only its own images, an estimator without adaptation (rho 0, prior N = inf) is immune, the
replayed online model commits nothing, the poison carries over, and bad options are one-line errors.
Tiny model and data (tests/conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnadapt.adapt import stream_adapt
from bnadapt.attacks.poison import Replay, n_poison
from bnadapt.attacks.threat import Threat, make_threat
from bnadapt.cli import main
from bnadapt.results import read_result
from bnadapt.stream import make_stream, stream_correct, stream_evaluation
from bnadapt.stream.evaluate import online_slices
from bnadapt.stream.poison import format_stream_poison_table, poisoned_stream, stream_poison_table
from tests.conftest import make_tiny_files

ATTACK = dict(steps=3, restarts=1, loss="ce-correct", schedule="cosine", start="random")
ONLINE = dict(momentum=0.05, window=16, prior_n=8.0)
EPS = 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("stream_poison"), 40, warm_bn=True)


@pytest.fixture(scope="module")
def loaded(files):
    from bnadapt.data import select
    from bnadapt.models import load_model

    _, data, ck = files
    return load_model(ck), select(data, images=40)


def _stream(sel, run=0):
    return make_stream(sel, scenario="iid", sigma=0.0, seed=0, run=run)


@pytest.mark.parametrize("robust", ["none", "trimmed"])
def test_q0_is_the_unpoisoned_stream_evaluation_exactly(loaded, robust):
    m, sel = loaded
    rb = None if robust == "none" else robust
    res = stream_poison_table([m], sel, qs=(0.0,), estimators=("ema", "window", "prior"), robusts=(robust,),
                              batch_sizes=(8,), constraints=("threat",), threats=[make_threat("linf", EPS)], runs=2,
                              sigma=0.0, quiet=True, **ONLINE, **ATTACK).as_dict()
    ref = stream_evaluation([m], sel, estimators=("ema", "window", "prior"), batch_sizes=(8,), sigma=0.0, runs=2,
                            robust=rb, quiet=True, **ONLINE).as_dict()
    methods = ref["results"]["rows"][0]["methods"]
    for s in res["results"]["settings"]:
        assert s["poisoned"]["0"]["runs"] == methods[s["estimator"]]["runs"]  # exactly, run by run
        assert s["clean"]["runs"] == methods[s["estimator"]]["runs"]
        assert s["drop"]["0"]["mean"] == 0.0
    # and position by position against the evaluation's own loop
    stream = _stream(sel)
    for e in ("ema", "window", "prior"):
        got = poisoned_stream(m.model, sel.dataset, stream, 8, q=0.0, estimator=e, rho=None if e == "prior" else 1.0,
                              robust=rb, threat=make_threat("linf", EPS), attack_kw=ATTACK, online_kw=ONLINE)
        want = stream_correct(stream_adapt(m.model, None if e == "prior" else 1.0, estimator=e, robust=rb, **ONLINE),
                              sel.dataset, stream, online_slices(len(stream), 8), device=torch.device("cpu"))
        assert np.array_equal(got["correct"], want) and not got["poison"].any()


@pytest.mark.parametrize("estimator,robust", [("ema", None), ("window", None), ("prior", None), ("ema", "trimmed"),
                                              ("window", "median")])
@pytest.mark.parametrize("constraint", ["threat", "unconstrained"])
def test_poison_stays_in_its_threat_model_and_only_its_own_images(loaded, estimator, robust, constraint):
    m, sel = loaded
    stream = _stream(sel)
    threat = make_threat("linf", EPS) if constraint == "threat" else Threat.box()
    out = poisoned_stream(m.model, sel.dataset, stream, 8, q=0.25, estimator=estimator,
                          rho=None if estimator == "prior" else 1.0, robust=robust, threat=threat, attack_kw=ATTACK,
                          online_kw=ONLINE, constraint=constraint, return_images=True)
    x, x0, pm = out["x"], out["x_clean"], torch.from_numpy(out["poison"])
    assert tuple(x.shape) == tuple(x0.shape)
    assert torch.equal(x[~pm], x0[~pm])  # benign images untouched, bit for bit
    assert x.min() >= 0 and x.max() <= 1
    if constraint == "threat":
        assert float((x[pm] - x0[pm]).abs().amax()) <= EPS
    # round(q B) of every batch (40 images = 5 batches of 8)
    per_batch = pm.view(5, 8).sum(1)
    assert per_batch.tolist() == [n_poison(0.25, 8)] * 5 and out["batches"] == 5
    assert not torch.equal(x[pm], x0[pm])  # the attacker did move its images


@pytest.mark.parametrize("estimator,rho,prior_n", [("ema", 0.0, 8.0), ("window", 0.0, 8.0), ("prior", None, math.inf)])
def test_no_adaptation_is_immune(loaded, estimator, rho, prior_n):
    m, sel = loaded
    stream = _stream(sel)
    kw = dict(estimator=estimator, rho=rho, robust=None, threat=Threat.box(), attack_kw=ATTACK,
              online_kw=dict(ONLINE, prior_n=prior_n), constraint="unconstrained")
    clean = poisoned_stream(m.model, sel.dataset, stream, 8, q=0.0, **kw)["correct"]
    out = poisoned_stream(m.model, sel.dataset, stream, 8, q=0.25, **kw)
    benign = ~out["poison"]
    assert out["poison"].any() and np.array_equal(out["correct"][benign], clean[benign])
    res = stream_poison_table([m], sel, qs=(0.0, 0.25), estimators=(estimator,), rhos=(1.0 if rho is None else rho,),
                              batch_sizes=(8,), constraints=("unconstrained",), quiet=True,
                              **dict(ONLINE, prior_n=prior_n), **ATTACK).as_dict()
    s = res["results"]["settings"][0]
    assert s["drop"]["0.25"]["mean"] == 0.0 and s["poisoned_batches"]["0.25"] == 5


def test_replay_commits_nothing_and_the_poison_carries_over(loaded):
    """Trying candidate batches on a Replay leaves the online model where it was; the kept (poisoned)
    batch stays in the ema estimate and changes a later clean batch's outputs."""
    m, _ = loaded
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(8, 1, 12, 12, generator=g) * 0.5 for _ in range(3)]
    a = stream_adapt(m.model, 1.0, estimator="ema", momentum=0.05)
    b = stream_adapt(m.model, 1.0, estimator="ema", momentum=0.05)
    with torch.no_grad():
        a(xs[0]), b(xs[0])
        r = Replay(a)
        for _ in range(3):
            r(torch.rand(8, 1, 12, 12, generator=g))
        with torch.enable_grad():
            x = xs[1].clone().requires_grad_(True)
            r(x).sum().backward()
        assert torch.equal(r(xs[1]), b(xs[1]))  # committed exactly as the model fed the same history
        assert torch.equal(a(xs[2]), b(xs[2]))
        # a poisoned batch instead of xs[1]: the next clean batch is classified differently
        c = stream_adapt(m.model, 1.0, estimator="ema", momentum=0.05)
        c(xs[0]), c(torch.ones(8, 1, 12, 12))
        d = stream_adapt(m.model, 1.0, estimator="ema", momentum=0.05)
        d(xs[0]), d(xs[1])
        assert not torch.allclose(c(xs[2]), d(xs[2]))


POISON = ["--threat", "linf", "--eps", "0.1", "--images", "24", "--batch-sizes", "8", "--steps", "2", "--rhos", "1",
          "--constraints", "threat", "--threads", "1", "--quiet"]


def test_poison_online_command(files, tmp_path, capsys):
    _, data, ck = files
    out = tmp_path / "sp.json"
    code = main(["poison", "--model", ck, "--data", data, *POISON, "--online", "ema,window,prior", "--qs", "0,0.25",
                 "--robust", "none,trimmed", "--window", "16", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "q=0" in stdout and "q=0.25" in stdout and "window W=16" in stdout
    res = read_result(out, "stream-poison")
    sets = res["results"]["settings"]
    assert [(s["estimator"], s["robust"]) for s in sets] == [(e, r) for e in ("ema", "window", "prior")
                                                            for r in ("none", "trimmed")]
    assert res["inputs"]["params"]["stream"]["length"] == 24
    assert format_stream_poison_table(res).count("\n") == len(sets) + 2


@pytest.mark.parametrize("argv,msg", [
    (["--online", "ema,foo"], "--online"),
    (["--online", "ema,ema"], "--online"),
    (["--online", "ema", "--qs", "1"], "--qs"),
    (["--online", "ema", "--qs", "-0.1"], "--qs"),
    (["--online", "ema", "--qs", "0,0"], "--qs"),
    (["--online", "ema", "--momentum", "0"], "--momentum"),
    (["--online", "window", "--window", "1"], "--window"),
    (["--online", "prior", "--prior-n", "-1"], "--prior-n"),
    (["--online", "ema", "--sigma", "-1"], "--sigma"),
    (["--online", "ema", "--batch-sizes", "1"], "--batch-sizes"),
    (["--online", "ema", "--robust", "mean"], "--robust"),
    (["--online", "ema", "--shard", "0/2"], "--shard"),
])
def test_bad_online_poison_options_are_one_line_exit_2_and_no_file(files, tmp_path, capsys, argv, msg):
    _, data, ck = files
    out = tmp_path / "bad.json"
    code = main(["poison", "--model", ck, "--data", data, *POISON, *argv, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
