"""Real shapes end to end, on the CPU: a few hundred 500x375 JPEGs in the ImageNet validation layout and
an ImageNet-C-layout folder, a randomly initialised robustness-library ResNet-50 checkpoint, and every
user command on them (tiny sizes: the shapes are real, the counts are not); then the same for a
CIFAR-shaped PreActResNet-18 (Rice et al.'s layout)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.test_checkpoint_formats import random_state, rice_layout, robustness_file, torchvision_layout

CLASSES = 10
CORRUPTIONS = ("gaussian_noise", "contrast")


def _jpegs(root, n, size, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"n{i % CLASSES:08d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(d / f"ILSVRC_val_{i:05d}.JPEG",
                                                                            quality=85)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _jpegs(root / "val", 200, (500, 375), seed=0)
    for c in CORRUPTIONS:  # ImageNet-C: <corruption>/<severity>/<class>/<image>, 224 px JPEGs
        for s in range(1, 6):
            _jpegs(root / "imagenet-c" / c / str(s), 20, (224, 224), seed=s)
    _jpegs(root / "clean", 20, (500, 375), seed=9)  # the images the corrupted set was made from
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
