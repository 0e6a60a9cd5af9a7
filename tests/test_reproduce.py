"""bnadapt reproduce end to end on a tiny model and data: every section and figure of the report exists,
every table's numbers equal those in the result files, a second run reuses every stage, --force redoes
one, an interrupted run resumes, and bad input is one line with exit code 2 (finished stages kept)."""

from __future__ import annotations

import re

import pytest

import bnadapt.reproduce as R
from bnadapt.cli import main
from bnadapt.results import read_result
from bnadapt.tables import pct, pct_cell

from tests.conftest import make_tiny_files

TINY = {
    "noise": {"images": 24, "runs": 2, "batch_size": 8, "sigmas": [0.0, 0.5]},
    "sweep": {"images": 24, "runs": 1, "sigma": 0.5, "batch_size": 8},
    "certify": {"images": 3, "per_class": 1, "n0": 8, "n": 64, "alpha": 0.05, "sigmas": [0.25, 0.5], "calib_n": 16,
                "compile": False},
    "gradients": {"images": 2, "sigmas": [0.0, 0.5], "batch_size": 8},
    "attacks": {"images": 6, "per_class": 2, "batch_size": 6, "steps": 2, "runs": 1, "eot_m": [1, 2]},
    "poison": {"images": 6, "qs": [0.25], "rhos": [1.0], "batch_sizes": [6], "steps": 2, "runs": 1, "trusted": 8},
    "corruptions": {"images": 6, "runs": 1, "batch_size": 6, "workers": 0},
    "spectra": {"images": 4, "severity": 3, "batch_size": 4, "corruptions": ["gaussian_noise", "fog"]},
    "stream": {"images": 12, "runs": 1, "batch_sizes": [1, 4], "sigma": 0.5, "scenarios": ["iid"]},
}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setitem(R.PROTOCOLS, "quick", TINY)
    _, data, ck = make_tiny_files(tmp_path, 40, warm_bn=True,
                                  recipe={"name": "pgd-linf", "threat_model": "linf", "eps": 0.05})
    return tmp_path / "out", data, ck


def go(out, data, ck, **kw):
    return R.reproduce(out, models=[ck], data=data, protocol="quick", quiet=True, log=lambda *_: None, **kw)


def test_reproduce_report_caching_and_resume(setup):
    out, data, ck = setup
    first = go(out, data, ck)
    assert {s["status"] for s in first} == {"ran"}
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for heading in ("The paper's claims, measured here", "Table 1", "Table 4", "Table 5", "Certification",
                    "Adversarial attacks on the adapted model (Tables 2 and 7)", "Batch poisoning",
                    "Common corruptions (Tables 3 and 8)", "Fourier spectra", "Loss gradients", "Streams",
                    "Reduced parameters of the quick protocol"):
        assert heading in md, heading
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(figures) >= 6 and all((out / f).is_file() for f in figures)
    assert html.count("data:image/png;base64,") == len(figures)  # every figure embedded
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # no external request
    # every table's numbers come from the result files
    noise = read_result(out / "noise" / "table1.json")
    for r in noise["results"]["rows"]:
        assert pct_cell(r["standard"]) in md and pct_cell(r["adapted"]) in md
    for f in (p for p in (out / "certify").glob("*.json") if not p.name.endswith(".params.json")):
        d = read_result(f, "certify")
        for s, v in d["results"]["per_sigma"].items():
            row = "| σ = " + f"{float(s):g} | " + " | ".join(pct(a) for a in v["certified_accuracy"]) + " |"
            assert row in md, row
    from bnadapt.corruptions.tables import table3

    _, _, rows3, _ = table3(read_result(out / "corruptions" / "tables3_8.json"))
    for row in rows3:
        assert "| " + " | ".join(row) + " |" in md
    sweep = read_result(out / "noise" / "table4_rho.json")
    for r in sweep["results"]["rows"]:
        assert "| " + " | ".join([r["model"], pct_cell(r["no_adaptation"])] + [pct_cell(s) for s in r["settings"]]) + " |" in md
    # a second run reuses every stage and changes no file
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "reproduce.json"}
    again = go(out, data, ck)
    assert {s["status"] for s in again} == {"cached"}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # --force redoes one group (or one stage) only
    forced = go(out, data, ck, force=["gradients"])
    assert {s["stage"] for s in forced if s["status"] == "ran"} == {"gradients", "spectra"}
    forced = go(out, data, ck, force=["sweep_rho"])
    assert {s["stage"] for s in forced if s["status"] == "ran"} == {"sweep_rho"}


def test_interrupted_run_resumes(setup, monkeypatch):
    out, data, ck = setup
    real = R._run
    calls = []

    def flaky(st, log, stage_hash):
        calls.append(st.name)
        if st.group == "certify" and sum(c.startswith("certify") for c in calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(st, log, stage_hash)

    monkeypatch.setattr(R, "_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        go(out, data, ck)
    monkeypatch.setattr(R, "_run", real)
    statuses = {s["stage"]: s["status"] for s in go(out, data, ck)}
    assert statuses["noise"] == "cached" and statuses["sweep_rho"] == "cached"
    done_before = [c for c in calls[:-1]]
    assert all(statuses[c] == "cached" for c in done_before)
    assert statuses[calls[-1]] == "ran" and statuses["gradients"] == "ran" and statuses["corruptions"] == "ran"


def test_bad_input(setup, capsys):
    out, data, ck = setup
    for argv, word in ((["--stages", "noise,bogus"], "bogus"), (["--force", "nothing"], "nothing"),
                       (["--model", "zoo:nope"], "zoo model"), (["--data", "/no/such/data.npz"], "not found")):
        base = ["reproduce", "--out", str(out), "--model", ck, "--data", data]
        code = main(base + argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and word in err, err
    (out.parent / "afile").write_text("x")
    assert main(["reproduce", "--out", str(out.parent / "afile"), "--model", ck, "--data", data]) == 2
    assert main(["report", str(out.parent / "empty_nonexistent")]) == 2


def test_partial_runs_keep_the_other_stages_in_the_report(setup):
    out, data, ck = setup
    go(out, data, ck, stages=["noise"])
    go(out, data, ck, stages=["gradients"])
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "Loss gradients" in md  # the second partial run kept the first one's stage
    man = {s["stage"] for s in read_result(out / "reproduce.json")["results"]["stages"]}
    assert {"noise", "sweep_rho", "gradients", "spectra"} <= man
