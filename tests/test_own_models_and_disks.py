"""A user's own models and disks: TorchScript models attacked as fixed models, outputs that cannot be
written, pickles that ``weights_only`` refuses, and settings that run but deserve a word."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

from bnadapt.models import load_model
from bnadapt.results import read_result

from tests.conftest import make_tiny_files, run_cli

ATTACK = ["--images", "12", "--steps", "3", "--restarts", "1", "--runs", "1", "--batch-size", "6",
          "--threat", "linf", "--eps", "0.5", "--quiet"]


def one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def _robust(path) -> dict:
    m = read_result(path)["results"]["models"][0]
    return {"clean": m["clean"]["no_adaptation"]["mean"], "worst": m["no_adaptation"]["worst_case"]["mean"],
            **{a: c["mean"] for a, c in m["no_adaptation"]["attacks"].items()}}


def test_torchscript_models_are_attacked_as_fixed_models(tmp_path, capsys):
    tmp, data, ck = make_tiny_files(tmp_path, 24)
    eager = load_model(ck).model
    traced, scripted = tmp / "traced.pt", tmp / "scripted.pt"
    torch.jit.save(torch.jit.trace(eager, torch.rand(2, 1, 12, 12)), str(traced))
    torch.jit.save(torch.jit.script(eager), str(scripted))
    code, _, err = run_cli(capsys, "attack", "--model", ck, "--data", data, "--attacks", "none", *ATTACK,
                           "--out", str(tmp / "eager.json"))
    assert code == 0, err
    want = _robust(tmp / "eager.json")
    assert want["pgd"] < want["clean"] or want["clean"] == 0
    for ts in (traced, scripted):
        before = {k: v.clone() for k, v in torch.jit.load(str(ts)).state_dict().items()}
        out = tmp / f"{ts.stem}.json"
        code, _, err = run_cli(capsys, "attack", "--model", str(ts), "--data", data, "--attacks", "none", *ATTACK,
                               "--out", str(out))
        assert code == 0, err
        # the same attack on the same weights: the same numbers as the eager model's
        assert _robust(out) == want, ts
        after = torch.jit.load(str(ts)).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # with adaptation it needs the eager model, and the error says how to attack it without
    code, _, err = run_cli(capsys, "attack", "--model", str(traced), "--data", data, *ATTACK,
                           "--out", str(tmp / "ad.json"))
    one_line_error(code, err, "TorchScript", "--attacks none")
    assert not (tmp / "ad.json").exists()


def test_copy_model_keeps_leaf_parameters_of_a_torchscript_module():
    from bnadapt.runs import copy_model

    m = torch.jit.trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval(), torch.rand(2, 1, 5, 5))
    c = copy_model(m)
    assert all(p.is_leaf and p.requires_grad for p in c.parameters())
    for p in c.parameters():
        p.requires_grad_(False)  # what an attack does; a deepcopy made this raise
    assert all(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------- outputs that cannot be written
NOISE = ["noise", "--model", "zoo:baseline", "--images", "20", "--runs", "1", "--sigmas", "0", "--batch-size", "10",
         "--quiet"]


@pytest.fixture
def mount(tmp_path):
    """``mount(name, *options)``: a tiny tmpfs at ``tmp_path/name`` (skips where mounting is not allowed)."""
    mounted = []

    def make(name, *options):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(d)],
                           capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


def _fill(folder):
    try:
        with open(folder / "fill", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError:
        pass


def test_outputs_on_a_read_only_or_full_disk_are_one_line_errors_before_work(mount, capsys):
    ro, full = mount("ro", "ro"), mount("full")
    _fill(full)
    cases = [
        (ro / "n.json", NOISE, "read-only"),
        (ro / "deeper" / "n.json", NOISE, "read-only"),
        (full / "n.json", NOISE, "no space"),
        (full / "c.tsv", ["certify", "--model", "zoo:baseline", "--images", "2", "--samples", "32", "--n0", "8",
                          "--quiet"], "no space"),
        (ro / "sets", ["corruptions", "generate", "--images", "12", "--corruptions", "gaussian_noise", "--quiet"],
         "read-only"),
    ]
    for out, argv, cause in cases:
        code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
        one_line_error(code, err, str(out.parent if out.name == "sets" else out), cause)
        assert stdout == "", (out, stdout)  # refused before any work (nothing printed)
    assert sorted(p.name for p in full.iterdir()) == ["fill"] and list(ro.iterdir()) == []


def test_a_disk_that_fills_during_the_work_is_a_one_line_error_and_leaves_nothing(mount, capsys, monkeypatch):
    import bnadapt.results as results

    full = mount("full")
    _fill(full)
    monkeypatch.setattr(results, "probe_write", lambda *a, **k: None)  # the disk filled after the check
    code, _, err = run_cli(capsys, *NOISE, "--out", str(full / "n.json"))
    one_line_error(code, err, str(full / "n.json"), "no space")
    assert sorted(p.name for p in full.iterdir()) == ["fill"]


def test_a_folder_that_refuses_files_is_a_one_line_error(capsys):
    code, stdout, err = run_cli(capsys, *NOISE, "--out", "/proc/n.json")
    one_line_error(code, err, "/proc/n.json", "does not take new files")
    assert stdout == ""


def test_atomic_write_maps_file_system_errors_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno
    import os

    from bnadapt.errors import BnadaptError
    from bnadapt.results import atomic_write_bytes

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BnadaptError, match="no space left"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- settings that deserve a word
def test_certify_with_fewer_samples_than_n0_warns_in_the_result(tmp_path, capsys):
    tmp, data, ck = make_tiny_files(tmp_path, 6)
    argv = ["certify", "--model", ck, "--data", data, "--images", "2", "--sigmas", "0.5", "--sample-batch", "16",
            "--no-compile", "--quiet"]
    code, out, err = run_cli(capsys, *argv, "--samples", "8", "--n0", "16", "--out", str(tmp / "w.tsv"))
    assert code == 0, err
    warnings = read_result(tmp / "w.json")["results"]["warnings"]
    assert len(warnings) == 1 and "--samples 8 is smaller than --n0 16" in warnings[0]
    assert "WARNING: --samples 8" in out
    code, out, err = run_cli(capsys, *argv, "--samples", "32", "--n0", "8", "--out", str(tmp / "ok.tsv"))
    assert code == 0 and read_result(tmp / "ok.json")["results"]["warnings"] == [] and "WARNING" not in out


def _checks(path) -> dict:
    return {c["check"]: c for c in read_result(path)["results"]["checks"]}


def test_attack_warns_when_eps_spans_the_pixel_box(tmp_path, capsys):
    tmp, data, ck = make_tiny_files(tmp_path, 12)
    base = ["attack", "--model", ck, "--data", data, "--attacks", "none", "--images", "12", "--steps", "1",
            "--restarts", "1", "--runs", "1", "--batch-size", "6", "--no-adapt-attacks", "pgd"]
    for threat, eps, warns in (("linf", "1", True), ("linf", "0.3", False), ("l2", "12", True), ("l2", "11.9", False)):
        out = tmp / f"{threat}{eps}.json"
        code, stdout, err = run_cli(capsys, *base, "--threat", threat, "--eps", eps, "--out", str(out))
        assert code == 0, err
        assert _checks(out)["eps_covers_box"]["warning"] is warns, (threat, eps)
        assert ("WARNING [eps_covers_box" in stdout) is warns


class SoftmaxOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(-1)


def test_attack_warns_on_a_model_that_returns_probabilities(tmp_path, capsys):
    from bnadapt.attacks.checks import looks_like_probabilities

    logits = torch.randn(8, 3) * 3
    assert looks_like_probabilities(logits.softmax(-1)) and not looks_like_probabilities(logits)
    assert not looks_like_probabilities(logits.log_softmax(-1))
    tmp, data, ck = make_tiny_files(tmp_path, 12)
    prob = tmp / "prob.pt"
    torch.jit.save(torch.jit.trace(SoftmaxOut(load_model(ck).model).eval(), torch.rand(2, 1, 12, 12)), str(prob))
    base = ["attack", "--data", data, "--attacks", "none", "--no-adapt-attacks", "pgd", *ATTACK]
    for model, warns in ((prob, True), (ck, False)):
        out = tmp / f"{warns}.json"
        code, stdout, err = run_cli(capsys, *base, "--model", str(model), "--out", str(out))
        assert code == 0, err
        assert _checks(out)["probability_outputs"]["warning"] is warns
        assert ("WARNING [probability_outputs" in stdout) is warns
