import json

import pytest
import torch
from torch import nn

from bnadapt.errors import BnadaptError
from bnadapt.models import PreActResNet, ResNet50, build_model, load_model, save_checkpoint

TORCHVISION_RESNET50_KEYS_SAMPLE = [
    "conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
    "layer2.3.conv3.weight", "layer3.5.bn2.num_batches_tracked", "layer4.2.bn3.bias", "fc.weight", "fc.bias",
]


def tiny(seed=0):
    torch.manual_seed(seed)
    return PreActResNet(in_channels=1, num_classes=3, widths=(4, 8), depth=1).eval()


CARD = {"arch": "preact_resnet", "arch_args": {"in_channels": 1, "num_classes": 3, "widths": [4, 8], "depth": 1},
        "input_shape": [1, 12, 12], "class_names": ["a", "b", "c"]}


def test_preact_resnet_shapes_and_bn():
    m = PreActResNet(in_channels=3, num_classes=10, widths=(8, 16, 32), depth=2)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert PreActResNet(depth=2)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert 170_000 < sum(p.numel() for p in PreActResNet(depth=2).parameters()) < 180_000


def test_resnet50_matches_torchvision_layout():
    m = ResNet50()
    sd = m.state_dict()
    assert len(sd) == 320  # torchvision resnet50 has 320 state-dict entries
    for k in TORCHVISION_RESNET50_KEYS_SAMPLE:
        assert k in sd
    assert sum(p.numel() for p in m.parameters()) == 25_557_032
    assert not any("normalize" in k for k in sd)


def test_normalization_is_inside_the_model():
    m = tiny()
    assert "normalize.mean" not in m.state_dict()
    assert torch.allclose(m.normalize(torch.full((1, 1, 2, 2), 0.5)), torch.zeros(1, 1, 2, 2))


def test_checkpoint_roundtrip(tmp_path):
    m = tiny()
    path = save_checkpoint(tmp_path / "m.safetensors", m, CARD)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["weights_sha256"] and card["arch"] == "preact_resnet"
    loaded = load_model(str(path))
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(loaded.model(x), m(x))
    assert loaded.input_shape == (1, 12, 12) and loaded.num_classes == 3


def test_state_dict_pt_with_prefix_and_torchscript(tmp_path):
    m = tiny()
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    loaded = load_model(str(tmp_path / "w.pth"), arch="preact_resnet", arch_args=CARD["arch_args"])
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(loaded.model(x), m(x))
    with pytest.raises(BnadaptError, match="--arch"):
        load_model(str(tmp_path / "w.pth"))
    ts = torch.jit.trace(m, x)
    torch.jit.save(ts, str(tmp_path / "m.ts"))
    lt = load_model(str(tmp_path / "m.ts"))
    assert torch.allclose(lt.model(x), m(x))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BnadaptError, match="weights only"):
        load_model(str(tmp_path / "evil.pt"), arch="preact_resnet")


def test_factory_spec():
    loaded = load_model("tests.conftest:make_trained_bn_model")
    assert isinstance(loaded.model, nn.Module)


def test_bad_inputs(tmp_path):
    with pytest.raises(BnadaptError, match="unknown architecture"):
        build_model("vgg")
    with pytest.raises(BnadaptError, match="not found"):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(BnadaptError, match="no zoo model"):
        load_model("zoo:nope")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    (tmp_path / "bad.json").write_text(json.dumps(CARD))
    with pytest.raises(BnadaptError, match="corrupt"):
        load_model(str(bad))
    path = save_checkpoint(tmp_path / "m.safetensors", tiny(), CARD)
    other = dict(CARD, arch_args=dict(CARD["arch_args"], widths=[4, 4]))
    path.with_suffix(".json").write_text(json.dumps(other))
    with pytest.raises(BnadaptError, match="wrong shapes|do not fit"):
        load_model(str(path))
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(BnadaptError, match="not valid JSON"):
        load_model(str(path))
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(BnadaptError, match="do not fit"):
        load_model(str(tmp_path / "w.pt"), arch="preact_resnet")
