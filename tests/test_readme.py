"""Every example in the README runs as written, in a fresh folder (so `results/` does not
exist yet), with only its sizes made smaller: flags appended after the README's own (argparse keeps the
last), never other options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

import bnadapt.reproduce as R
from bnadapt.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

SMALLER = {
    "noise": ["--images", "40", "--runs", "1", "--sigmas", "0,0.5", "--quiet"],
    "sweep": ["--images", "40", "--runs", "1", "--values", "0.5,1", "--quiet"],
    "certify": ["--images", "2", "--per-class", "1", "--samples", "64", "--n0", "8", "--calib-n", "32", "--no-compile",
                "--quiet"],
    "stream": ["--images", "40", "--batch-sizes", "1,8", "--estimator", "ema", "--quiet"],
    "adapt": ["--images", "64"],
    "attack": ["--images", "8", "--batch-size", "8", "--steps", "2", "--eot-m", "1", "--quiet"],
    "poison": ["--images", "16", "--batch-sizes", "8", "--steps", "2", "--qs", "0.25", "--trusted", "16", "--quiet"],
    "corruptions": ["--quiet"],
    "reproduce": ["--quiet"],
}
TINY = {
    "noise": {"images": 40, "runs": 1, "batch_size": 16, "sigmas": [0.0, 0.5]},
    "sweep": {"images": 40, "runs": 1, "sigma": 0.5, "batch_size": 16},
    "certify": {"images": 2, "per_class": 1, "n0": 8, "n": 64, "alpha": 0.05, "sigmas": [0.5], "calib_n": 16,
                "compile": False},
    "gradients": {"images": 1, "sigmas": [0.0], "batch_size": 8},
    "attacks": {"images": 6, "per_class": 2, "batch_size": 6, "steps": 2, "runs": 1, "eot_m": [1]},
    "poison": {"images": 6, "qs": [0.25], "rhos": [1.0], "batch_sizes": [6], "steps": 2, "runs": 1, "trusted": 8},
    "corruptions": {"images": 4, "runs": 1, "batch_size": 4, "workers": 0},
    "spectra": {"images": 2, "severity": 3, "batch_size": 2, "corruptions": ["fog"]},
    "stream": {"images": 8, "runs": 1, "batch_sizes": [1], "sigma": 0.5, "scenarios": ["iid"]},
}


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [l.strip() for b in blocks for l in b.replace("\\\n", " ").splitlines()]
    return [l for l in lines if l.startswith("bnadapt ")]


def test_readme_has_examples():
    cmds = commands()
    assert len(cmds) >= 8 and {c.split()[1] for c in cmds} >= {"noise", "certify", "stream", "adapt", "reproduce"}


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(R.PROTOCOLS, "quick", TINY)
    threads = torch.get_num_threads()
    try:
        for cmd in commands():
            argv = shlex.split(cmd)[1:]
            extra = SMALLER.get(argv[0], [])
            if argv[:2] == ["corruptions", "generate"]:
                extra = ["--images", "4", "--corruptions", "fog,gaussian_noise", "--workers", "0", "--quiet"]
            if argv[:2] == ["corruptions", "evaluate"]:
                extra = ["--images", "4", "--batch-size", "4", "--reference", "none", "--quiet"]
            if argv[0] == "stream" and "--corrupted" in argv:  # the set generated above holds 4 images
                extra = ["--images", "4", "--estimator", "ema", "--quiet"]
            code = main(argv + extra)
            out, err = capsys.readouterr()
            assert code == 0, f"{cmd}\n{err}"
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "results" / "fig1.png").is_file() and (tmp_path / "results" / "mine" / "report.html").is_file()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert code
    for block in code:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
