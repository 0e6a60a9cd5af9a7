"""``bnadapt corruptions generate|evaluate|table`` end to end on tiny data, and bad input (exit 2)."""

import csv

import numpy as np
import pytest

from bnadapt.cli import main
from bnadapt.corruptions import names
from bnadapt.data import load_dataset
from bnadapt.results import read_result

from tests.conftest import make_tiny_files

needs_lib = pytest.mark.skipif(names.library_version() is None,
                               reason="imagecorruptions-imaug not installed (bash scripts/setup.sh)")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Tiny 12x12 gray data (padded to 32 for the library), a tiny model, and all 19 corruptions of 6 images."""
    from bnadapt.corruptions.generate import generate
    from bnadapt.data import select

    if names.library_version() is None:
        pytest.skip("imagecorruptions-imaug not installed")
    tmp = tmp_path_factory.mktemp("corr")
    _, data, ck = make_tiny_files(tmp, 40)
    sel = select(data, None, images=6)
    generate(sel, tmp / "cache", workers=0, quiet=True)
    return tmp, data, ck


@needs_lib
def test_generate_command_and_reuse(made, capsys):
    tmp, data, _ = made
    code, out, _ = run(capsys, "corruptions", "generate", "--data", data, "--images", 6, "--out", tmp / "cache",
                       "--workers", 0, "--quiet")
    assert code == 0 and "reused 95" in out and "ImageNet-C severity parameters" in out
    code, out, _ = run(capsys, "corruptions", "generate", "--data", data, "--images", 4, "--corruptions", "noise",
                       "--params", "cifar", "--out", tmp / "cifar", "--quiet")
    assert code == 0 and "generated 15" in out and "CIFAR-10-C severity parameters" in out
    # any command reads one corrupted set as a data spec
    code, out, _ = run(capsys, "noise", "--model", made[2], "--data", f"cifar10-c:{tmp / 'cache'}:fog:2",
                       "--sigmas", "0", "--runs", "1", "--batch-size", 3, "--quiet")
    assert code == 0 and "adaptive BN" in out


@needs_lib
def test_evaluate_tables_csv_and_reference(made, capsys):
    from bnadapt.corruptions.tables import format_table8
    from bnadapt.noise import accuracy
    from bnadapt.models import load_model

    tmp, data, ck = made
    out, csvp, ref = tmp / "eval.json", tmp / "eval.csv", tmp / "ref.json"
    code, stdout, _ = run(capsys, "corruptions", "evaluate", "--model", ck, "--data", f"cifar10-c:{tmp / 'cache'}",
                          "--batch-size", 3, "--runs", 2, "--reference", ck, "--reference-out", ref, "--out", out,
                          "--csv", csvp, "--quiet", "--threads", 1)
    assert code == 0, stdout
    assert "ImageNet-C severity parameters" in stdout and "mCE reference: tiny" in stdout and "Hold-out" in stdout
    res = read_result(out, "corruption_eval")
    prm, row = res["inputs"]["params"], res["results"]["rows"][0]
    assert prm["severity_params"] == "imagenet" and prm["runs"] == 2 and prm["corruptions"] == list(names.ALL)
    assert res["inputs"]["data"]["n"] == 6 and res["inputs"]["data"]["clean"]["n"] == 6
    std, ada = row["metrics"]["standard"], row["metrics"]["adapted"]
    # the reference model without adaptation has mCE and relative mCE 100 % by construction
    assert std["mce"]["mean"] == pytest.approx(1.0)
    assert std["relative_mce"] is None or std["relative_mce"]["mean"] == pytest.approx(1.0)
    assert len(ada["corrupt"]["runs"]) == 2 and ada["mce"] is not None
    assert std["clean"]["mean"] == row["clean"]["standard"]["mean"]
    # THE accuracy loop: the cell equals bnadapt.noise.accuracy on the same set as a data spec
    ds = load_dataset(f"cifar10-c:{tmp / 'cache'}:gaussian_noise:3")
    net = load_model(ck).model
    assert row["accuracy"]["gaussian_noise"]["standard"][2]["mean"] == accuracy(net, ds, batch_size=3)
    assert row["accuracy"]["gaussian_noise"]["adapted"][2]["runs"][1] == accuracy(net, ds, rho=1.0, batch_size=3,
                                                                                  run=1)
    # the reference table is a reusable result file
    assert read_result(ref, "corruption_reference")["results"]["model"] == "tiny"
    rows = list(csv.reader(csvp.open()))
    assert rows[0][0] == "params=imagenet" and rows[0][1:6] == ["gaussian_noise"] * 5 and len(rows[0]) == 1 + 19 * 5
    assert rows[1][1:6] == ["1", "2", "3", "4", "5"]
    assert [r[0] for r in rows[2:]] == ["tiny (reference)", "tiny", "tiny+adaptive-bn"]
    assert float(rows[3][11]) == row["accuracy"]["impulse_noise"]["standard"][0]["mean"]
    code, stdout, _ = run(capsys, "corruptions", "table", out, "--table", "8", "--markdown")
    assert code == 0 and stdout.strip() == format_table8(res, markdown=True).strip()
    # the reference written beside the set once is reused
    code, stdout, _ = run(capsys, "corruptions", "evaluate", "--model", ck, "--data", f"cifar10-c:{tmp / 'cache'}",
                          "--corruptions", "noise", "--batch-size", 3, "--runs", 1, "--reference", ref, "--quiet")
    assert code == 0 and "mCE n/a" in stdout


def test_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch):
    _, data, ck = make_tiny_files(tmp_path, 12)
    gen = ["corruptions", "generate", "--data", data, "--out", tmp_path / "c", "--quiet"]
    one_line_error(*run(capsys, *gen, "--corruptions", "fog,hail")[::2])
    one_line_error(*run(capsys, *gen, "--params", "mnist")[::2])
    one_line_error(*run(capsys, *gen, "--params", "cifar", "--corruptions", "fog")[::2])
    one_line_error(*run(capsys, *gen, "--workers", -1)[::2])
    one_line_error(*run(capsys, "noise", "--model", ck, "--data", f"cifar10-c:{tmp_path}:fog:9")[::2])
    # a cache whose manifest does not match the request
    code, _, _ = run(capsys, *gen, "--corruptions", "gaussian_noise", "--engine", "torch")
    assert code == 0
    code, _, err = run(capsys, *gen, "--corruptions", "gaussian_noise", "--engine", "torch", "--seed", 3)
    one_line_error(code, err)
    assert "seed" in err
    # pre-made sets with missing files or wrong shapes; no result file is left behind
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.json"
    ev = ["corruptions", "evaluate", "--model", ck, "--out", out, "--quiet"]
    one_line_error(*run(capsys, *ev, "--data", f"cifar10-c:{tmp_path / 'empty'}")[::2])
    np.save(tmp_path / "empty" / "labels.npy", np.zeros(10, np.uint8))
    np.save(tmp_path / "empty" / "fog.npy", np.zeros((10, 32, 32, 2), np.uint8))
    code, _, err = run(capsys, *ev, "--data", f"cifar10-c:{tmp_path / 'empty'}")
    one_line_error(code, err)
    assert "expected uint8" in err
    one_line_error(*run(capsys, *ev, "--data", f"imagenet-c:{tmp_path / 'empty'}")[::2])
    one_line_error(*run(capsys, *ev, "--data", f"cifar10-c:{tmp_path / 'c'}", "--params", "cifar")[::2])
    one_line_error(*run(capsys, *ev, "--data", data)[::2])
    assert not out.exists()
    # the optional dependency missing: the install command in one line
    monkeypatch.setattr(names, "library_version", lambda: None)
    code, _, err = run(capsys, *gen, "--corruptions", "fog", "--out", tmp_path / "d")
    one_line_error(code, err)
    assert "pip install" in err and "imagecorruptions-imaug==1.1.5" in err and not (tmp_path / "d").exists()


def test_a_declared_table_does_not_stick_to_the_cached_set(tmp_path):
    """`open_corrupted` caches a set per process; declaring --params for a released set (no manifest) used
    to write into that cached object, so a second evaluation with another --params was refused."""
    from bnadapt.cli.corruptions import _declare_params
    from bnadapt.data.corrupted import open_corrupted

    rng = np.random.default_rng(0)
    np.save(tmp_path / "gaussian_noise.npy", rng.integers(0, 256, (5 * 4, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.tile(np.arange(4) % 2, 5))
    cset = open_corrupted("cifar10-c", tmp_path)
    assert _declare_params(cset, "imagenet").params == "imagenet"
    assert _declare_params(open_corrupted("cifar10-c", tmp_path), "cifar").params == "cifar"
    assert cset.params is None and open_corrupted("cifar10-c", tmp_path) is cset
