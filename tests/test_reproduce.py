"""bnadapt reproduce end to end on a tiny model and data: every section and figure of the report exists,
every table's numbers (and the claims checklist's) equal those in the result files, every table names
the standalone command that gives the same result (and that command does), stage wall times cover the
whole stage, a second run reuses every stage, --force redoes one, a parameter that changes a stage's
result changes its inputs hash (so the stage reruns), a reference table made from fewer corruptions is
measured again, an interrupted run resumes, and bad input is one line with exit code 2 (finished stages
kept)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import bnadapt.reproduce as R
from bnadapt.corruptions.evaluate import refresh_reference
from bnadapt.cli import main
from bnadapt.results import Result, inputs_sha256, make_inputs, read_result
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
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setitem(R.PROTOCOLS, "quick", TINY)
    _, data, ck = make_tiny_files(tmp_path, 40, warm_bn=True,
                                  recipe={"name": "pgd-linf", "threat_model": "linf", "eps": 0.05})
    return tmp_path / "out", data, ck


def go(out, data, ck, **kw):
    return R.reproduce(out, models=[ck], data=data, protocol="quick", quiet=True, log=lambda *_: None, **kw)


# ----------------------------------------------------------------------------------------- reading the report
def sections(md: str) -> dict[str, str]:
    """The report's text under each ``##``/``###`` heading (up to the next heading)."""
    parts = re.split(r"^(#{2,3} .*)$", md, flags=re.M)
    return {parts[i].lstrip("# ").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def section(md: str, prefix: str) -> str:
    found = [t for h, t in sections(md).items() if h.startswith(prefix)]
    assert len(found) == 1, (prefix, list(sections(md)))
    return found[0]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``: rows of cells (header first, the rule dropped)."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                cur.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif cur:
            out.append(cur)
            cur = []
    return out


def rows_of(text: str) -> list[list[str]]:
    return [r for t in tables(text) for r in t]


def one(text: str, head: list[str]) -> list[list[str]]:
    """The rows (header dropped) of the one table in ``text`` whose header is ``head``."""
    found = [t[1:] for t in tables(text) if t[0] == head]
    assert len(found) == 1, (head, [t[0] for t in tables(text)])
    return found[0]


def cell(c, runs: int = 1) -> str:
    """A corruption table's cell: mean (and ± 2 sd when several runs) in percent."""
    if c is None:
        return "n/a"
    several = len(c.get("runs") or []) > 1
    return f"{100 * c['mean']:.1f} ± {100 * c['two_sd']:.2f}" if several else f"{100 * c['mean']:.1f}"


def made_by(text: str) -> str:
    m = re.search(r"Made by stage `([^`]+)` of `([^`]+)`; (the same result on its own|no command of its own; to "
                  r"redo this stage alone): (.+?)\. File:", text)
    assert m, text[-600:]
    return m.group(1)


# ----------------------------------------------------------------------------------------- the tables
def check_tables(out: Path, md: str) -> None:
    """Every table of the report against its result file, cell by cell."""
    res = lambda rel: read_result(out / rel)  # noqa: E731
    # Table 1
    d = res("noise/table1.json")
    t1 = section(md, "Table 1")
    want = [[m] + [pct_cell(r["standard"]) for r in d["results"]["rows"] if r["model"] == m] for m in ["tiny"]]
    want += [["+ adaptive BN"] + [pct_cell(r["adapted"]) for r in d["results"]["rows"] if r["model"] == "tiny"]]
    assert one(t1, ["model"] + [f"σ = {s:g}" for s in d["inputs"]["params"]["sigmas"]]) == want
    assert made_by(t1) == "noise"
    # Tables 4 and 5
    for rel, title, label in (("noise/table4_rho.json", "Table 4", "ρ"),
                              ("noise/table5_batch.json", "Table 5", "batch")):
        d = res(rel)
        text = section(md, title)
        head = ["model", "no adaptation"] + [f"{label} = {v:g}" for v in d["inputs"]["params"]["values"]]
        assert one(text, head) == [[r["model"], pct_cell(r["no_adaptation"])] + [pct_cell(s) for s in r["settings"]]
                                   for r in d["results"]["rows"]]
        assert made_by(text) == ("sweep_rho" if label == "ρ" else "sweep_batch-size")
    # certification: per sigma, the envelope of curves, its sigmas, the per-image selection
    for tag, title in (("adapt", "tiny + adaptive BN"), ("noadapt", "tiny (no adaptation)")):
        r = res(f"certify/tiny.{tag}.json")["results"]
        text = section(md, title)
        want = [[f"σ = {float(s):g}"] + [pct(a) for a in v["certified_accuracy"]] for s, v in r["per_sigma"].items()]
        want += [["envelope of curves"] + [pct(a) for a in r["envelope_of_curves"]["certified_accuracy"]],
                 ["… its σ"] + [f"{s:g}" for s in r["envelope_of_curves"]["sigma"]],
                 ["per-image selection"] + [pct(a) for a in r["per_image_selection"]["certified_accuracy"]]]
        assert one(text, ["L2 radius"] + [f"{x:g}" for x in r["radii"]]) == want
        assert made_by(text) == f"certify/tiny/{tag}"
    # Tables 2 and 7 and every attack
    d = res("attacks/table2_7.json")
    text = section(md, "Adversarial attacks")
    prm, (m,) = d["inputs"]["params"], d["results"]["models"]
    na, ad = m["no_adaptation"], m["adapted"]
    paper = prm["paper_attack"]
    thr = f"Linf <= {m['threat']['eps']:g}"
    diff = lambda a, b: f"{100 * (a['mean'] - b['mean']):+.1f}"  # noqa: E731
    t2 = [t for t in tables(text) if t[0][:3] == ["model", "threat model", "w/o adapt. BN [PGD]"]]
    real = ad["realizable"]  # the adapted worst case is one batch per deployment; the union bound beside it
    assert t2[0][1:] == [["tiny", thr, pct_cell(na["attacks"]["pgd"]), pct_cell(ad["attacks"][paper]),
                          diff(ad["attacks"][paper], na["attacks"]["pgd"]), pct_cell(na["worst_case"]),
                          pct_cell(real), diff(real, na["worst_case"]), pct_cell(ad["worst_case"]), ""]]
    ms = [a for a in prm["adapted_attacks"] if a.startswith("eot-pgd-m")]
    assert t2[1] == [["model", "threat model", "w/o adapt. BN [PGD]"] + [f"m={a.rsplit('m', 1)[1]}" for a in ms],
                     ["tiny", thr, pct_cell(na["attacks"]["pgd"])] + [pct_cell(ad["attacks"][a]) for a in ms]]
    every = {(r[1], r[2].replace("  [paper]", "")): r for r in
             one(text, ["model", "defense", "attack", "gradient through", "robust acc", "zero-grad", "s"])}
    for side, label, block in (("no_adaptation", "w/o adapt. BN", na), ("adapted", "adaptive BN", ad)):
        assert every[(label, "clean (no attack)")][4] == pct_cell(m["clean"][side])
        union = "WORST CASE (per image, all of the above)" if side == "no_adaptation" else \
            "UNION BOUND (per image, all of the above; not one batch)"
        assert every[(label, union)][4] == pct_cell(block["worst_case"])
        for a, c in block["attacks"].items():
            row = every[(label, a)]
            assert row[4] == pct_cell(c), (label, a)
            zero = m["zero_grad"].get(f"{side}/{a}")
            assert row[5] == ("" if zero is None else str(zero))
    assert every[("adaptive BN", "REALIZABLE WORST CASE (one batch per deployment)")][4] == pct_cell(ad["realizable"])
    assert len(every) == sum(len(b["attacks"]) + 2 for b in (na, ad)) + 1  # + the realizable worst case
    assert made_by(text) == "attacks"
    # the parameters as a small table (not a JSON dump), each warning on its own line
    params = dict(map(tuple, one(text, ["parameter", "value"])))
    assert params["steps"] == str(prm["protocol"]["steps"]) and params["paper's attack"] == paper
    assert '{"' not in text
    warns = [c for c in d["results"]["checks"] if c["warning"]]
    assert warns and len(re.findall(r"^- WARNING \[", text, flags=re.M)) == len(warns)
    # batch poisoning
    d = res("attacks/poison.json")
    text = section(md, "Batch poisoning")
    qs = d["inputs"]["params"]["qs"]
    want = []
    for s in d["results"]["settings"]:
        want.append([s["model"], s["constraint"], f"{s['rho']:g}", str(s["batch_size"]), pct_cell(s["clean"])]
                    + [pct_cell(s["poisoned"][f"{q:g}"]) + f" ({-100 * s['drop'][f'{q:g}']['mean'] + 0.0:+.1f})" for q in qs])
    assert one(text, ["model", "poison constraint", "rho", "batch", "q=0 (clean)"] + [f"q={q:g}" for q in qs]) == want
    assert one(text, ["model", "defense", "accuracy"]) == [[r["model"], "no adaptation (rho=0)",
                                                            pct_cell(r["no_adaptation"])]
                                                           for r in d["results"]["references"]]
    assert made_by(text) == "poison"
    # Tables 3 and 8
    d = res("corruptions/tables3_8.json")
    text = section(md, "Common corruptions")
    r, ref = d["results"]["rows"][0], d["results"]["reference"]
    s, a = r["metrics"]["standard"], r["metrics"]["adapted"]
    assert one(text, ["model", "clean", "corrupt", "gap", "clean (BN)", "corrupt (BN)", "gap (BN)", "mCE", "mCE (BN)",
                      "rel. mCE", "rel. mCE (BN)"]) == [
        ["tiny"] + [cell(m_[k]) for m_ in (s, a) for k in ("clean", "corrupt", "gap")]
        + [cell(m_[k]) for k in ("mce", "relative_mce") for m_ in (s, a)]]
    t8 = section(md, "Per corruption (Table 8 layout)")
    rows8 = one(t8, ["group", "corruption", f"{ref['name']} (ref.)", "tiny", "tiny (BN)"])
    assert rows8[0] == ["Clean", "-", f"{100 * (1 - ref['clean_error']):.1f}", cell(s["clean"]), cell(a["clean"])]
    by = {row[1].split(" ")[0]: row for row in rows8[1:] if row[1] != "average"}
    assert set(by) == set(d["inputs"]["params"]["corruptions"])
    for c, row in by.items():
        assert row[2:] == [f"{100 * (1 - ref['errors'][c]):.1f}", cell(s["per_corruption"][c]),
                           cell(a["per_corruption"][c])], c
    from bnadapt.corruptions.names import GROUPS

    averages = [row for row in rows8 if row[1] == "average"]
    assert len(averages) == len(GROUPS)
    for avg, members in zip(averages, GROUPS.values()):
        assert avg[3:] == [f"{100 * np.mean([m_['per_corruption'][c]['mean'] for c in members]):.1f}" for m_ in (s, a)]
    assert made_by(t8) == "corruptions"
    # Fig. 2 table and the spectra table
    d = res("gradients/gradient_maps.json")
    text = section(md, "Loss gradients")
    assert one(text, ["model", "σ", "mode", "background share %"]) == [
        [r["model"], f"{r['sigma']:g}", r["mode"], pct(r["mean_background_share"])] for r in d["results"]["rows"]]
    assert made_by(text) == "gradients"
    d = res("gradients/spectra.json")
    text = section(md, "Fourier spectra")
    assert one(text, ["corruption", "corruption HF %", "gradient HF % w/o adapt", "gradient HF % with adapt"]) == [
        [r["corruption"], pct(r["perturbation_hf_share"]), pct(r["gradient_hf_share_standard"]),
         pct(r["gradient_hf_share_adapted"])] for r in d["results"]["rows"]]
    assert "images of None" not in md and made_by(text) == "spectra"
    assert f"{d['inputs']['data']['n']} images per corruption and severity of the corrupted set" in text
    # the stream table (a text block)
    d = res("stream/iid.json")
    text = section(md, "Streams")
    lines = [re.split(r"\s{2,}", ln.strip()) for ln in text.split("```")[1].splitlines()]
    methods = d["results"]["methods"]
    for r in d["results"]["rows"]:
        assert [r["model"], str(r["batch_size"])] + [pct_cell(r["methods"][k]) for k in methods] in lines, r
    assert made_by(text) == "stream_iid"
    # this run's stages and the quick protocol's sizes
    man = read_result(out / "reproduce.json")
    sec = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    assert one(section(md, "This run"), ["stage", "status", "stage wall s (when it ran)", "experiment's own s"]) == [
        [s["stage"], s["status"], sec(s["wall_s"]), sec(s["experiment_wall_s"])] for s in man["results"]["stages"]]
    assert one(section(md, "Reduced parameters"), ["stage", "quick", "paper (--full)"]) == [
        [k, json.dumps(v), R.PAPER[k]] for k, v in TINY.items()]


def check_claims(out: Path, md: str) -> None:
    """Each "measured here" value of the claims checklist is the result file's number."""
    res = lambda rel: read_result(out / rel)["results"]  # noqa: E731
    noise = {(r["sigma"], k): r[k]["mean"] for r in res("noise/table1.json")["rows"] for k in ("standard", "adapted")}
    rho = {s["rho"]: s["mean"] for s in res("noise/table4_rho.json")["rows"][0]["settings"]}
    bs = {s["batch_size"]: s["mean"] for s in res("noise/table5_batch.json")["rows"][0]["settings"]}

    def cert(tag):  # certified accuracy at sigma 0.5, radius 0.5, read off the table's radius grid
        r = res(f"certify/tiny.{tag}.json")
        return r["per_sigma"]["0.5"]["certified_accuracy"][r["radii"].index(0.5)]

    att = res("attacks/table2_7.json")["models"][0]
    prm = read_result(out / "attacks/table2_7.json")["inputs"]["params"]
    cor = res("corruptions/tables3_8.json")["rows"][0]["metrics"]
    grads = {(r["sigma"], r["mode"]): r["mean_background_share"] for r in res("gradients/gradient_maps.json")["rows"]}
    f1 = lambda v: f"{100 * v:.1f}"  # noqa: E731
    expect = {
        "Adaptive BN raises": f"tiny: {f1(noise[0.5, 'standard'])}% -> {f1(noise[0.5, 'adapted'])}%",
        "Without a shift": f"tiny: {f1(noise[0.0, 'standard'])} -> {f1(noise[0.0, 'adapted'])}",
        "With batch 512": f"tiny: {f1(rho[0.7])} vs {f1(rho[1.0])}",
        "With rho = 1": f"tiny: {f1(bs[64])} vs {f1(bs[512])} at 512",
        "Adapted adversarially trained models can be certified":
            f"tiny at sigma 0.5, radius 0.5: {f1(cert('noadapt'))}% without -> {f1(cert('adapt'))}% with adaptation",
        "Under the paper's attack": f"tiny: {f1(att['no_adaptation']['attacks']['pgd']['mean'])} -> "
                                    f"{f1(att['adapted']['attacks'][prm['paper_attack']]['mean'])}",
        "Under the strongest attacks": f"tiny: {f1(att['no_adaptation']['worst_case']['mean'])} -> "
                                       f"{f1(att['adapted']['realizable']['mean'])}",
        "The number m of EoT models": "tiny: " + " / ".join(f1(att["adapted"]["attacks"][f"eot-pgd-m{m}"]["mean"])
                                                            for m in TINY["attacks"]["eot_m"]),
        "Adaptive BN improves": f"tiny: {f1(cor['standard']['corrupt']['mean'])} -> "
                                f"{f1(cor['adapted']['corrupt']['mean'])}",
        "Adaptive BN narrows": f"tiny: {f1(cor['standard']['gap']['mean'])} -> {f1(cor['adapted']['gap']['mean'])}",
        "Adaptive BN lowers the relative mCE": f"tiny: {f1(cor['standard']['relative_mce']['mean'])} -> "
                                               f"{f1(cor['adapted']['relative_mce']['mean'])}",
        "Under noise, adaptation moves": f"tiny sigma 0.5: background share {100 * grads[0.5, 'standard']:.0f}% -> "
                                         f"{100 * grads[0.5, 'adapted']:.0f}%",
    }
    rows = one(section(md, "The paper's claims"), ["claim", "paper", "measured here", "verdict",
                                                   "how the verdict is decided"])
    seen = set()
    for claim, _, measured, verdict, _ in rows:
        if verdict == "not measured":
            continue
        key = [k for k in expect if claim.startswith(k)]
        assert len(key) == 1, f"claim without a check: {claim}"
        assert measured.startswith(expect[key[0]]), (claim, measured, expect[key[0]])
        seen.add(key[0])
    assert seen == set(expect), set(expect) - seen


def check_commands(out: Path, tmp: Path, md: str) -> None:
    """Each stage's standalone command (quoted under its table) gives the same inputs and numbers."""
    import shlex

    strip = {"tsv", "cohen_tsvs", "rows_file", "npz", "mean_time_s", "warmup_s", "seconds"}

    def numbers(x):
        if isinstance(x, dict):
            return {k: numbers(v) for k, v in x.items() if k not in strip}
        return [numbers(v) for v in x] if isinstance(x, list) else x

    later = []
    for s in read_result(out / "reproduce.json")["results"]["stages"]:
        d = read_result(s["file"])
        cmds = d["run"]["commands"]
        assert cmds and all(c[0] == "bnadapt" for c in cmds), s["stage"]
        quoted = " then ".join(f"`{' '.join(shlex.quote(a) for a in c)}`" for c in cmds)
        assert f"Made by stage `{s['stage']}` of " in md and f": {quoted}." in md, s["stage"]
        if cmds[0][1] == "reproduce":  # no command of its own: the reproduce call that redoes this stage alone
            (c,) = cmds
            assert c[c.index("--stages") + 1] == "gradients" and c[c.index("--force") + 1] == s["stage"]
            assert c[c.index("--out") + 1] == str(out) and "--quick" in c
            later.append((s, d, c))
            continue
        mine = tmp / s["stage"].replace("/", "_")
        mine.mkdir(parents=True)
        for c in cmds:
            argv = list(c[1:])
            if argv[:2] != ["corruptions", "generate"]:  # same set (reused), own output file
                i = argv.index("--out")
                argv[i + 1] = str(mine / Path(argv[i + 1]).name)
            assert main(argv + ["--quiet"]) == 0, argv
        e = read_result(mine / Path(s["file"]).name)
        assert e["inputs_sha256"] == d["inputs_sha256"], s["stage"]
        assert numbers(e["results"]) == numbers(d["results"]), s["stage"]
    assert {s["stage"] for s, _, _ in later} == {"gradients", "spectra"}
    for s, d, c in later:  # (last: it rewrites the stage's own file; gradients' differs only in --force)
        if s["stage"] != "spectra":
            continue
        assert main(c[1:] + ["--quiet"]) == 0
        e = read_result(s["file"])
        assert e["run"]["created_utc"] != d["run"]["created_utc"], s["stage"]  # it ran again...
        assert e["run"]["stage_inputs_sha256"] == d["run"]["stage_inputs_sha256"]  # ...with the same inputs
        assert numbers(e["results"]) == numbers(d["results"]), s["stage"]


def test_reproduce_report_caching_and_resume(setup, tmp_path):
    out, data, ck = setup
    run = lambda **kw: go(out, data, ck, reference=ck, **kw)  # noqa: E731  the tiny model is its own mCE reference
    first = run()
    assert {s["status"] for s in first} == {"ran"}
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for heading in ("The paper's claims, measured here", "Table 1", "Table 4", "Table 5", "Certification",
                    "Adversarial attacks on the adapted model (Tables 2 and 7)", "Batch poisoning",
                    "Common corruptions (Tables 3 and 8)", "Fourier spectra", "Loss gradients", "Streams",
                    "Reduced parameters of the quick protocol"):
        assert heading in md, heading
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(figures) >= 10
    for f in figures:  # every figure referenced is a non-empty PNG
        data_ = (out / f).read_bytes()
        assert data_.startswith(PNG) and len(data_) > 1000, f
    assert html.count("data:image/png;base64,") == len(figures)  # every figure embedded
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # no external request
    # every table's numbers come from the result files, and so do the claims'
    check_tables(out, md)
    check_claims(out, md)
    # stage hashes: for these stages the result's own inputs hash
    for s in first:
        d = read_result(s["file"])
        if s["group"] in ("noise", "certify") or s["stage"] == "gradients":
            assert d["run"]["stage_inputs_sha256"] == d["inputs_sha256"], s["stage"]
        # the stage's wall time covers the whole stage; the experiment's own timer is kept beside it
        assert s["wall_s"] == round(d["run"]["stage_wall_s"], 1)
        assert s["experiment_wall_s"] == round(d["run"]["wall_s"], 1)
        assert d["run"]["stage_wall_s"] >= d["run"]["wall_s"]
    # saturate on gray images is the clean image at every severity, and Table 8 says so beside its row
    (cache,) = (out / "corrupted").iterdir()
    from bnadapt.corruptions.evaluate import clean_set
    from bnadapt.data.corrupted import open_corrupted

    cset = open_corrupted("cifar10-c", cache)
    clean_ds, clean_idx, _ = clean_set(cset)
    clean_x = clean_ds.get(clean_idx)[0]
    for sev in range(1, 6):
        assert bool((cset.dataset("saturate", sev).get(np.arange(cset.n))[0] == clean_x).all()), sev
    t8 = section(md, "Per corruption (Table 8 layout)")
    assert [r for r in rows_of(t8) if r[1] == "saturate (no-op on gray images: = clean)"]
    assert "Note: saturate changes nothing on gray images" in t8
    from bnadapt.report import corruption_blocks

    d = read_result(out / "corruptions/tables3_8.json")
    d["inputs"]["data"]["set"]["image_shape"][0] = 3  # the same result, as if the images were RGB: no note
    text = " ".join(b.text + json.dumps(b.rows) for b in corruption_blocks({"corruption_eval": [(out, d)]}, tmp_path))
    assert "no-op" not in text and '"saturate"' in text
    # a second run reuses every stage and changes no file
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "reproduce.json"}
    again = run(report=False)
    assert {s["status"] for s in again} == {"cached"}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [s["wall_s"] for s in again] == [s["wall_s"] for s in first]  # a cached stage keeps its measured time
    # --force redoes one group (or one stage) only
    forced = run(force=["gradients"], report=False)
    assert {s["stage"] for s in forced if s["status"] == "ran"} == {"gradients", "spectra"}
    forced = run(force=["sweep_rho"], report=False)
    assert {s["stage"] for s in forced if s["status"] == "ran"} == {"sweep_rho"}
    # a reference table beside the set made from fewer corruptions is measured again (mCE stays defined)
    from bnadapt.corruptions.evaluate import reference_table
    from bnadapt.models import load_model

    d = read_result(out / "corruptions/tables3_8.json")
    assert set(d["results"]["reference"]["errors"]) == set(cset.available)
    assert d["results"]["rows"][0]["metrics"]["standard"]["mce"]["mean"] == pytest.approx(1.0)  # its own reference
    (ref_file,) = cache.glob("reference-*.json")
    full = read_result(ref_file)["results"]
    reference_table(load_model(ck), cset, clean=clean_set(cset), corruptions=["gaussian_noise", "fog"],
                    batch_size=6).write(ref_file)
    assert refresh_reference(cset, ck, batch_size=6) == ref_file  # what the corruption stage does first
    assert read_result(ref_file)["results"] == full  # measured again on every corruption: the same numbers
    stamp = ref_file.stat().st_mtime_ns
    refresh_reference(cset, ck, batch_size=6)
    assert ref_file.stat().st_mtime_ns == stamp  # a complete one is kept
    # each table's standalone command gives the same result
    check_commands(out, tmp_path / "standalone", md)


def test_report_names_what_a_short_reference_lacks(setup):
    from bnadapt.report import corruption_blocks, reference_gaps

    def result(errors, stage=None):
        return {"inputs": {"params": {"corruptions": ["gaussian_noise", "fog", "saturate"]}, "data": {}},
                "results": {"reference": {"name": "baseline", "kind": "model", "source": "reference-baseline-ab.json",
                                          "errors": errors}},
                "run": {"stage": stage} if stage else {}}

    assert reference_gaps(result({"gaussian_noise": 0.5, "fog": 0.4, "saturate": 0.3})) == []
    (line,) = reference_gaps(result({"gaussian_noise": 0.5}, stage="corruptions"))
    assert "lacks 2 of the evaluated corruptions (fog, saturate)" in line and "mCE and relative mCE are n/a" in line
    assert "bnadapt reproduce --force corruptions" in line and "reference-baseline-ab.json" in line
    (line,) = reference_gaps(result({"gaussian_noise": 0.5, "fog": 0.4}))
    assert "(saturate)" in line and "delete that reference file" in line
    assert reference_gaps({"inputs": {"params": {"corruptions": ["fog"]}}, "results": {"reference": None}}) == []
    assert callable(corruption_blocks)


def test_saturate_is_a_no_op_on_gray_images():
    """The fact behind Table 8's saturate note (docs/corruptions.md): every gray intensity, every severity."""
    from bnadapt.corruptions.generate import corrupt_image
    from bnadapt.corruptions.names import require_library

    lib = require_library()
    gray = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    for sev in range(1, 6):
        assert np.array_equal(corrupt_image(lib, gray, "saturate", sev, 0), gray), sev
    color = np.stack([gray, gray[::-1], gray.T], axis=-1)
    assert not np.array_equal(corrupt_image(lib, color, "saturate", 5, 0), color)  # a real corruption in colour


def test_stage_wall_time_is_the_whole_stage(setup, monkeypatch):
    """The manifest and the report give the stage's whole wall time (e.g. generating a corrupted set
    before the experiment's own timer starts), with the experiment's own time beside it."""
    out, data, ck = setup
    inputs = make_inputs(params={"x": 1})

    def slow():
        time.sleep(1.3)  # work the experiment's own timer does not see
        return Result("slow_experiment", inputs, {"rows": []}, wall_s=0.2)

    stage = R.Stage("slow", "noise", out / "slow.json", lambda: inputs, slow)
    monkeypatch.setattr(R, "plan", lambda *a, **k: [stage])
    (st,) = go(out, data, ck, stages=["noise"])
    assert st["status"] == "ran" and st["wall_s"] >= 1.3 and st.get("experiment_wall_s") == 0.2
    run = read_result(out / "slow.json")["run"]
    assert run.get("stage_wall_s", 0) >= 1.3 and run["wall_s"] == 0.2 and run.get("stage") == "slow"
    assert f"| slow | ran | {st['wall_s']:.0f} | 0 |" in (out / "report.md").read_text()
    (st2,) = go(out, data, ck, stages=["noise"])
    assert st2["status"] == "cached" and st2["wall_s"] == st["wall_s"] and st2["experiment_wall_s"] == 0.2


def _hashes(ck, data, **kw) -> dict[str, str]:
    from bnadapt.models import load_model

    stages = R.plan([load_model(ck)], data, Path("out"), "quick", device="cpu", reference=kw.pop("reference", "none"),
                    **kw)
    return {st.name: inputs_sha256(st.inputs()) for st in stages}


SECTION_STAGES = {"noise": {"noise"}, "sweep": {"sweep_rho", "sweep_batch-size"},
                  "certify": {"certify/tiny/adapt", "certify/tiny/noadapt"}, "gradients": {"gradients"},
                  "attacks": {"attacks"}, "poison": {"poison"}, "corruptions": {"corruptions"},
                  "spectra": {"spectra"}, "stream": {"stream_iid"}}
CHANGES = [  # (section, key, new value, stages whose result it changes when not those of the section)
    ("noise", "images", 20, None), ("noise", "runs", 3, None), ("noise", "batch_size", 6, None),
    ("noise", "sigmas", [0.0, 0.25], None),
    ("sweep", "images", 20, None), ("sweep", "runs", 2, None), ("sweep", "sigma", 0.25, None),
    ("sweep", "batch_size", 6, None),
    ("certify", "images", 2, None), ("certify", "per_class", 2, None), ("certify", "n0", 4, None),
    ("certify", "n", 32, None), ("certify", "alpha", 0.01, None), ("certify", "sigmas", [0.25], None),
    ("certify", "calib_n", 8, {"certify/tiny/adapt"}), ("certify", "compile", True, None),
    ("gradients", "images", 1, None), ("gradients", "sigmas", [0.0], None), ("gradients", "batch_size", 6, None),
    ("attacks", "images", 3, None), ("attacks", "per_class", 3, None), ("attacks", "batch_size", 3, None),
    ("attacks", "steps", 1, None), ("attacks", "runs", 2, None), ("attacks", "eot_m", [1], None),
    ("poison", "images", 8, None), ("poison", "qs", [0.5], None), ("poison", "rhos", [0.5], None),
    ("poison", "batch_sizes", [4], None), ("poison", "steps", 1, None), ("poison", "runs", 2, None),
    ("poison", "trusted", 4, set()),  # the tiny data has no train split: no trusted images either way
    ("corruptions", "images", 5, {"corruptions", "spectra"}),  # the spectra are of the same corrupted set
    ("corruptions", "runs", 2, None), ("corruptions", "batch_size", 3, None),
    ("corruptions", "workers", 1, set()),  # the bytes do not depend on the worker count
    ("spectra", "images", 3, None), ("spectra", "severity", 2, None), ("spectra", "batch_size", 2, None),
    ("spectra", "corruptions", ["fog"], None),
    ("stream", "images", 10, None), ("stream", "runs", 2, None), ("stream", "batch_sizes", [2], None),
    ("stream", "sigma", 0.25, None),
]


def test_every_parameter_that_changes_a_result_changes_its_stage_hash(setup, monkeypatch, tmp_path):
    out, data, ck = setup
    base = _hashes(ck, data)
    assert set(base) == set().union(*SECTION_STAGES.values())
    assert {k for sec_, k, _, _ in CHANGES if sec_} >= {k for v in TINY.values() for k in v} - {"scenarios"}
    for sec_, key, value, stages in CHANGES:
        monkeypatch.setitem(R.PROTOCOLS, "quick", {**TINY, sec_: {**TINY[sec_], key: value}})
        now = _hashes(ck, data)
        changed = {s for s in base if now[s] != base[s]}
        assert changed == (SECTION_STAGES[sec_] if stages is None else stages), (sec_, key, changed)
    monkeypatch.setitem(R.PROTOCOLS, "quick", TINY)
    assert {s for s, h in _hashes(ck, data, seed=1).items() if h != base[s]} == set(base)
    # the generation of the corrupted set: its protocol and the library's version change both its users
    import bnadapt.corruptions.generate as gen

    for attr, value in (("PROTOCOL", gen.PROTOCOL + " (changed)"), ("library_version", lambda: "9.9.9")):
        with monkeypatch.context() as mp:
            mp.setattr(gen, attr, value)
            assert {s for s, h in _hashes(ck, data).items() if h != base[s]} == {"corruptions", "spectra"}, attr
    # the mCE reference: its spec, the weights of a reference model, the content of a reference file
    with_model = _hashes(ck, data, reference=ck)
    assert {s for s, h in with_model.items() if h != base[s]} == {"corruptions"}
    from bnadapt.models import load_model, save_checkpoint

    m = load_model(ck)
    for p in m.model.parameters():
        p.data.mul_(1.01)
    other = save_checkpoint(tmp_path / "retrained" / "m.safetensors", m.model, m.card)
    ref_other = _hashes(ck, data, reference=str(other))
    assert ref_other["corruptions"] != with_model["corruptions"] and ref_other["spectra"] == base["spectra"]
    ref_json = tmp_path / "ref.json"
    ref_json.write_text("{}")
    a = _hashes(ck, data, reference=str(ref_json))["corruptions"]
    ref_json.write_text('{"x": 1}')
    assert _hashes(ck, data, reference=str(ref_json))["corruptions"] != a
    # the data: another content of the same file name changes every stage
    x = np.load(data)
    np.savez(data, x=255 - x["x"], y=x["y"])
    assert {s for s, h in _hashes(ck, data).items() if h != base[s]} == set(base)


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


def test_partial_runs_keep_the_other_stages_in_the_report(setup, monkeypatch):
    out, data, ck = setup
    go(out, data, ck, stages=["noise"])
    go(out, data, ck, stages=["gradients"])
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "Loss gradients" in md  # the second partial run kept the first one's stage
    man = {s["stage"] for s in read_result(out / "reproduce.json")["results"]["stages"]}
    assert {"noise", "sweep_rho", "gradients", "spectra"} <= man
    # a changed generation of the corrupted set reruns the spectra of it (in a new set folder), nothing else
    import bnadapt.corruptions.generate as gen

    monkeypatch.setattr(gen, "PROTOCOL", gen.PROTOCOL + " (changed)")
    statuses = {s["stage"]: s["status"] for s in go(out, data, ck, stages=["gradients"]) if s["group"] == "gradients"}
    assert statuses == {"spectra": "ran", "gradients": "cached"}
    assert len(list((out / "corrupted").iterdir())) == 2


def test_report_finds_the_stages_from_any_working_directory(setup, monkeypatch, tmp_path):
    """A manifest written with a relative --out records cwd-relative stage files; the report (and a later
    partial run) must find them from any working directory and after the folder is moved."""
    import shutil

    from bnadapt.report import build_report

    _, data, ck = setup
    run_dir = tmp_path / "proj"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    go(Path("results"), data, ck, stages=["noise"])
    assert not Path(read_result(run_dir / "results" / "reproduce.json")["results"]["stages"][0]["file"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    md = build_report(run_dir / "results")["md"].read_text()
    assert "Table 1" in md
    moved = tmp_path / "moved"
    shutil.move(str(run_dir / "results"), moved)
    assert "Table 1" in build_report(moved)["md"].read_text()
    monkeypatch.chdir(tmp_path)  # a partial run in the moved folder keeps the noise stages it finds there
    go(moved, data, ck, stages=["gradients"])
    man = {s["stage"] for s in read_result(moved / "reproduce.json")["results"]["stages"]}
    assert {"noise", "gradients"} <= man
