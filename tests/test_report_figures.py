"""Each result in a report draws its own figure: two results of one kind never share a file."""

from __future__ import annotations

import re

from bnadapt.report import build_report

from tests.conftest import make_tiny_files, run_cli


def test_two_certify_runs_of_one_model_draw_two_figures(tmp_path, capsys):
    tmp, data, ck = make_tiny_files(tmp_path, 6)
    runs = tmp / "runs"
    base = ["certify", "--model", ck, "--data", data, "--images", "2", "--samples", "32", "--n0", "8",
            "--sample-batch", "16", "--no-compile", "--quiet"]
    for name, sigmas in (("one", "0.5"), ("three", "0.25,0.5,1")):
        code, _, err = run_cli(capsys, *base, "--sigmas", sigmas, "--out", str(runs / f"{name}.tsv"))
        assert code == 0, err
    md = build_report(runs)["md"].read_text()
    figs = re.findall(r"!\[Fig\. 3 layout[^\]]*\]\(([^)]+)\)", md)
    assert len(figs) == 2 and len(set(figs)) == 2, figs
    assert all((runs / f).is_file() for f in figs)


def test_standalone_commands_name_zoo_models_as_zoo_specs(tmp_path):
    from bnadapt.models import load_model
    from bnadapt.models.checkpoint import ZOO_DIR
    from bnadapt.stages import plan

    models = [load_model("zoo:baseline"), load_model("zoo:adv-linf-0.1")]
    stages = plan(models, "fashion-mnist", tmp_path, "quick", device="cpu")
    cmds = [c for s in stages if s.commands for c in s.commands()]
    assert cmds
    words = [w for c in cmds for w in c]
    assert not any(str(ZOO_DIR) in w for w in words)
    assert "zoo:baseline" in words and "zoo:adv-linf-0.1" in words
