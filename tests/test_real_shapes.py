"""Real shapes end to end, on the CPU: a few hundred 500x375 JPEGs in the ImageNet validation layout and
an ImageNet-C-layout folder, a randomly initialised robustness-library ResNet-50 checkpoint, and every
user command on them (tiny sizes: the shapes are real, the counts are not), and ``bnadapt reproduce``'s
noise group (the quick protocol's own sizes, on a set smaller than all of them); then the same commands
for CIFAR-shaped models: a PreActResNet-18 (Rice et al.'s layout) and a RobustBench WideResNet."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.results import read_result
from tests.conftest import run_cli
from tests.test_checkpoint_formats import random_state, rice_layout, robustness_file, torchvision_layout, wrn_layout

CLASSES = 10
CORRUPTIONS = ("gaussian_noise", "contrast")
# reproduce's noise group forwards its whole set 56 times at 224 px (Table 1: 4 sigmas x 2 x 3 runs;
# Tables 4 and 5: 8 columns x 2 runs each); a ResNet-50 forward of one image takes about 0.1 s on one
# thread, so 12 images take about 70 s (measured: 16 images, 90 s).
SMALL = 12


def _jpegs(root, n, size, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"n{i % CLASSES:08d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(d / f"ILSVRC_val_{i:05d}.JPEG",
                                                                            quality=85)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_pngs(root, n, seed):
    """CIFAR-10 exported as class folders: ``<class name>/<index>.png``, 32x32 RGB."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / CIFAR10_CLASSES[i % len(CIFAR10_CLASSES)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _jpegs(root / "val", 200, (500, 375), seed=0)
    for c in CORRUPTIONS:  # ImageNet-C: <corruption>/<severity>/<class>/<image>, 224 px JPEGs
        for s in range(1, 6):
            _jpegs(root / "imagenet-c" / c / str(s), 20, (224, 224), seed=s)
    _jpegs(root / "clean", 20, (500, 375), seed=9)  # the images the corrupted set was made from
    _jpegs(root / "small", SMALL, (500, 375), seed=4)  # for reproduce: smaller than every size of its protocol
    classifier = random_state(torchvision_layout("bottleneck", (3, 4, 6, 3), num_classes=CLASSES), seed=1)
    robustness_file(root / "imagenet_l2_3_0.pt", classifier, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return root


def _ok(capsys, *argv):
    code, out, err = run_cli(capsys, *[str(a) for a in argv])
    assert code == 0, err
    return out


def test_imagenet_shapes_every_command(imagenet, tmp_path, capsys, one_thread):
    model, val, cset = imagenet / "imagenet_l2_3_0.pt", imagenet / "val", imagenet / "imagenet-c"
    common = ["--model", model, "--device", "cpu", "--threads", "1", "--quiet", "--workers", "2",
              "--cache", tmp_path / "cache"]
    data = ["--data", f"folder:{val}"]
    _ok(capsys, "noise", *common, *data, "--images", 16, "--sigmas", "0.25", "--runs", 1, "--batch-size", 8,
        "--out", tmp_path / "noise.json")
    res = json.loads((tmp_path / "noise.json").read_text())
    assert res["inputs"]["data"]["image_shape"] == [3, 224, 224]
    assert res["inputs"]["models"][0]["arch"] == "resnet50"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the folder decoded once, into the cache
    _ok(capsys, "certify", *common, *data, "--images", 2, "--sigmas", "0.25", "--samples", 20, "--n0", 10,
        "--sample-batch", 10, "--no-compile", "--out", tmp_path / "cert.tsv")
    _ok(capsys, "attack", *common, *data, "--images", 4, "--batch-size", 4, "--runs", 1, "--steps", 2,
        "--eot-m", 1, "--threat", "l2", "--eps", 3.0, "--out", tmp_path / "attack.json")
    _ok(capsys, "corruptions", "evaluate", *common, "--data", f"imagenet-c:{cset}", "--clean", f"folder:{imagenet / 'clean'}",
        "--images", 8, "--batch-size", 8, "--runs", 1, "--out", tmp_path / "corr.json")
    _ok(capsys, "stream", *common, *data, "--images", 32, "--batch-sizes", 16, "--runs", 1,
        "--out", tmp_path / "stream.json")


def test_cifar_shapes_preact_resnet18(tmp_path, capsys, one_thread):
    _jpegs(tmp_path / "cifar", 60, (32, 32), seed=3)
    sd = random_state(rice_layout("basic", (2, 2, 2, 2), num_classes=CLASSES), seed=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "test_robust_acc": 0.5},
               tmp_path / "model_best.pth")
    common = ["--model", tmp_path / "model_best.pth", "--data", f"folder:{tmp_path / 'cifar'}", "--device", "cpu",
              "--threads", "1", "--quiet", "--workers", "2"]
    _ok(capsys, "noise", *common, "--sigmas", "0,0.25", "--runs", 1, "--batch-size", 20, "--out", tmp_path / "n.json")
    assert json.loads((tmp_path / "n.json").read_text())["inputs"]["data"]["image_shape"] == [3, 32, 32]
    _ok(capsys, "attack", *common, "--images", 10, "--batch-size", 10, "--runs", 1, "--steps", 2, "--eot-m", 1,
        "--threat", "linf", "--eps", 0.03,
        "--out", tmp_path / "a.json")
    _ok(capsys, "stream", *common, "--batch-sizes", 10, "--runs", 1, "--out", tmp_path / "s.json")


def _complete_noise_group(folder, n, model_names):
    """The noise group's three result files, complete: on all ``n`` images (the sweeps' 2,000 capped at the
    set), every model at every sigma of the quick protocol and every value its sweeps record, each cell with
    all its runs, and each standalone command naming the count used."""
    from bnadapt.stages import PROTOCOLS

    quick = PROTOCOLS["quick"]
    t1 = read_result(folder / "noise" / "table1.json", "noise_table")
    assert t1["inputs"]["data"]["n"] == n and t1["inputs"]["params"]["sigmas"] == quick["noise"]["sigmas"]
    assert [(r["model"], r["sigma"]) for r in t1["results"]["rows"]] == [(m, s) for m in model_names
                                                                        for s in quick["noise"]["sigmas"]]
    for r in t1["results"]["rows"]:
        assert len(r["standard"]["runs"]) == len(r["adapted"]["runs"]) == quick["noise"]["runs"]
    t4 = read_result(folder / "noise" / "table4_rho.json", "sweep_rho")
    t5 = read_result(folder / "noise" / "table5_batch.json", "sweep_batch_size")
    for d, key in ((t4, "rho"), (t5, "batch_size")):
        assert d["inputs"]["data"]["n"] == n and d["inputs"]["data"]["images"] == n  # the protocol's 2000, capped
        (argv,) = d["run"]["commands"]
        assert argv[argv.index("--images") + 1] == str(n)
        assert [r["model"] for r in d["results"]["rows"]] == list(model_names)
        for r in d["results"]["rows"]:
            assert [c[key] for c in r["settings"]] == d["inputs"]["params"]["values"] and r["settings"]
            assert all(len(c["runs"]) == quick["sweep"]["runs"] for c in [r["no_adaptation"], *r["settings"]])
    return t1, t4, t5


def test_imagenet_shapes_reproduce_noise_group(imagenet, tmp_path, capsys, one_thread):
    """``bnadapt reproduce --stages noise`` (Table 1, Tables 4 and 5 at the quick protocol's sizes) on
    500x375 JPEGs with the robustness-library ResNet-50: the set (12 images) is smaller than every size of
    the protocol and is used whole; the stage files, figures and report are written, and a second run
    skips every stage."""
    out = tmp_path / "out"
    argv = ["reproduce", "--model", imagenet / "imagenet_l2_3_0.pt", "--data", f"folder:{imagenet / 'small'}",
            "--stages", "noise", "--device", "cpu", "--threads", "1", "--quiet", "--workers", "2",
            "--cache", tmp_path / "cache", "--out", out]
    _ok(capsys, *argv)
    t1, t4, t5 = _complete_noise_group(out, SMALL, ["imagenet_l2_3_0"])
    assert t1["inputs"]["data"]["image_shape"] == [3, 224, 224]
    assert t1["inputs"]["models"][0]["arch"] == "resnet50"
    manifest = read_result(out / "reproduce.json", "reproduce")
    assert [(s["stage"], s["status"]) for s in manifest["results"]["stages"]] == [
        ("noise", "ran"), ("sweep_rho", "ran"), ("sweep_batch-size", "ran")]
    md = (out / "report.md").read_text()
    for heading in ("## Table 1", "## Table 4", "## Table 5", "## The paper's claims, measured here"):
        assert heading in md, heading
    for fig in ("sweep_rho.png", "sweep_batch_size.png"):
        assert (out / "figures" / fig).read_bytes().startswith(b"\x89PNG"), fig
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # a rerun: the same inputs hashes, every stage skipped, no stage file touched; the report written again
    files = [out / "noise" / f for f in ("table1.json", "table4_rho.json", "table5_batch.json")]
    stamps = {f: (f.stat().st_mtime_ns, read_result(f)["run"]["stage_inputs_sha256"]) for f in files}
    (out / "report.md").unlink()
    _ok(capsys, *argv)
    manifest = read_result(out / "reproduce.json", "reproduce")
    assert {s["status"] for s in manifest["results"]["stages"]} == {"cached"}
    assert {f: (f.stat().st_mtime_ns, read_result(f)["run"]["stage_inputs_sha256"]) for f in files} == stamps
    again = (out / "report.md").read_text()
    assert "| noise | cached |" in again and again.split("## Table 1")[1] == md.split("## Table 1")[1]


def test_reproduce_noise_group_on_a_set_smaller_than_the_protocol(tmp_path, capsys, one_thread):
    """The quick protocol's own sizes (Tables 4 and 5 on 2,000 images) on 40 images: the set is used whole
    and each stage's standalone command gives its result (the same inputs hash and numbers). Before the
    fix: "cannot pick 2000 images with at most 17 per class: only 40 qualify"."""
    from tests.conftest import make_tiny_files

    _, data, ck = make_tiny_files(tmp_path, 40, recipe={"name": "pgd-linf", "threat_model": "linf", "eps": 0.05})
    out = tmp_path / "out"
    _ok(capsys, "reproduce", "--model", ck, "--data", data, "--stages", "noise", "--device", "cpu", "--quiet",
        "--out", out)
    for d in _complete_noise_group(out, 40, ["tiny"]):
        (argv,) = d["run"]["commands"]
        assert argv[0] == "bnadapt"
        alone = tmp_path / "alone.json"
        _ok(capsys, *argv[1:argv.index("--out")], "--quiet", "--out", alone)
        again = read_result(alone)
        assert again["inputs_sha256"] == d["inputs_sha256"] and again["results"] == d["results"], argv


def test_cifar_shapes_robustbench_wide_resnet(tmp_path, capsys, one_thread):
    """A RobustBench WideResNet checkpoint (robustbench/model_zoo/architectures/wide_resnet.py's keys; WRN-16-2,
    since WRN-28-10 is too slow here; the architecture told from the keys, no normalization) on 32x32 PNGs
    in CIFAR-10 class folders: noise, attack and stream."""
    _cifar_pngs(tmp_path / "cifar", 60, seed=6)
    torch.save(random_state(wrn_layout(16, 2, num_classes=CLASSES), seed=7), tmp_path / "Standard.pt")
    common = ["--model", tmp_path / "Standard.pt", "--data", f"folder:{tmp_path / 'cifar'}", "--device", "cpu",
              "--threads", "1", "--quiet", "--workers", "2", "--cache", tmp_path / "cache"]
    _ok(capsys, "noise", *common, "--sigmas", "0,0.25", "--runs", 1, "--batch-size", 20, "--out", tmp_path / "n.json")
    res = read_result(tmp_path / "n.json", "noise_table")
    assert res["inputs"]["data"]["image_shape"] == [3, 32, 32] and res["inputs"]["data"]["n"] == 60
    model = res["inputs"]["models"][0]
    assert model["arch"] == "wide_resnet" and model["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert len(res["results"]["rows"]) == 2
    _ok(capsys, "attack", *common, "--images", 10, "--batch-size", 10, "--runs", 1, "--steps", 2, "--eot-m", 1,
        "--threat", "linf", "--eps", 0.03, "--out", tmp_path / "a.json")
    assert read_result(tmp_path / "a.json")["inputs"]["data"]["n"] == 10
    _ok(capsys, "stream", *common, "--batch-sizes", 10, "--runs", 1, "--out", tmp_path / "s.json")
    assert read_result(tmp_path / "s.json")["inputs"]["data"]["n"] == 60
