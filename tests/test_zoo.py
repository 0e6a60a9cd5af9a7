"""The shipped Fashion-MNIST zoo: every file loads, is small, and its card's clean accuracy is
reproduced on the 10,000 test images to within 0.2 points."""

import json
from pathlib import Path

import pytest

from bnadapt.models import ZOO_DIR, load_model, zoo_names

ZOO = ["baseline", "gaussian-0.5", "adv-linf-0.1", "adv-l2-1.5"]
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_zoo_has_the_four_models():
    assert set(ZOO) <= set(zoo_names())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_loads_and_card_is_complete(name):
    path = ZOO_DIR / f"{name}.safetensors"
    assert path.stat().st_size <= 2_000_000
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("arch", "arch_args", "input_shape", "class_names", "recipe", "metrics", "training"):
        assert key in card, key
    assert all(0.0 <= v <= 1.0 for v in card["metrics"].values())
    loaded = load_model(f"zoo:{name}")
    assert loaded.sha256 == card["weights_sha256"]


@pytest.mark.skipif(not FMNIST.exists(), reason="needs the dataset-fashion-mnist package")
@pytest.mark.parametrize("name", ZOO)
def test_zoo_clean_accuracy_reproduced(name):
    from bnadapt.data import load_fashion_mnist
    from bnadapt.train import clean_accuracy

    import numpy as np

    loaded = load_model(f"zoo:{name}")
    ds = load_fashion_mnist("test")
    acc = clean_accuracy(loaded.model, ds, np.arange(len(ds)))
    assert abs(acc - loaded.card["metrics"]["clean_acc"]) <= 0.002
