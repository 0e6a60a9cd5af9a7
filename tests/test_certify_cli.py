
import pytest
import torch

from bnadapt.certify import adaptation_indices, read_rows
from bnadapt.cli import main
from bnadapt.results import read_result

from tests.conftest import make_tiny_files


@pytest.fixture
def files(tmp_path):
    return make_tiny_files(tmp_path, 30, warm_bn=False)


FAST = ["--samples", "64", "--n0", "8", "--sample-batch", "32", "--alpha", "0.05", "--no-compile", "--quiet"]


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
    summary = read_result(out.with_suffix(".json"), "certify")
    res = summary["results"]
    assert set(res) >= {"per_sigma", "envelope_of_curves", "per_image_selection"} and "envelope" not in res
    assert len(res["envelope_of_curves"]["certified_accuracy"]) == 12  # radii 0 .. 2.75
    assert res["tsv"] == str(out)  # the summary points at the rows, never at itself
    assert out.with_suffix(".png").stat().st_size > 1000
    assert (tmp / "c.sigma0.25.tsv").is_file() and (tmp / "c.sigma0.5.tsv").is_file()
    adapt = summary["inputs"]["params"]["adapt"]
    assert adapt["adapt_on"] == "calib" and adapt["images"] == 16
    assert summary["inputs"]["models"][0]["sha256"] and summary["inputs"]["data"]["indices_sha256"]


def test_calibration_split_is_disjoint_from_certified_images():
    cert = [0, 1, 2, 3]
    idx = adaptation_indices(30, cert, adapt_on="calib", calib_n=100, seed=0)
    assert len(idx) == 26 and not set(idx) & set(cert)  # all the others, none of the certified ones
    assert sorted(adaptation_indices(30, cert, adapt_on="test", seed=0)) == cert


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
                 "--samples", "64", "--sample-batch", "32", "--alpha", "0.05", "--no-compile", "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 6
    res = read_result(out.with_suffix(".json"), "smoothed_predict")
    assert 0 <= res["results"]["accuracy"] <= 1 and res["results"]["tsv"] == str(out)
    assert res["results"]["warmup_s"] >= 0  # item 8: compilation is timed apart from the first row


def test_predict_warms_up_before_the_first_timed_image(files, monkeypatch):
    """Item 8 for predict: every sampling batch shape runs once before the first image is timed."""
    from bnadapt import certify as C
    from bnadapt.data import select
    from bnadapt.models import load_model

    tmp, data, ck = files
    calls = []
    real = C._warm_up
    monkeypatch.setattr(C, "_warm_up", lambda smooth, x, n0, n: calls.append((n0, n)) or real(smooth, x, n0, n))
    C.predict(load_model(ck), select(data, images=2), tmp / "pw.tsv", sigma=0.25, n=48, alpha=0.05, sample_batch=32,
              compile=False, quiet=True)
    assert calls == [(48, 48)]


def test_certify_command_under_torchrun_matches_single_process(files):
    import subprocess
    import sys

    tmp, data, ck = files
    common = ["certify", "--model", ck, "--data", data, "--images", "5", "--adapt", "--calib-n", "16",
              "--sigmas", "0.25,0.5", "--device", "cpu", *FAST]
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
    assert read_result(tmp / "dist.json", "certify")["results"]["complete"]


def test_shards_merge_from_the_cli(files, capsys):
    tmp, data, ck = files
    common = ["certify", "--model", ck, "--data", data, "--images", "5", "--sigmas", "0.25,0.5", *FAST]
    assert main(common + ["--out", str(tmp / "one.tsv")]) == 0
    for i in (0, 1):
        assert main(common + ["--shard", f"{i}/2", "--out", str(tmp / f"s{i}.tsv")]) == 0
        assert read_result(tmp / f"s{i}.json")["results"]["partial"]  # a shard's summary says so
    capsys.readouterr()
    assert main(["certify-merge", str(tmp / "s0.tsv"), str(tmp / "s1.tsv"), "--out", str(tmp / "m.tsv")]) == 0
    strip = lambda p: [l.rsplit("\t", 1)[0] for l in p.read_text().splitlines()]
    assert strip(tmp / "m.tsv") == strip(tmp / "one.tsv")
    merged = read_result(tmp / "m.json", "certify")["results"]
    assert merged["complete"] and not merged["partial"]


def test_plot_certified_overlays_runs(files, capsys):
    tmp, data, ck = files
    for name, sig in (("a", "0.25,0.5"), ("b", "0.5")):
        assert main(["certify", "--model", ck, "--data", data, "--images", "3", "--sigmas", sig,
                     "--out", str(tmp / f"{name}.tsv"), *FAST]) == 0
    png = tmp / "fig1.png"
    assert main(["plot-certified", f"{tmp / 'a.json'}=adapted", str(tmp / "b.json"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["plot-certified", str(tmp / "a.tsv"), "--out", str(tmp / "x.png")]) == 2
