import json

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt.models import PreActResNet
from bnadapt.results import inputs_sha256, read_result

from tests.conftest import TINY_ARCH_ARGS as ARCH_ARGS, make_tiny_files
from tests.conftest import bad_cli as bad, run_cli as run


@pytest.fixture
def files(tmp_path):
    return make_tiny_files(tmp_path, 40, warm_bn=True)


def test_noise_command_writes_result(files, capsys):
    tmp, data, ck = files
    out = tmp / "r.json"
    code, stdout, _ = run(capsys, "noise", "--model", ck, "--data", data, "--runs", "2", "--batch-size", "16",
                          "--sigmas", "0,0.5", "--out", str(out))
    assert code == 0 and "adaptive BN" in stdout
    res = read_result(out, "noise_table")
    inp = res["inputs"]
    assert inp["models"][0]["sha256"] and inp["models"][0]["tensors_sha256"] and inp["params"]["sigmas"] == [0.0, 0.5]
    assert inp["data"]["n"] == 40 and inp["data"]["content_sha256"] and "torch" in res["versions"]
    assert inp["device"] == "cpu" and inp["precision"] == "fp32" and res["inputs_sha256"] == inputs_sha256(inp)
    assert res["run"]["threads"] >= 1 and res["run"]["wall_s"] >= 0
    for row in res["results"]["rows"]:
        assert len(row["adapted"]["runs"]) == 2 and 0 <= row["standard"]["mean"] <= 1
    assert "table" not in res and not any(isinstance(v, str) and "\n" in v for v in res["results"].values())


def test_sweeps(files, capsys):
    tmp, data, ck = files
    code, stdout, _ = run(capsys, "sweep", "rho", "--model", ck, "--data", data, "--runs", "1", "--values", "0,1",
                          "--batch-size", "8", "--out", str(tmp / "s.json"))
    assert code == 0
    res = read_result(tmp / "s.json", "sweep_rho")
    r = res["results"]["rows"][0]
    # rho=0 is standard inference
    assert r["settings"][0]["mean"] == pytest.approx(r["no_adaptation"]["mean"])
    code, _, _ = run(capsys, "sweep", "batch-size", "--model", ck, "--data", data, "--runs", "1", "--values", "4,8")
    assert code == 0


def test_adapt_command_writes_plain_checkpoint_and_torchscript(files, capsys):
    tmp, data, ck = files
    out, ts = tmp / "adapted.safetensors", tmp / "adapted.pt"
    code, _, _ = run(capsys, "adapt", "--model", ck, "--data", data, "--sigma", "0.5", "--rho", "1",
                     "--batch-size", "20", "--out", str(out), "--torchscript", str(ts))
    assert code == 0
    card = json.loads(out.with_suffix(".json").read_text())
    ad = card["adaptation"]
    assert ad["sigma"] == 0.5 and ad["rho"] == 1.0 and ad["images"] == 40 and ad["seed"] == 0
    # plain PyTorch + safetensors, no bnadapt adaptation code involved
    from safetensors.torch import load_file

    plain = PreActResNet(**ARCH_ARGS)
    plain.load_state_dict(load_file(str(out)))
    plain.eval()
    scripted = torch.jit.load(str(ts))
    x = torch.rand(5, 1, 12, 12)
    assert torch.allclose(plain(x), scripted(x), atol=1e-5)
    # differs from the source model (statistics were adapted)
    src = PreActResNet(**ARCH_ARGS)
    src.load_state_dict(load_file(ck))
    assert not torch.allclose(src.eval()(x), plain(x))


def test_bad_inputs_exit_2_one_line_no_result(files, capsys, tmp_path):
    tmp, data, ck = files
    base = ["noise", "--model", ck, "--data", data]
    assert "dataset-fashion-mnist" in bad(capsys, tmp, "noise", "--model", ck, "--data", f"fashion-mnist:{tmp}/nope")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    bad(capsys, tmp, "noise", "--model", ck, "--data", str(tmp / "corrupt.npz"))
    (tmp / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    (tmp / "corrupt.json").write_text(json.dumps({"arch": "preact_resnet", "arch_args": ARCH_ARGS}))
    bad(capsys, tmp, "noise", "--model", str(tmp / "corrupt.safetensors"), "--data", data)
    np.savez(tmp / "rgb.npz", x=np.zeros((4, 12, 12, 3), np.uint8), y=np.zeros(4, np.int64))
    assert "shape" in bad(capsys, tmp, "noise", "--model", ck, "--data", str(tmp / "rgb.npz"))
    assert "sigma" in bad(capsys, tmp, *base, "--sigmas", "-0.1")
    assert "rho" in bad(capsys, tmp, *base, "--rho", "1.5")
    assert "batch" in bad(capsys, tmp, *base, "--batch-size", "1")
    torch.save(PreActResNet(**ARCH_ARGS).state_dict(), tmp / "w.pt")
    assert "unknown architecture" in bad(capsys, tmp, "noise", "--model", str(tmp / "w.pt"), "--arch", "vgg", "--data", data)
    assert "BatchNorm" in bad(capsys, tmp, "noise", "--model", "tests.test_cli:no_bn_model", "--data", data)
    assert "rho" in bad(capsys, tmp, "adapt", "--model", ck, "--data", data, "--rho", "-1")
    assert "sigma" in bad(capsys, tmp, "sweep", "rho", "--model", ck, "--data", data, "--sigma", "-1")


def no_bn_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 3))


def test_zoo_json(capsys):
    code, out, _ = run(capsys, "zoo", "--json")
    assert code == 0
    for e in json.loads(out):
        assert set(e) >= {"name", "path", "bytes", "metrics"}
        assert all(0 <= v <= 1 for v in e["metrics"].values())
