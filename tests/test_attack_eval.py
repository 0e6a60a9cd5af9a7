"""The adversarial evaluation protocol (``bnadapt attack``, ``attack-merge``, ``poison``): result file,
tables, per-image worst case, resume, shards, torchrun, sanity checks and bad input. Tiny files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnadapt.attacks.evaluate import Protocol, attack_names, summarize, unbits
from bnadapt.attacks.threat import Threat
from bnadapt.cli import main
from bnadapt.results import read_result
from bnadapt.rowfile import read_rows
from tests.conftest import make_tiny_files

HERE = Path(__file__).resolve().parent
ATTACK = ["--threat", "linf", "--eps", "0.1", "--images", "24", "--batch-size", "8", "--runs", "2", "--steps", "2",
          "--eot-m", "1,2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("attack"), 40, warm_bn=True)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _numbers(res: dict) -> dict:
    """The results without timing and file names (what must be identical across resume/shards/torchrun)."""
    r = json.loads(json.dumps(res["results"]))
    for m in r["models"]:
        m.pop("seconds")
    for k in ("rows_file", "shard"):
        r.pop(k, None)
    return r


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    tmp, data, ck = files
    out = tmp_path_factory.mktemp("single") / "a.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["attack", "--model", ck, "--data", data, *ATTACK, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_attack_result_and_tables(files, single, capsys):
    tmp, data, ck = files
    res = read_result(single, "attack")
    prm = res["inputs"]["params"]
    assert prm["protocol"]["steps"] == 2 and prm["paper_attack"] == "eot-pgd-m2"
    assert prm["adapted_attacks"] == ["eot-pgd-m1", "eot-pgd-m2", "pgd-through-stats", "apgd-ce-through-stats",
                                      "apgd-dlr-through-stats", "transfer:pgd", "transfer:apgd-ce", "transfer:apgd-dlr"]
    m = res["results"]["models"][0]
    assert res["results"]["complete"] and m["runs_done"] == 2 and m["images_per_run"] == 24
    for side in ("no_adaptation", "adapted"):
        worst = m[side]["worst_case"]
        assert len(worst["runs"]) == 2
        for cell in m[side]["attacks"].values():  # the worst case is at most every attack and the clean accuracy
            assert all(w <= a + 1e-12 for w, a in zip(worst["runs"], cell["runs"]))
        clean = m["clean"][side]
        assert all(w <= c + 1e-12 for w, c in zip(worst["runs"], clean["runs"]))
    header, rows = read_rows(single.with_name("a.rows.jsonl"), "attack")
    assert len(rows) == 2 * 3 and all(r["n"] == 8 for r in rows)
    assert sorted(i for r in rows if r["key"][1] == 0 for i in r["indices"]) == \
        sorted(i for r in rows if r["key"][1] == 1 for i in r["indices"])  # every run covers the same images
    assert [r["indices"] for r in rows if r["key"][1] == 0] != [r["indices"] for r in rows if r["key"][1] == 1]
    assert {c["check"] for c in res["results"]["checks"]} == {"batch_of_one", "adapted_without_statistics",
                                                                "vanishing_gradients", "worst_below_paper", "eps_covers_box",
                                                                "probability_outputs"}
    # the tiny batches (8 images) trigger the small-batch warning
    assert any(c["check"] == "batch_of_one" and c["warning"] for c in res["results"]["checks"])


def test_worst_case_is_per_image_over_every_final_batch():
    p = Protocol(eot_m=(1,), plain=("pgd",), adapted=("eot", "pgd"), runs=1).validated()
    plain, adapted = attack_names(p)
    row = {"key": [0, 0, 0], "n": 4, "clean": {"plain": "1111", "adapted": "1110"},
           "plain": {"pgd": "1100"}, "adapted": {"eot-pgd-m1": "1101", "pgd-through-stats": "1011"},
           "zero_grad": {}, "seconds": {}, "winners": {}}
    s = summarize([row], model_names=["m"], threats=[Threat("linf", 0.1)], p=p)["models"][0]
    assert s["adapted"]["attacks"]["eot-pgd-m1"]["mean"] == 0.75
    assert s["adapted"]["attacks"]["pgd-through-stats"]["mean"] == 0.75
    assert s["adapted"]["worst_case"]["mean"] == 0.25  # only image 0 survives clean, EoT and through-stats
    assert s["no_adaptation"]["worst_case"]["mean"] == 0.5
    assert list(unbits("1011")) == [True, False, True, True]


def test_resume_after_a_kill_gives_the_same_result(files, single, tmp_path, capsys):
    tmp, data, ck = files
    rows = single.with_name("a.rows.jsonl")
    lines = rows.read_text().splitlines(keepends=True)
    out = tmp_path / "r.json"
    (tmp_path / "r.rows.jsonl").write_text("".join(lines[:3]) + lines[3][:40])  # two rows and a partial line
    code, _, err = run(capsys, "attack", "--model", ck, "--data", data, *ATTACK, "--out", out)
    assert code == 2 and "--resume" in err
    code, _, _ = run(capsys, "attack", "--model", ck, "--data", data, *ATTACK, "--out", out, "--resume")
    assert code == 0
    assert _numbers(read_result(out)) == _numbers(read_result(single))
    code, _, err = run(capsys, "attack", "--model", ck, "--data", data, *ATTACK, "--steps", "3", "--out", out,
                       "--resume")
    assert code == 2 and "other inputs" in err and "\n" not in err.strip()


def test_shards_merge_to_the_single_run(files, single, tmp_path, capsys):
    tmp, data, ck = files
    parts = []
    for i in range(2):
        out = tmp_path / f"s{i}.json"
        code, stdout, _ = run(capsys, "attack", "--model", ck, "--data", data, *ATTACK, "--shard", f"{i}/2", "--out", out)
        assert code == 0 and "INCOMPLETE" in stdout
        assert not read_result(out)["results"]["complete"]
        parts.append(tmp_path / f"s{i}.rows.jsonl")
    merged = tmp_path / "m.json"
    code, stdout, _ = run(capsys, "attack-merge", *parts, "--out", merged)
    assert code == 0 and "Table 2" in stdout
    assert _numbers(read_result(merged)) == _numbers(read_result(single))
    assert [r["key"] for r in read_rows(tmp_path / "m.rows.jsonl")[1]] == \
        [r["key"] for r in read_rows(single.with_name("a.rows.jsonl"))[1]]
    code, _, err = run(capsys, "attack-merge", parts[0], "--out", tmp_path / "m2.json")
    assert code == 2 and "missing" in err


def test_torchrun_gives_the_single_run(files, single, tmp_path):
    tmp, data, ck = files
    out = tmp_path / "t.json"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_torchrun_attack.py"), "attack", "--model", ck, "--data", data, *ATTACK, "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _numbers(read_result(out)) == _numbers(read_result(single))
    assert (tmp_path / "t.rows.jsonl.rank0").exists() and (tmp_path / "t.rows.jsonl.rank1").exists()


def test_only_eot_warns_that_no_attack_went_through_the_statistics(files, tmp_path, capsys):
    tmp, data, ck = files
    out = tmp_path / "e.json"
    code, stdout, _ = run(capsys, "attack", "--model", ck, "--data", data, *ATTACK, "--attacks", "eot",
                          "--no-adapt-attacks", "none", "--runs", "1", "--batch-size", "20", "--out", out)
    assert code == 0 and "adapted_without_statistics" in stdout
    checks = {c["check"]: c for c in read_result(out)["results"]["checks"]}
    assert checks["adapted_without_statistics"]["warning"]


def test_poison_command(files, tmp_path, capsys):
    tmp, data, ck = files
    out = tmp_path / "p.json"
    code, stdout, _ = run(capsys, "poison", "--model", ck, "--data", data, "--threat", "linf", "--eps", "0.1",
                          "--images", "20", "--qs", "0.25,0.5", "--rhos", "1,0", "--batch-sizes", "10", "--steps", "2",
                          "--trusted", "0", "--threads", "1", "--quiet", "--out", out)
    assert code == 0 and "q=0.25" in stdout and "no adaptation" in stdout
    res = read_result(out, "poison")
    sets = res["results"]["settings"]
    assert len(sets) == 2 * 2  # constraints x rhos
    for s in sets:
        assert s["poison_images_per_batch"] == {"0.25": 2, "0.5": 5}
        if s["rho"] == 0.0:  # no adaptation: the poison cannot reach the benign images
            ref = res["results"]["references"][0]["no_adaptation"]["mean"]
            assert s["clean"]["mean"] == pytest.approx(ref)
    _, rows = read_rows(tmp_path / "p.rows.jsonl", "poison")
    assert all(r["q"]["0.25"]["benign"] == 8 for r in rows)


@pytest.fixture
def no_bn_spec(tmp_path, monkeypatch):
    (tmp_path / "nobn_mod.py").write_text(
        "from torch import nn\n\ndef factory():\n    return nn.Sequential(nn.Flatten(), nn.Linear(144, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nobn_mod:factory"


@pytest.mark.parametrize("argv,msg", [
    (["attack", "--threat", "l3", "--eps", "0.1"], "unknown threat model"),
    (["attack", "--threat", "linf", "--eps", "0"], "--eps"),
    (["attack", "--threat", "linf", "--eps", "-0.5"], "--eps"),
    (["attack", "--threat", "linf", "--eps", "0.1", "--steps", "0"], "steps"),
    (["attack", "--threat", "linf", "--eps", "0.1", "--eot-m", "0"], "--eot-m"),
    (["attack", "--threat", "linf", "--eps", "0.1", "--batch-size", "1"], "--batch-size"),
    (["attack", "--eps", "0.1"], "no threat model in its card"),
    (["attack", "--threat", "linf", "--eps", "0.1", "--attacks", "cw"], "unknown adapted attack"),
    (["poison", "--threat", "linf", "--eps", "0.1", "--qs", "1.5"], "--qs"),
    (["poison", "--threat", "linf", "--eps", "0.1", "--qs", "0"], "--qs"),
    (["poison", "--threat", "linf", "--eps", "0.1", "--batch-sizes", "1"], "--batch-sizes"),
    (["poison", "--threat", "linf", "--eps", "0.1", "--shard", "3/2"], "--shard"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(files, tmp_path, capsys, argv, msg):
    tmp, data, ck = files
    out = tmp_path / "bad.json"
    code, _, err = run(capsys, *argv, "--model", ck, "--data", data, "--images", "10", "--trusted" if argv[0] == "poison"
                       else "--runs", "0" if argv[0] == "poison" else "1", "--out", out)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "bad.rows.jsonl").exists()


@pytest.mark.parametrize("command", ["attack", "poison"])
def test_adapted_attack_on_a_model_without_bn(files, tmp_path, capsys, no_bn_spec, command):
    tmp, data, ck = files
    out = tmp_path / "nobn.json"
    extra = ["--trusted", "0"] if command == "poison" else []
    code, _, err = run(capsys, command, "--model", no_bn_spec, "--data", data, "--threat", "linf", "--eps", "0.1",
                       "--images", "10", "--batch-size" if command == "attack" else "--batch-sizes", "5", *extra,
                       "--out", out)
    assert code == 2 and "BatchNorm" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "nobn.rows.jsonl").exists()
    if command == "attack":  # without adaptation the same model can be attacked
        code, _, _ = run(capsys, "attack", "--model", no_bn_spec, "--data", data, "--threat", "linf", "--eps", "0.1",
                         "--images", "10", "--batch-size", "1", "--attacks", "none", "--runs", "1", "--steps", "1",
                         "--quiet", "--out", out)
        assert code == 0 and out.exists()
        checks = {c["check"]: c for c in read_result(out)["results"]["checks"]}
        assert checks["batch_of_one"]["warning"]


def test_zoo_table_shows_robust_metrics():
    from bnadapt.cli.zoo import metrics_cell

    e = {"metrics": {"clean_acc": 0.85, "pgd_acc": 0.776},
         "robust_metrics": {"worst_case_acc": {"value": 0.75, "attack": "worst case of pgd-100, apgd-ce, apgd-dlr"},
                            "apgd_ce_acc": {"value": 0.76, "attack": "APGD-CE"}}}
    cell = metrics_cell(e)
    assert "pgd_acc 77.6%" in cell and "worst_case_acc 75.0%" in cell


def test_poison_shards_merge_then_resume(files, tmp_path, capsys):
    tmp, data, ck = files
    args = ["poison", "--model", ck, "--data", data, "--threat", "linf", "--eps", "0.1", "--images", "20", "--qs",
            "0.25", "--rhos", "1", "--batch-sizes", "10", "--constraints", "unconstrained", "--steps", "2",
            "--trusted", "0", "--threads", "1", "--quiet"]
    assert run(capsys, *args, "--out", tmp_path / "one.json")[0] == 0
    for i in range(2):
        assert run(capsys, *args, "--shard", f"{i}/2", "--out", tmp_path / f"p{i}.json")[0] == 0
    code, stdout, _ = run(capsys, "attack-merge", tmp_path / "p0.rows.jsonl", tmp_path / "p1.rows.jsonl",
                          "--out", tmp_path / "m.json")
    assert code == 0 and "--resume" in stdout
    assert run(capsys, *args, "--resume", "--out", tmp_path / "m.json")[0] == 0
    a, b = read_result(tmp_path / "one.json"), read_result(tmp_path / "m.json")
    assert a["results"]["settings"] == b["results"]["settings"]


def test_checks_fire_when_the_paper_attack_over_credits_and_gradients_vanish():
    """The two checks a reader most needs: the worst case well below the paper's EoT-PGD, and attacks that
    met zero input gradients; and both silent on an evaluation without those problems."""
    from bnadapt.attacks.evaluate import run_checks

    p = Protocol(eot_m=(1,), plain=("pgd",), adapted=("eot", "pgd"), runs=1).validated()

    def rows(eot, through, zero):
        return [{"key": [0, 0, 0], "n": 20, "clean": {"plain": "1" * 20, "adapted": "1" * 20},
                 "plain": {"pgd": "1" * 10 + "0" * 10}, "adapted": {"eot-pgd-m1": eot, "pgd-through-stats": through},
                 "zero_grad": zero, "seconds": {}, "winners": {}}]

    def fired(rr):
        s = summarize(rr, model_names=["m"], threats=[Threat("linf", 0.1)], p=p)
        return {c["check"]: c for c in run_checks(s, rr, p)}

    bad = fired(rows("1" * 18 + "00", "1" * 5 + "0" * 15, {"adapted/pgd-through-stats": 3}))
    assert bad["worst_below_paper"]["warning"] and bad["worst_below_paper"]["gap"] == pytest.approx(0.9 - 0.25)
    assert bad["vanishing_gradients"]["warning"] and "pgd-through-stats 3" in bad["vanishing_gradients"]["message"]
    assert not bad["adapted_without_statistics"]["warning"]
    good = fired(rows("1" * 10 + "0" * 10, "1" * 10 + "0" * 10, {"adapted/pgd-through-stats": 0}))
    assert not good["worst_below_paper"]["warning"] and not good["vanishing_gradients"]["warning"]


def test_a_model_with_zero_input_gradients_is_counted():
    """A staircase input layer (zero gradient almost everywhere) defeats gradient attacks; the attack records
    it, which is what the vanishing_gradients check reads."""
    from torch import nn

    from bnadapt.attacks.pgd import make_pgd

    class Staircase(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, x):
            return self.lin(torch.floor(x * 4).flatten(1) / 4)

    torch.manual_seed(0)
    model = Staircase().eval()
    x = torch.rand(8, 1, 4, 4)
    y = model(x).argmax(1)  # every image correct before the attack
    out = make_pgd("linf", 0.05, steps=3, keep_best=True).run(model, x, y, judge=model)
    assert out.info["zero_grad"] == 8


def test_realizable_worst_case_is_one_batch_never_weaker_than_any_single_attack(files, single):
    """Per batch: the realizable worst case counts no more correct images than any single attack's final
    batch (a test over the rows), and it lies between the union bound and the best single attack."""
    header, rows = read_rows(single.with_name("a.rows.jsonl"), "attack")
    for r in rows:
        real = int(unbits(r["realizable"]).sum())
        singles = [int(unbits(v).sum()) for v in r["adapted"].values()]
        union = unbits(r["clean"]["adapted"]).copy()
        for v in r["adapted"].values():
            union &= unbits(v)
        assert real <= min(singles) and real >= int(union.sum())
    m = read_result(single, "attack")["results"]["models"][0]["adapted"]
    best = min(c["mean"] for c in m["attacks"].values())
    assert m["worst_case"]["mean"] - 1e-12 <= m["realizable"]["mean"] <= best + 1e-12
    assert m["realizable"]["se"] >= 0


def test_realizable_batch_is_judged_as_deployed_and_inside_the_threat_model(bn_model):
    from bnadapt.adapt import adapt
    from bnadapt.attacks.evaluate import make_attack, realizable_batch
    from bnadapt.attacks.pgd import judge_batch

    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 12, 12) * 0.5, torch.randint(0, 3, (12,))
    threat, p = Threat("linf", 0.1), Protocol(steps=3, eot_m=(1,), runs=1).validated()
    deployed = adapt(bn_model, 1.0)
    finals, oks = {}, {}
    for name in ("pgd-through-stats", "apgd-ce-through-stats"):
        out = make_attack(name, threat, p).run(deployed, x, y, generator=torch.Generator().manual_seed(1),
                                               judge=deployed)
        finals[name], oks[name] = out.x_adv, judge_batch(deployed, out.x_adv, y)
    batch, ok, winner = realizable_batch(deployed, x, y, finals, oks, threat, p,
                                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(ok, judge_batch(deployed, batch, y))  # the verdict on exactly that one batch
    assert bool(threat.inside(x, batch).all())
    assert int(ok.sum()) <= min(int(o.sum()) for o in oks.values())
    assert winner in (*finals, "assembled+refined")
