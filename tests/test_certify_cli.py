import json

import numpy as np
import pytest
import torch

from bnadapt.cli import main
from bnadapt.models import PreActResNet, save_checkpoint
from bnadapt.smoothing import read_rows

from tests.conftest import TINY_ARCH_ARGS as ARCH_ARGS, make_tiny_files


@pytest.fixture
def files(tmp_path):
    return make_tiny_files(tmp_path, 30, warm_bn=False)


FAST = ["--samples", "64", "--n0", "8", "--batch", "32", "--alpha", "0.05", "--no-compile", "--quiet"]


def test_certify_adapted_writes_tsv_summary_plot(files, capsys):
    tmp, data, ck = files
    out = tmp / "c.tsv"
    code = main(["certify", "--model", ck, "--data", data, "--images", "6", "--adapt", "--calib-n", "16",
                 "--sigmas", "0.25,0.5", "--out", str(out), *FAST])
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 12
    header = out.read_text().splitlines()[0].split("\t")
    assert header[:2] == ["idx", "label"] and {"predict", "radius", "correct", "time"} <= set(header)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert set(summary) >= {"per_sigma", "envelope", "envelope_uncorrected"}
    assert len(summary["envelope"]["certified_accuracy"]) == 12  # radii 0 .. 2.75
    assert out.with_suffix(".png").stat().st_size > 1000
    params = json.loads((tmp / "c.tsv.params.json").read_text())["params"]
    assert params["extra"]["adapt"]["adapt_on"] == "calib" and params["extra"]["adapt"]["images"] == 16
    # envelope (Bonferroni) never exceeds the uncorrected one
    assert all(a <= b + 1e-12 for a, b in zip(summary["envelope"]["certified_accuracy"],
                                               summary["envelope_uncorrected"]["certified_accuracy"]))


def test_calibration_split_is_disjoint_from_certified_images(files):
    from types import SimpleNamespace

    from bnadapt.certify_cli import _base_factory
    from bnadapt.data import load_dataset
    from bnadapt.models import load_model

    tmp, data, ck = files
    ds = load_dataset(data)
    args = SimpleNamespace(adapt=True, rho=1.0, adapt_batch_size=8, adapt_on="calib", calib_n=100, seed=0, compile=False)
    cert = [0, 1, 2, 3]
    _, info = _base_factory(args, load_model(ck), ds, cert)
    assert info["images"] == 26  # all the others, none of the certified ones


def test_resume_and_model_unchanged(files):
    tmp, data, ck = files
    before = open(ck, "rb").read()
    out = tmp / "r.tsv"
    args = ["certify", "--model", ck, "--data", data, "--images", "4", "--adapt", "--adapt-on", "test",
            "--sigmas", "0.5", "--out", str(out), *FAST]
    assert main(args) == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:5])  # killed mid-row
    assert main(args + ["--resume"]) == 0
    strip = lambda t: [l.rsplit("\t", 1)[0] for l in t.splitlines()]
    assert strip(out.read_text()) == strip(full)
    assert open(ck, "rb").read() == before
    # a different parameter on resume is refused
    assert main(args[:-len(FAST)] + ["--samples", "65"] + FAST[2:] + ["--resume"]) == 2


@pytest.mark.parametrize("extra,msg", [
    (["--sigmas", "0"], "sigma"), (["--n0", "0"], "n0"), (["--samples", "0"], "samples"),
    (["--alpha", "1"], "alpha"), (["--alpha", "0"], "alpha"), (["--shard", "2/2"], "shard"), (["--shard", "x"], "shard"),
])
def test_bad_inputs(files, capsys, extra, msg):
    tmp, data, ck = files
    out = tmp / "bad.tsv"
    code = main(["certify", "--model", ck, "--data", data, "--images", "3", "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1
    assert not out.exists()


def test_predict(files, capsys):
    tmp, data, ck = files
    out = tmp / "p.tsv"
    assert main(["predict", "--model", ck, "--data", data, "--images", "5", "--adapt", "--sigma", "0.25", "--out", str(out),
                 "--samples", "64", "--batch", "32", "--alpha", "0.05", "--no-compile", "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 6
    assert 0 <= json.loads(out.with_suffix(".json").read_text())["accuracy"] <= 1


def test_certify_command_under_torchrun_matches_single_process(files):
    import subprocess
    import sys

    tmp, data, ck = files
    common = ["certify", "--model", ck, "--data", data, "--images", "5", "--adapt", "--calib-n", "16",
              "--sigmas", "0.25,0.5", *FAST]
    # torchrun runs each rank with OMP_NUM_THREADS=1; float reductions (hence argmax on near-ties of
    # this untrained model) depend on the thread count, so the reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(common + ["--out", str(tmp / "single.tsv")]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bnadapt.cli", *common, "--out", str(tmp / "dist.tsv")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    strip = lambda p: [l.rsplit("\t", 1)[0] for l in p.read_text().splitlines()]
    assert strip(tmp / "dist.tsv") == strip(tmp / "single.tsv")


def test_plot_certified_overlays_runs(files, capsys):
    tmp, data, ck = files
    for name, sig in (("a", "0.25,0.5"), ("b", "0.5")):
        assert main(["certify", "--model", ck, "--data", data, "--images", "3", "--sigmas", sig,
                     "--out", str(tmp / f"{name}.tsv"), *FAST]) == 0
    png = tmp / "fig1.png"
    assert main(["plot-certified", f"{tmp / 'a.json'}=adapted", str(tmp / "b.json"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["plot-certified", str(tmp / "a.tsv"), "--out", str(tmp / "x.png")]) == 2
