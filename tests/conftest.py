import pytest
import torch
from torch import nn

torch.set_num_threads(2)


def make_trained_bn_model(seed: int = 0, in_ch: int = 1, widths=(4, 8), depth: int = 1) -> nn.Module:
    """A tiny PreActResNet whose BN running statistics differ from fresh ones (eval mode)."""
    from bnadapt.models import PreActResNet

    torch.manual_seed(seed)
    m = PreActResNet(in_channels=in_ch, num_classes=3, widths=widths, depth=depth)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, in_ch, 12, 12) * 0.5)
    return m.eval()


@pytest.fixture
def bn_model():
    return make_trained_bn_model()


TINY_ARCH_ARGS = {"in_channels": 1, "num_classes": 3, "widths": [4, 8], "depth": 1}


def make_tiny_files(tmp_path, n_images: int = 40, warm_bn: bool = True, recipe: dict | None = None):
    """A tiny npz data set (uint8 NHWC 12x12, 3 classes) and a tiny checkpoint for CLI tests (its card
    holds ``recipe`` when given, e.g. a threat model): returns (tmp_path, data path, checkpoint path)."""
    import numpy as np

    from bnadapt.models import PreActResNet, save_checkpoint

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n_images, 12, 12, 1), dtype=np.uint8)
    y = rng.integers(0, 3, size=n_images)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.manual_seed(0)
    m = PreActResNet(**TINY_ARCH_ARGS)
    if warm_bn:  # running statistics that differ from fresh ones
        m.train()
        with torch.no_grad():
            m(torch.rand(32, 1, 12, 12) * 0.3)
    card = {"arch": "preact_resnet", "arch_args": TINY_ARCH_ARGS, "input_shape": [1, 12, 12], "name": "tiny"}
    if recipe is not None:
        card["recipe"] = recipe
    ck = save_checkpoint(tmp_path / "m.safetensors", m.eval(), card)
    return tmp_path, str(tmp_path / "d.npz"), str(ck)


def run_cli(capsys, *argv):
    """``bnadapt ARGV`` in-process: (exit code, stdout, stderr)."""
    from bnadapt.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def bad_cli(capsys, tmp, *argv):
    """``bnadapt ARGV --out tmp/bad.json`` must fail as bad input: exit 2, one ``error:`` line, no file."""
    out = tmp / "bad.json"
    code, _, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


@pytest.fixture
def one_thread():
    """One torch thread for these tiny workloads: on a shared 2-core machine two threads contend for the
    cores and a forward of a few 12x12 images becomes 100x slower (measured: 11.6 s vs 0.07 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
