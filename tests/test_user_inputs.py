"""A user's own inputs end to end: state dicts, factories, TorchScript models, array and folder data,
resumed and interrupted runs, and bad input (one line, exit code 2, nothing partial left). More of the
same for certification in test_certify_runs.py and test_certify_cli.py; README examples in test_readme.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt.cli import main
from bnadapt.models import PreActResNet, load_model, save_checkpoint
from bnadapt.results import read_result

from tests.conftest import TINY_ARCH_ARGS, make_tiny_files, make_trained_bn_model

FAST = ["--samples", "64", "--n0", "8", "--sample-batch", "32", "--alpha", "0.05", "--no-compile", "--quiet"]


@pytest.fixture
def files(tmp_path):
    return make_tiny_files(tmp_path, 40, warm_bn=True)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


# ----------------------------------------------------------------------------- wrong results, lost data
def test_summary_can_never_overwrite_the_rows(files, capsys):
    tmp, data, ck = files
    for cmd in ("certify", "predict"):
        out = tmp / "x.json"
        code, _, err = run(capsys, cmd, "--model", ck, "--data", data, "--images", "3", "--out", out, "--samples", "8")
        one_line_error(code, err, ".tsv")
        assert not out.exists()
    code, _, err = run(capsys, "noise", "--model", ck, "--data", data, "--out", tmp / "x.tsv")
    one_line_error(code, err, ".json")


def test_state_dict_input_shape_from_arch_args(tmp_path, capsys):
    args = dict(TINY_ARCH_ARGS, in_channels=3)
    torch.save(PreActResNet(**args).state_dict(), tmp_path / "rgb.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 3, 8))
    np.savez(tmp_path / "gray.npz", x=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8), y=rng.integers(0, 3, 8))
    common = ["noise", "--model", tmp_path / "rgb.pt", "--arch", "preact_resnet", "--arch-args", json.dumps(args),
              "--runs", "1", "--batch-size", "4", "--sigmas", "0", "--quiet"]
    code, out, err = run(capsys, *common, "--data", tmp_path / "rgb.npz")
    assert code == 0, err  # a 3-channel CIFAR-style model on 3-channel data
    code, _, err = run(capsys, *common, "--data", tmp_path / "gray.npz")
    one_line_error(code, err, "(1, 16, 16)", "3")  # no silent broadcast of 1 channel to 3


def test_adapted_checkpoint_has_its_own_name(files, capsys):
    tmp, data, ck = files
    out = tmp / "ad.safetensors"
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--sigma", "0.5", "--batch-size", "20", "--out", out)
    assert code == 0, err
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["name"] != "tiny" and card["name"].startswith("tiny+") and "sigma0.5" in card["name"]
    assert "metrics" not in card and "metrics_protocol" not in card
    assert card["adaptation"]["source_name"] == "tiny" and card["adaptation"]["sigma"] == 0.5
    assert load_model(str(out)).name == card["name"]


def test_certified_curves_are_exact_steps():
    from bnadapt.viz import certified_points

    series = [{"label": "sigma = 0.25", "radii": [0.675, 0.2], "n": 2, "kind": "sigma"}]
    grid, (y,) = certified_points(series)
    assert np.diff(grid).max() < 0.01  # a fine grid, not radii 0.25 apart
    assert y[grid < 0.2].min() == 100.0 and set(np.round(y[(grid > 0.2) & (grid < 0.675)])) == {50.0}
    assert y[grid > 0.675].max() == 0.0  # the drop is at 0.675, not a line from 0.5 to 0.75


def test_certify_base_classifier_is_exportable_and_reproducible(files, capsys):
    from safetensors.torch import load_file

    tmp, data, ck = files
    models = tmp / "bases"
    code, _, err = run(capsys, "certify", "--model", ck, "--data", data, "--images", "5", "--adapt", "--calib-n", "20",
                       "--adapt-batch-size", "8", "--sigmas", "0.25,0.5", "--save-models", models, "--out", tmp / "c.tsv",
                       *FAST)
    assert code == 0, err
    saved = sorted(models.glob("*.safetensors"))
    assert len(saved) == 2 and all(p.with_suffix(".pt").is_file() for p in saved)
    base = next(p for p in saved if "sigma0.5" in p.name)
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--images", "5", "--adapt-on", "calib",
                       "--calib-n", "20", "--batch-size", "8", "--sigma", "0.5", "--out", tmp / "again.safetensors")
    assert code == 0, err
    a, b = load_file(str(base)), load_file(str(tmp / "again.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ts = torch.jit.load(str(base.with_suffix(".pt")))
    plain = load_model(str(base)).model
    x = torch.rand(3, 1, 12, 12)
    assert torch.allclose(ts(x), plain(x), atol=1e-5)


def test_save_models_after_resume_and_unwritable_folder(files, capsys):
    """A sigma certified before a --resume gets its base classifier written too; an unwritable --save-models
    folder is refused before any work."""
    from safetensors.torch import load_file

    tmp, data, ck = files
    common = ["certify", "--model", ck, "--data", data, "--images", "3", "--adapt", "--calib-n", "20",
              "--adapt-batch-size", "8", "--sigmas", "0.25,0.5", "--out", tmp / "r.tsv", *FAST]
    assert run(capsys, *common)[0] == 0  # the first run: no models saved
    models = tmp / "later"
    code, _, err = run(capsys, *common, "--resume", "--save-models", models)
    assert code == 0, err
    saved = sorted(models.glob("*.safetensors"))
    assert len(saved) == 2
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--images", "3", "--adapt-on", "calib",
                       "--calib-n", "20", "--batch-size", "8", "--sigma", "0.25", "--out", tmp / "a25.safetensors")
    assert code == 0, err
    a, b = load_file(str(next(p for p in saved if "sigma0.25" in p.name))), load_file(str(tmp / "a25.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp / "plainfile").write_text("x")  # a folder that cannot be created (even by root)
    code, out, err = run(capsys, *common[:-len(FAST)], "--out", tmp / "s.tsv", *FAST, "--save-models",
                         tmp / "plainfile" / "sub")
    one_line_error(code, err, "--save-models")
    assert not (tmp / "s.tsv").exists()


def test_warm_up_is_not_in_the_first_row(tmp_path):
    import time

    from bnadapt.certify import certify_run, read_rows, read_sidecar
    from bnadapt.smoothing import Smooth

    class SlowFirstCall(nn.Module):  # stands in for torch.compile's first-call compilation
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.6)
            return self.lin(x.flatten(1))

    model = SlowFirstCall().eval()
    data = [(torch.rand(1, 2, 2), 0) for _ in range(3)]
    out = tmp_path / "w.tsv"
    certify_run(lambda s: Smooth(model, 2, s, batch_size=16), data, [0, 1, 2], out, sigmas=[0.5], n0=4, n=16,
                alpha=0.05, seed=0, quiet=True)
    rows = read_rows(out)
    assert rows[0]["time"] < 0.3 and read_sidecar(out)["warmup_s"]["0.5"] >= 0.6


def test_torchscript_models(files, capsys):
    tmp, data, ck = files
    ts = tmp / "m.ts"
    m = load_model(ck).model
    torch.jit.save(torch.jit.trace(m, torch.rand(2, 1, 12, 12)), ts)
    # certify and predict a TorchScript model as a fixed model, without --no-compile
    code, _, err = run(capsys, "certify", "--model", ts, "--data", data, "--images", "3", "--sigmas", "0.5",
                       "--out", tmp / "t.tsv", *FAST[:-2], "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "predict", "--model", ts, "--data", data, "--images", "2", "--sigma", "0.5",
                       "--out", tmp / "p.tsv", "--samples", "32", "--sample-batch", "16", "--quiet")
    assert code == 0, err
    # noise evaluates it without adaptation, and says so
    code, out, err = run(capsys, "noise", "--model", ts, "--data", data, "--runs", "1", "--batch-size", "8",
                         "--sigmas", "0", "--quiet", "--out", tmp / "n.json")
    assert code == 0 and "n/a (TorchScript)" in out, err
    assert read_result(tmp / "n.json")["results"]["rows"][0]["adapted"] is None
    # adaptation needs the eager model: a one-line error
    code, _, err = run(capsys, "adapt", "--model", ts, "--data", data, "--out", tmp / "a.safetensors")
    one_line_error(code, err, "TorchScript", "eager")
    code, _, err = run(capsys, "certify", "--model", ts, "--data", data, "--images", "3", "--adapt",
                       "--out", tmp / "ta.tsv", *FAST)
    one_line_error(code, err, "TorchScript")
    assert not (tmp / "ta.tsv").exists()


def rgb_factory():
    torch.manual_seed(0)
    return PreActResNet(in_channels=3, num_classes=3, widths=(4, 8), depth=1).eval()


def raising_factory():
    raise ValueError("no weights here")


def test_model_data_mismatch_is_one_line_and_leaves_nothing(files, capsys):
    tmp, data, _ = files
    out = tmp / "c.tsv"
    code, _, err = run(capsys, "certify", "--model", "tests.test_user_inputs:rgb_factory", "--data", data,
                       "--images", "3", "--out", out, *FAST)
    one_line_error(code, err, "(1, 12, 12)")
    assert not out.exists() and not Path(str(out) + ".params.json").exists()
    code, _, err = run(capsys, "noise", "--model", "tests.test_user_inputs:rgb_factory", "--data", data)
    one_line_error(code, err, "(1, 12, 12)")


def test_small_image_folders(tmp_path, capsys):
    from PIL import Image

    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i + 3 * c).integers(0, 256, (12, 12), dtype=np.uint8)).convert(
                "RGB").save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    args = dict(TINY_ARCH_ARGS, in_channels=3)
    torch.save(PreActResNet(**args).state_dict(), tmp_path / "rgb.pt")
    code, _, err = run(capsys, "noise", "--model", tmp_path / "rgb.pt", "--arch", "preact_resnet", "--arch-args",
                       json.dumps(args), "--data", f"folder:{tmp_path / 'imgs'}", "--resize", "none", "--crop", "none",
                       "--runs", "1", "--batch-size", "3", "--sigmas", "0", "--quiet", "--out", tmp_path / "r.json")
    assert code == 0, err
    data = read_result(tmp_path / "r.json")["inputs"]["data"]
    assert data["preprocessing"]["center_crop"] is None and data["image_shape"] == [3, 12, 12]
    code, _, err = run(capsys, "noise", "--model", tmp_path / "rgb.pt", "--arch", "preact_resnet", "--arch-args",
                       json.dumps(args), "--data", f"folder:{tmp_path / 'imgs'}", "--resize", "-3")
    one_line_error(code, err, "--resize")


def test_outputs_checked_before_any_work(files, capsys):
    tmp, data, ck = files
    (tmp / "afile").write_text("x")
    code, out, err = run(capsys, "noise", "--model", ck, "--data", data, "--runs", "1", "--out", tmp / "afile" / "r.json")
    one_line_error(code, err, "not a folder")
    assert out == ""  # nothing ran: no table was printed
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--out", tmp / "a.safetensors",
                       "--torchscript", tmp / "afile" / "a.pt")
    one_line_error(code, err)
    assert not (tmp / "a.safetensors").exists()
    code, _, err = run(capsys, "adapt", "--model", ck, "--data", data, "--out", tmp / "b.safetensors",
                       "--torchscript", tmp / "b.safetensors")
    one_line_error(code, err, ".pt")
    assert not (tmp / "b.safetensors").exists()


@pytest.mark.parametrize("n", ["-1", "0", "1"])
def test_bad_calib_n_leaves_no_files(files, capsys, n):
    tmp, data, ck = files
    out = tmp / "c.tsv"
    code, _, err = run(capsys, "certify", "--model", ck, "--data", data, "--images", "3", "--adapt", "--calib-n", n,
                       "--out", out, *FAST)
    one_line_error(code, err, "--calib-n")
    assert sorted(p.name for p in tmp.iterdir()) == ["d.npz", "m.json", "m.safetensors"]


def test_broken_factories_are_one_line(files, capsys, tmp_path, monkeypatch):
    _, data, _ = files
    code, _, err = run(capsys, "noise", "--model", "tests.test_user_inputs:raising_factory", "--data", data)
    one_line_error(code, err, "raising_factory", "ValueError", "no weights here")
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "noise", "--model", "broken_mod:f", "--data", data)
    one_line_error(code, err, "broken_mod:f", "SyntaxError")
    code, _, err = run(capsys, "--debug", "noise", "--model", "tests.test_user_inputs:raising_factory", "--data", data)
    assert code == 2 and "Traceback" in err and "no weights here" in err


def test_closed_pipe_is_quiet():
    bn = Path(sys.executable).with_name("bnadapt")
    cmd = f"{bn} zoo --json | head -1" if bn.exists() else f"{sys.executable} -m bnadapt.cli zoo --json | head -1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("argv,word", [
    (["sweep", "rho", "--rho", "7"], "--rho"),
    (["sweep", "batch-size", "--batch-size", "-5"], "--batch-size"),
    (["sweep", "batch-size", "--values", "1,8"], "batch-size values"),
    (["noise", "--seed", "-1"], "--seed"),
    (["noise", "--runs", "0"], "--runs"),
    (["adapt", "--images", "1", "--out", "OUT"], "at least 2"),
    (["noise", "--images", "1", "--out", "OUTJSON"], "at least 2 images"),
    (["sweep", "rho", "--images", "1", "--out", "OUTJSON"], "at least 2 images"),
    (["sweep", "batch-size", "--images", "1", "--out", "OUTJSON"], "at least 2 images"),
    (["noise", "--device", "tpu"], "device"),
    (["noise", "--precision", "fp16", "--device", "cpu"], "fp16"),
    (["noise", "--precision", "fp8"], "precision"),
    (["noise", "--threads", "0"], "--threads"),
])
def test_every_option_validated_the_same_way(files, capsys, argv, word):
    tmp, data, ck = files
    outs = {"OUT": str(tmp / "o.safetensors"), "OUTJSON": str(tmp / "o.json")}
    argv = [outs.get(a, a) for a in argv]
    code, _, err = run(capsys, *argv, "--model", ck, "--data", data)
    one_line_error(code, err, word)
    assert not any(Path(p).exists() for p in outs.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(files, capsys):
    tmp, data, ck = files
    code, _, err = run(capsys, "noise", "--model", ck, "--data", data, "--device", "cuda", "--out", tmp / "r.json")
    one_line_error(code, err, "CUDA is not available", "--device cpu")
    assert not (tmp / "r.json").exists()


def test_device_is_printed_and_recorded(files, capsys):
    """Issue 7: the device is printed (stdout, so a one-line error stays one line on stderr) and recorded."""
    tmp, data, ck = files
    code, out, err = run(capsys, "noise", "--model", ck, "--data", data, "--runs", "1", "--batch-size", "8",
                         "--sigmas", "0", "--threads", "1", "--quiet", "--device", "cpu", "--out", tmp / "d.json")
    assert code == 0, err
    assert out.splitlines()[0] == "device: cpu, fp32, 1 CPU thread"
    assert read_result(tmp / "d.json")["inputs"]["device"] == "cpu"


def test_npz_keys_and_per_class_alone(tmp_path, capsys):
    _, _, ck = make_tiny_files(tmp_path, 30)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "k.npz", imgs=rng.integers(0, 256, (12, 12, 12), dtype=np.uint8), lab=np.arange(12) % 3)
    code, _, err = run(capsys, "noise", "--model", ck, "--data", tmp_path / "k.npz", "--runs", "1", "--batch-size", "4")
    one_line_error(code, err)
    code, _, err = run(capsys, "noise", "--model", ck, "--data", tmp_path / "k.npz", "--npz-keys", "imgs,lab",
                       "--per-class", "2", "--runs", "1", "--batch-size", "3", "--quiet", "--out", tmp_path / "r.json")
    assert code == 0, err
    assert read_result(tmp_path / "r.json")["inputs"]["data"]["n"] == 6  # 2 per class, 3 classes
    code, _, err = run(capsys, "noise", "--model", ck, "--data", tmp_path / "k.npz", "--npz-keys", "imgs,lab",
                       "--per-class", "0")
    one_line_error(code, err, "--per-class")
    code, _, err = run(capsys, "noise", "--model", ck, "--data", tmp_path / "k.npz", "--npz-keys", "imgs,lab",
                       "--images", "10", "--per-class", "1")
    one_line_error(code, err, "lower --images or raise --per-class")


def test_train_never_overwrites_a_finished_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (300, 12, 12, 1), dtype=np.uint8), y=rng.integers(0, 10, 300))
    common = ["train", "standard", "--out", tmp_path / "c.safetensors", "--data", tmp_path / "d.npz", "--epochs", "1",
              "--val-size", "40", "--eval-limit", "20", "--quiet", "--device", "cpu"]
    assert run(capsys, *common)[0] == 0
    before = (tmp_path / "c.safetensors").read_bytes()
    code, _, err = run(capsys, *common, "--resume")
    one_line_error(code, err, "--overwrite")
    assert (tmp_path / "c.safetensors").read_bytes() == before
    assert run(capsys, *common, "--overwrite")[0] == 0


def test_version_and_help_texts(capsys):
    import bnadapt

    code, out, _ = run(capsys, "--version")
    assert code == 0 and bnadapt.__version__ in out
    run(capsys, "certify", "--help")
    # the help text states defaults, and --images says 100 (its real default) for certify
    code, out, _ = run(capsys, "certify", "--help")
    assert "default 100" in " ".join(out.split())
    code, out, _ = run(capsys, "predict", "--help")
    assert "png" not in out.lower()
    for cmd in (["noise"], ["adapt"]):
        code, out, _ = run(capsys, *cmd, "--help")
        text = " ".join(out.split())
        assert "(default 1)" in text and "(default 0)" in text


def test_progress_off_a_terminal_is_plain_lines():
    from bnadapt.runs import Progress

    buf = io.StringIO()
    with Progress(10, "work", interval=0.0, stream=buf) as bar:
        for _ in range(10):
            bar.update(1)
    text = buf.getvalue()
    assert "\r" not in text and text.count("\n") >= 10 and "work: 10/10 img" in text
    quiet = io.StringIO()
    with Progress(10, "work", interval=0.0, stream=quiet, quiet=True) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_progress_speaks_during_one_long_unit():
    """A unit of work longer than the interval (one attack batch ran 11 minutes on one thread) must not
    leave the log silent: a heartbeat line every interval, naming what runs; the thread ends on close."""
    import threading

    from bnadapt.runs import Progress, progress_note

    buf = io.StringIO()
    before = threading.active_count()
    with Progress(4, "attack", interval=0.05, stream=buf):
        progress_note("model run 1 batch 1: pgd")
        time.sleep(0.3)  # no update: the unit is still running
    assert threading.active_count() == before
    lines = [ln for ln in buf.getvalue().splitlines() if ln]
    assert len(lines) >= 2 and all(ln.startswith("attack: 0/4 img (0%)") for ln in lines), lines
    assert "eta ?" in lines[0] and lines[0].endswith("now: model run 1 batch 1: pgd")
    progress_note("nobody listens")  # no open display: a no-op


def test_train_pgd_metrics_write_no_bar_into_a_log(capfd):
    """The PGD metric of a model card (``train`` with a PGD recipe reaches it) used its own tqdm bar,
    which wrote carriage-return updates into log files; it goes through the one progress helper now."""
    from bnadapt.attacks import LinfPGD, accuracy_under_attack
    from bnadapt.data import TensorImageDataset

    model = make_trained_bn_model()
    ds = TensorImageDataset(torch.rand(12, 1, 12, 12), torch.arange(12) % 3)
    accuracy_under_attack(model, ds, LinfPGD(0.1, steps=2), 4, progress=True)
    assert "\r" not in capfd.readouterr().err


def test_threads_are_recorded(files, capsys):
    tmp, data, ck = files
    threads = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "noise", "--model", ck, "--data", data, "--runs", "1", "--batch-size", "8",
                           "--sigmas", "0", "--threads", "1", "--quiet", "--out", tmp / "r.json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert read_result(tmp / "r.json")["run"]["threads"] == 1


def test_result_files_respect_the_umask(tmp_path):
    from bnadapt.results import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_identical_weights_identical_files(tmp_path):
    torch.manual_seed(0)
    m = PreActResNet(**TINY_ARCH_ARGS)
    cards = [save_checkpoint(tmp_path / f"{i}.safetensors", m, {"arch": "preact_resnet", "arch_args": TINY_ARCH_ARGS})
             for i in range(3)]
    blobs = {p.read_bytes() for p in cards}
    assert len(blobs) == 1
    hashes = {json.loads(p.with_suffix(".json").read_text())["tensors_sha256"] for p in cards}
    assert len(hashes) == 1 and load_model(str(cards[0])).tensors_sha256 in hashes


def test_provenance(files, capsys):
    tmp, data, ck = files
    code, _, err = run(capsys, "noise", "--model", "tests.test_user_inputs:gray_factory", "--data", data, "--runs", "1",
                       "--batch-size", "8", "--sigmas", "0", "--quiet", "--out", tmp / "r.json")
    assert code == 0, err
    inp = read_result(tmp / "r.json")
    m, d = inp["inputs"]["models"][0], inp["inputs"]["data"]
    assert m["sha256"] is None and len(m["tensors_sha256"]) == 64  # factory models: the state dict is hashed
    assert d["split"] is None and len(d["content_sha256"]) == 64 and d["content_hash_of"] == "pixels and labels"
    assert inp["run"]["argv"] and "noise" in inp["run"]["argv"]
    code, _, err = run(capsys, "certify", "--model", ck, "--data", data, "--images", "2", "--sigmas", "0.5",
                       "--out", tmp / "c.tsv", *FAST)
    assert code == 0, err
    assert read_result(tmp / "c.json")["inputs"]["params"]["compile"] is False


def gray_factory():
    torch.manual_seed(0)
    return PreActResNet(**TINY_ARCH_ARGS).eval()


def test_zoo_names_the_threat_model(capsys):
    code, out, _ = run(capsys, "zoo")
    assert code == 0
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("adv-")}
    assert "linf eps 0.1" in lines["adv-linf-0.1"] and "l2 eps 1.5" in lines["adv-l2-1.5"]
