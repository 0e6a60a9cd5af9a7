"""A user's own models and disks: TorchScript models attacked as fixed models, outputs that cannot be
written, pickles that ``weights_only`` refuses, and settings that run but deserve a word."""

from __future__ import annotations

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
