"""``bnadapt stream`` and ``bnadapt adapt --stream``: result files, tables, plot, bad input."""

import json

import pytest
import torch

from bnadapt.results import read_result

from tests.conftest import TINY_ARCH_ARGS, make_tiny_files
from tests.conftest import bad_cli as bad, run_cli as run


@pytest.fixture
def files(tmp_path):
    return make_tiny_files(tmp_path, 40, warm_bn=True)


def test_stream_command_writes_result_table_and_plot(files, capsys):
    tmp, data, ck = files
    out, png = tmp / "s.json", tmp / "s.png"
    code, stdout, err = run(capsys, "stream", "--model", ck, "--data", data, "--batch-sizes", "1,4", "--runs", "2",
                            "--window", "16", "--momentum", "0.1", "--scenario", "gradual", "--sigma", "0.5",
                            "--quiet", "--device", "cpu", "--threads", "1", "--out", str(out), "--plot", str(png))
    assert code == 0, err
    assert "n/a" in stdout and "ema m=0.1" in stdout and "L=40" in stdout
    res = read_result(out, "stream")
    rows = res["results"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert rows[0]["methods"]["per-batch"] is None  # batch 1: per-batch adaptation cannot run, reported as n/a
    for r in rows:
        for k in ("standard", "ema", "window", "prior"):
            c = r["methods"][k]
            assert len(c["runs"]) == 2 and 0 <= c["mean"] <= 1 and len(c["curve"]) == len(res["results"]["bin_edges"]) - 1
            assert c["prefix"][-1]["mean"] == pytest.approx(c["mean"])
    assert rows[0]["methods"]["standard"] == rows[1]["methods"]["standard"]  # independent of the batch size
    p = res["inputs"]["params"]
    assert p["stream"]["scenario"] == "gradual" and p["stream"]["length"] == 40 and p["window"] == 16
    assert res["results"]["sigma_curve"][0] < res["results"]["sigma_curve"][-1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command gives the same numbers (seeded streams and noise)
    code, _, _ = run(capsys, "stream", "--model", ck, "--data", data, "--batch-sizes", "1,4", "--runs", "2",
                     "--window", "16", "--momentum", "0.1", "--scenario", "gradual", "--sigma", "0.5", "--quiet",
                     "--device", "cpu", "--out", str(tmp / "again.json"))
    assert read_result(tmp / "again.json")["results"]["rows"] == rows


def test_bad_input_exit_2_one_line_no_result(files, capsys, monkeypatch):
    tmp, data, ck = files
    base = ["stream", "--model", ck, "--data", data, "--quiet"]
    assert "--momentum" in bad(capsys, tmp, *base, "--momentum", "0")
    assert "--momentum" in bad(capsys, tmp, *base, "--momentum", "1.5")
    assert "--window" in bad(capsys, tmp, *base, "--window", "1")
    assert "--prior-n" in bad(capsys, tmp, *base, "--prior-n", "-1")
    assert "--estimator" in bad(capsys, tmp, *base, "--estimator", "ema,kalman")
    assert "--scenario" in bad(capsys, tmp, *base, "--scenario", "zigzag")
    assert "--robust" in bad(capsys, tmp, *base, "--robust", "mode")
    assert "--batch-sizes" in bad(capsys, tmp, *base, "--batch-sizes", "0,4")
    assert "--reset-every" in bad(capsys, tmp, *base, "--reset-every", "0")
    assert "--stream-length" in bad(capsys, tmp, *base, "--stream-length", "0")
    # a label-needing scenario on data without labels
    from bnadapt.cli import options

    real = options.selection

    def unlabeled(args, **kw):
        sel = real(args, **kw)
        sel.dataset.has_labels = False
        return sel

    monkeypatch.setattr(options, "selection", unlabeled)
    assert "labels" in bad(capsys, tmp, *base, "--scenario", "class-sorted")
    assert "labels" in bad(capsys, tmp, *base, "--scenario", "iid")  # online accuracy itself needs labels


def test_adapt_stream_writes_an_ordinary_checkpoint(files, capsys):
    tmp, data, ck = files
    a, b = tmp / "pooled.safetensors", tmp / "window.safetensors"
    assert run(capsys, "adapt", "--model", ck, "--data", data, "--sigma", "0.5", "--batch-size", "40", "--out", str(a))[0] == 0
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--sigma", "0.5", "--batch-size", "40", "--stream",
                       "--estimator", "window", "--window", "64", "--out", str(b))
    assert code == 0, err
    from safetensors.torch import load_file

    from bnadapt.models import PreActResNet

    nets = []
    for p in (a, b):
        net = PreActResNet(**TINY_ARCH_ARGS)
        net.load_state_dict(load_file(str(p)))
        nets.append(net.eval())
    x = torch.rand(6, 1, 12, 12)
    with torch.no_grad():  # a window holding the one batch == adapt-then-freeze on it (same images, same noise)
        assert torch.allclose(nets[0](x), nets[1](x), atol=1e-5)
    card = json.loads(b.with_suffix(".json").read_text())["adaptation"]
    assert card["estimator"] == "window" and card["window"] == 64 and card["sigma"] == 0.5
    # single images through an ema: a different, valid checkpoint
    c = tmp / "ema.safetensors"
    assert run(capsys, "adapt", "--model", ck, "--data", data, "--sigma", "0.5", "--batch-size", "1", "--stream",
               "--momentum", "0.05", "--out", str(c))[0] == 0
    out = tmp / "x.safetensors"
    for argv in (["--momentum", "0.1"], ["--stream", "--estimator", "prior"], ["--stream", "--window", "1"],
                 ["--batch-size", "1"]):
        code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, *argv, "--out", str(out))
        assert code == 2 and err.count("\n") == 1 and not out.exists(), (argv, err)
