"""The one result format: what every result file holds, and how foreign, old-format or damaged
files are refused (one line, exit code 2 from the command line)."""

from __future__ import annotations

import json

import pytest

from bnadapt.cli import main
from bnadapt.errors import BnadaptError
from bnadapt.results import FORMAT, read_result, write_result

# What bnadapt 0.1 wrote for `bnadapt noise --out` (the printed table stored as a string, no format key).
OLD_NOISE = {"command": "noise", "model": "zoo:adv-l2-1.5", "sha256": "ab" * 32, "data": "fashion-mnist",
             "seed": 0, "params": {"sigmas": [0.5], "runs": 1}, "table": "model  sigma=0.5\nadv-l2-1.5  80.2"}


def test_round_trip_and_inputs_hash(tmp_path):
    p = write_result(tmp_path / "r.json", "noise_table", {"params": {"a": 1}, "seed": 0}, {"rows": [1, 2]}, wall_s=1.5)
    d = read_result(p, "noise_table")
    assert d["format"] == FORMAT and d["experiment"] == "noise_table" and d["results"] == {"rows": [1, 2]}
    assert d["inputs"]["params"] == {"a": 1} and len(d["inputs_sha256"]) == 64 and d["run"]["wall_s"] == 1.5
    q = write_result(tmp_path / "q.json", "noise_table", {"params": {"a": 2}, "seed": 0}, {"rows": [1, 2]})
    assert read_result(q)["inputs_sha256"] != d["inputs_sha256"]


@pytest.mark.parametrize("content,word", [
    (json.dumps(OLD_NOISE), "not a bnadapt result file"),
    (json.dumps([1, 2, 3]), "not a bnadapt result file"),
    (json.dumps({"format": "robustbench/1", "clean_acc": "84.0"}), "not a bnadapt result file"),
    ("{not json", "not a readable JSON result file"),
    (json.dumps({"format": FORMAT, "experiment": "noise_table"}), "lacks its 'inputs' entry"),
])
def test_foreign_old_or_damaged_files_are_refused(tmp_path, content, word):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(BnadaptError, match=word):
        read_result(p)


def test_another_experiment_is_refused(tmp_path):
    p = write_result(tmp_path / "r.json", "sweep_rho", {"params": {}}, {"rows": []})
    with pytest.raises(BnadaptError, match="holds a 'sweep_rho' result, not 'noise_table'"):
        read_result(p, "noise_table")


def test_commands_refuse_an_old_file_in_one_line(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(OLD_NOISE))
    for argv in (["plot-certified", str(old), "--out", str(tmp_path / "f.png")],
                 ["corruptions", "table", str(old)]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert "not a bnadapt result file" in err
    assert not (tmp_path / "f.png").exists()
