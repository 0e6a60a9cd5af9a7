"""The literature's checkpoint files (issue 16 item 1, issue 19 item 3): each written here in its published
key layout with random weights, loaded with `--model FILE` (the architecture told from the keys), and its
outputs compared with a reference forward written from the published code's definition (functional, from
the state dict itself), with the normalization the file or `--normalize` names."""

import argparse
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnadapt.cli import main
from bnadapt.errors import BnadaptError
from bnadapt.models import ARCHITECTURES, PreActResNet, build_model, detect_arch, load_model, save_checkpoint
from bnadapt.models.checkpoint import summarize
from bnadapt.results import read_result

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616])


# ----------------------------------------------------------------------------------------- published layouts
def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_layout(block, layers, width_per_group=64, num_classes=1000):
    """torchvision.models.resnet: conv1, bn1, layerN.M.{conv,bn}K, downsample.0/1, fc."""
    exp = 1 if block == "basic" else 4
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(n):
            stride = 2 if i > 1 and j == 0 else 1
            pre = f"layer{i}.{j}"
            if block == "basic":
                keys.update({f"{pre}.conv1.weight": (planes, inplanes, 3, 3), **_bn(f"{pre}.bn1", planes),
                             f"{pre}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{pre}.bn2", planes)})
            else:
                w = planes * width_per_group // 64
                keys.update({f"{pre}.conv1.weight": (w, inplanes, 1, 1), **_bn(f"{pre}.bn1", w),
                             f"{pre}.conv2.weight": (w, w, 3, 3), **_bn(f"{pre}.bn2", w),
                             f"{pre}.conv3.weight": (planes * 4, w, 1, 1), **_bn(f"{pre}.bn3", planes * 4)})
            if j == 0 and (stride != 1 or inplanes != planes * exp):
                keys.update({f"{pre}.downsample.0.weight": (planes * exp, inplanes, 1, 1),
                             **_bn(f"{pre}.downsample.1", planes * exp)})
            inplanes = planes * exp
    keys.update({"fc.weight": (num_classes, 512 * exp), "fc.bias": (num_classes,)})
    return keys


def rice_layout(block, blocks, num_classes=10):
    """locuslab/robust_overfitting preactresnet.py: conv1, layerN.M.{bn,conv}K, shortcut.0, bn, linear."""
    exp = 1 if block == "basic" else 4
    keys = {"conv1.weight": (64, 3, 3, 3)}
    inp = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for j in range(n):
            stride = 2 if i > 1 and j == 0 else 1
            pre = f"layer{i}.{j}"
            if block == "basic":
                keys.update({**_bn(f"{pre}.bn1", inp), f"{pre}.conv1.weight": (planes, inp, 3, 3),
                             **_bn(f"{pre}.bn2", planes), f"{pre}.conv2.weight": (planes, planes, 3, 3)})
            else:
                keys.update({**_bn(f"{pre}.bn1", inp), f"{pre}.conv1.weight": (planes, inp, 1, 1),
                             **_bn(f"{pre}.bn2", planes), f"{pre}.conv2.weight": (planes, planes, 3, 3),
                             **_bn(f"{pre}.bn3", planes), f"{pre}.conv3.weight": (planes * 4, planes, 1, 1)})
            if stride != 1 or inp != planes * exp:
                keys[f"{pre}.shortcut.0.weight"] = (planes * exp, inp, 1, 1)
            inp = planes * exp
    keys.update({**_bn("bn", 512 * exp), "linear.weight": (num_classes, 512 * exp), "linear.bias": (num_classes,)})
    return keys


def wrn_layout(depth, widen, num_classes=10, sub_block1=False, bias_last=True):
    """robustbench/model_zoo/architectures/wide_resnet.py: conv1, blockG.layer.M.{bn1,conv1,bn2,conv2,
    convShortcut}, optional sub_block1, bn1, fc."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    keys = {"conv1.weight": (16, 3, 3, 3)}
    groups = [("block1", ch[0], ch[1])] + ([("sub_block1", ch[0], ch[1])] if sub_block1 else [])
    for name, cin, cout in groups + [("block2", ch[1], ch[2]), ("block3", ch[2], ch[3])]:
        for j in range(n):
            i_ = cin if j == 0 else cout
            pre = f"{name}.layer.{j}"
            keys.update({**_bn(f"{pre}.bn1", i_), f"{pre}.conv1.weight": (cout, i_, 3, 3),
                         **_bn(f"{pre}.bn2", cout), f"{pre}.conv2.weight": (cout, cout, 3, 3)})
            if i_ != cout:
                keys[f"{pre}.convShortcut.weight"] = (cout, i_, 1, 1)
    keys.update({**_bn("bn1", ch[3]), "fc.weight": (num_classes, ch[3])})
    if bias_last:
        keys["fc.bias"] = (num_classes,)
    return keys


EXPECTED = {
    "resnet18": lambda: torchvision_layout("basic", (2, 2, 2, 2)),
    "resnet34": lambda: torchvision_layout("basic", (3, 4, 6, 3)),
    "resnet50": lambda: torchvision_layout("bottleneck", (3, 4, 6, 3)),
    "resnet101": lambda: torchvision_layout("bottleneck", (3, 4, 23, 3)),
    "resnet152": lambda: torchvision_layout("bottleneck", (3, 8, 36, 3)),
    "wide_resnet50_2": lambda: torchvision_layout("bottleneck", (3, 4, 6, 3), 128),
    "wide_resnet101_2": lambda: torchvision_layout("bottleneck", (3, 4, 23, 3), 128),
    "preact_resnet18": lambda: rice_layout("basic", (2, 2, 2, 2)),
    "preact_resnet34": lambda: rice_layout("basic", (3, 4, 6, 3)),
    "preact_resnet50": lambda: rice_layout("bottleneck", (3, 4, 6, 3)),
    "preact_resnet101": lambda: rice_layout("bottleneck", (3, 4, 23, 3)),
    "preact_resnet152": lambda: rice_layout("bottleneck", (3, 8, 36, 3)),
    "wrn_28_10": lambda: wrn_layout(28, 10),
    "wrn_34_10": lambda: wrn_layout(34, 10),
    "wrn_70_16": lambda: wrn_layout(70, 16),
    "wide_resnet": lambda: wrn_layout(28, 10),
}


def random_state(layout, seed=0):
    """Random weights in a layout: positive running variances, integer batch counters."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7, dtype=torch.int64)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", ".bias")):
            state[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif len(shape) == 1:  # BN weight
            state[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[k] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return state


def meta_state(layout):
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


# ----------------------------------------------------------------------------------------- reference forwards
def _bnf(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)


def _norm(x, mean_std):
    if mean_std is None:
        return x
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in mean_std)
    return (x - m) / s


def ref_torchvision_basic(sd, x):
    out = F.max_pool2d(F.relu(_bnf(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in sd:
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            y = F.relu(_bnf(sd, f"{p}.bn1", F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            y = _bnf(sd, f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1))
            idn = out
            if f"{p}.downsample.0.weight" in sd:
                idn = _bnf(sd, f"{p}.downsample.1", F.conv2d(out, sd[f"{p}.downsample.0.weight"], stride=stride))
            out = F.relu(y + idn)
            j += 1
    return F.linear(F.adaptive_avg_pool2d(out, 1).flatten(1), sd["fc.weight"], sd["fc.bias"])


def ref_rice_basic(sd, x):
    """As published: conv1, pre-activation blocks, relu(bn), avg_pool2d(4) (32x32 inputs), linear."""
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in sd:
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            a = F.relu(_bnf(sd, f"{p}.bn1", out))
            sc = F.conv2d(a, sd[f"{p}.shortcut.0.weight"], stride=stride) if f"{p}.shortcut.0.weight" in sd else out
            y = F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            y = F.conv2d(F.relu(_bnf(sd, f"{p}.bn2", y)), sd[f"{p}.conv2.weight"], padding=1)
            out = y + sc
            j += 1
    out = F.avg_pool2d(F.relu(_bnf(sd, "bn", out)), 4)
    return F.linear(out.view(out.size(0), -1), sd["linear.weight"], sd["linear.bias"])


def ref_wrn(sd, x):
    """As published: equalInOut blocks add the raw input, others the shortcut of the pre-activated one;
    avg_pool2d(8) (32x32 inputs)."""
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for g, first_stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        j = 0
        while f"{g}.layer.{j}.conv1.weight" in sd:
            p, stride = f"{g}.layer.{j}", first_stride if j == 0 else 1
            equal = f"{p}.convShortcut.weight" not in sd
            if not equal:
                out = F.relu(_bnf(sd, f"{p}.bn1", out))
                a = out
            else:
                a = F.relu(_bnf(sd, f"{p}.bn1", out))
            y = F.relu(_bnf(sd, f"{p}.bn2", F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            y = F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1)
            out = (out if equal else F.conv2d(out, sd[f"{p}.convShortcut.weight"], stride=stride)) + y
            j += 1
    out = F.avg_pool2d(F.relu(_bnf(sd, "bn1", out)), 8)
    return F.linear(out.view(out.size(0), -1), sd["fc.weight"], sd.get("fc.bias"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- layouts of every named arch
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_arch_has_the_published_layout(name):
    with torch.device("meta"):
        model = build_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == EXPECTED[name](), name
    if name != "wide_resnet":  # the generic family defaults to WRN-28-10's keys; it needs depth/widen to be told
        assert detect_arch(meta_state(EXPECTED[name]()), "f") == (name, {})


def test_parameter_counts_of_torchvision_and_robustbench_models():
    counts = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
              "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
              "wrn_28_10": 36_479_194, "wrn_34_10": 46_160_474}
    for name, n in counts.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in build_model(name).parameters()) == n, name


def test_detection_reads_classes_and_variants_from_shapes():
    assert detect_arch(meta_state(torchvision_layout("bottleneck", (3, 4, 6, 3), num_classes=10)), "f") == \
        ("resnet50", {"num_classes": 10})
    assert detect_arch(meta_state(rice_layout("basic", (2, 2, 2, 2), num_classes=100)), "f") == \
        ("preact_resnet18", {"num_classes": 100})
    assert detect_arch(meta_state(wrn_layout(34, 20, sub_block1=True, bias_last=False)), "f") == \
        ("wide_resnet", {"depth": 34, "widen_factor": 20, "sub_block1": True, "bias_last": False})
    assert detect_arch(meta_state(wrn_layout(28, 10, num_classes=100, sub_block1=True)), "f") == \
        ("wrn_28_10", {"num_classes": 100, "sub_block1": True})


# ----------------------------------------------------------------------------------------- robustness library
def robustness_file(path, classifier, mean, std, *, container="model", attacker_seed=99):
    """The robustness library's train.py checkpoint: {'model', 'optimizer', 'schedule', 'epoch', 'amp'}, the
    AttackerModel's state under DataParallel's 'module.' prefix."""
    sd = {}
    for k, v in classifier.items():
        sd[f"module.model.{k}"] = v
    # The attacker's copy: the same module in the library; different values here prove it is dropped.
    for k, v in random_state({k: tuple(v.shape) for k, v in classifier.items()}, attacker_seed).items():
        sd[f"module.attacker.model.{k}"] = v
    for pre in ("module.normalizer", "module.attacker.normalizer"):
        sd[f"{pre}.new_mean"] = torch.tensor(mean).view(3, 1, 1)
        sd[f"{pre}.new_std"] = torch.tensor(std).view(3, 1, 1)
    torch.save({container: sd,
                "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                              "param_groups": [{"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4,
                                                "nesterov": False, "params": [0]}]},
                "schedule": {"step_size": 50, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": 90},
                "epoch": 90, "amp": None}, path)
    return path


@pytest.mark.parametrize("container", ["model", "state_dict"])
def test_robustness_checkpoint_loads_without_arch(tmp_path, container, capsys):
    classifier = random_state(torchvision_layout("basic", (2, 2, 2, 2), num_classes=10))
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.201]
    path = robustness_file(tmp_path / "checkpoint.pt.best", classifier, mean, std, container=container)
    loaded = load_model(str(path))
    assert loaded.card["arch"] == "resnet18" and loaded.card["arch_args"]["num_classes"] == 10
    assert loaded.extra["format"]["format"] == "robustness" and loaded.extra["format"]["epoch"] == 90
    assert loaded.extra["format"]["dropped"] == ["attacker.*", "normalizer.*"]
    assert torch.allclose(loaded.model.normalize.mean.flatten(), torch.tensor(mean))
    assert torch.allclose(loaded.model.normalize.std.flatten(), torch.tensor(std))
    with torch.no_grad():
        assert torch.allclose(loaded.model(X), ref_torchvision_basic(classifier, _norm(X, (mean, std))), atol=1e-5)
    assert loaded.describe()["normalization"] == {"mean": mean, "std": std}
    assert "robustness" in loaded.card["normalization"]["source"]
    # An adapted or re-saved copy keeps the normalization (it is in the card's arch_args).
    again = load_model(str(save_checkpoint(tmp_path / "copy.safetensors", loaded.model, loaded.card)))
    with torch.no_grad():
        assert torch.equal(again.model(X), loaded.model(X))

    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["format"].startswith("robustness") and s["arch"] == "resnet18" and s["arch_detected"]
    assert s["epoch"] == 90 and s["dropped"] == ["attacker.*", "normalizer.*"] and s["classes"] == 10
    assert s["normalization"]["mean"] == mean and s["parameters"] == 11_181_642 and s["bn_layers"] == 20
    assert s["input_shape"] == [3, None, None]
    code, out, err = run(capsys, "inspect", path)
    assert code == 0 and "detected from the keys" in out and "epoch 90" in out and "0.2023" in out, out

    code, _, err = run(capsys, "inspect", path, "--normalize", "imagenet")
    one_line_error(code, err, "normalizer", "--normalize")  # the file says otherwise
    code, out, err = run(capsys, "inspect", path, "--normalize", ",".join(map(str, mean)) + "/" + ",".join(map(str, std)))
    assert code == 0, err


# ----------------------------------------------------------------------------------------- torchvision
def test_torchvision_state_dict_with_and_without_normalize(tmp_path, capsys):
    sd = random_state(torchvision_layout("basic", (2, 2, 2, 2)), seed=3)
    torch.save(sd, tmp_path / "resnet18.pth")
    loaded = load_model(str(tmp_path / "resnet18.pth"))
    assert loaded.card["arch"] == "resnet18" and loaded.card["arch_args"] == {"mean": IMAGENET[0], "std": IMAGENET[1]}
    assert loaded.card["normalization"]["source"].startswith("default of resnet18")
    with torch.no_grad():
        assert torch.allclose(loaded.model(X), ref_torchvision_basic(sd, _norm(X, IMAGENET)), atol=1e-5)
        plain = load_model(str(tmp_path / "resnet18.pth"), normalize="none")
        assert torch.allclose(plain.model(X), ref_torchvision_basic(sd, X), atol=1e-5)
    assert plain.card["normalization"]["source"] == "--normalize none"
    assert plain.describe()["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert plain.describe() != loaded.describe()
    assert load_model(str(tmp_path / "resnet18.pth"), normalize="imagenet").describe() == loaded.describe()
    # --arch naming the same architecture takes the file's class count from its shapes.
    assert load_model(str(tmp_path / "resnet18.pth"), arch="resnet18").card["arch"] == "resnet18"
    code, out, err = run(capsys, "inspect", tmp_path / "resnet18.pth", "--normalize", "none", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["arch"] == "resnet18" and s["classes"] == 1000 and s["parameters"] == 11_689_512
    assert s["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3, "source": "--normalize none"}


# ----------------------------------------------------------------------------------------- Rice et al.
def test_rice_preact_resnet18_through_the_cli(tmp_path, capsys):
    sd = random_state(rice_layout("basic", (2, 2, 2, 2)), seed=5)
    # train_cifar.py's model_best.pth: the DataParallel state dict plus float metrics.
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "test_robust_acc": 0.53,
                "test_robust_loss": 1.2, "test_loss": 0.6, "test_acc": 0.82}, tmp_path / "model_best.pth")
    loaded = load_model(str(tmp_path / "model_best.pth"))
    assert loaded.card["arch"] == "preact_resnet18" and loaded.extra["format"]["container"] == "state_dict"
    with torch.no_grad():
        assert torch.allclose(loaded.model(X), ref_rice_basic(sd, _norm(X, CIFAR10)), atol=1e-5)
        other = load_model(str(tmp_path / "model_best.pth"), normalize="0.5,0.5,0.5/0.25,0.25,0.25")
        assert torch.allclose(other.model(X), ref_rice_basic(sd, _norm(X, ([0.5] * 3, [0.25] * 3))), atol=1e-5)

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 4))
    common = ["noise", "--model", tmp_path / "model_best.pth", "--data", tmp_path / "c.npz", "--runs", "1",
              "--batch-size", "4", "--sigmas", "0", "--quiet", "--device", "cpu"]
    hashes = []
    for extra in ([], ["--normalize", "cifar10"], ["--normalize", "none"]):
        code, _, err = run(capsys, *common, *extra, "--out", tmp_path / "r.json")
        assert code == 0, err
        res = read_result(tmp_path / "r.json")
        hashes.append(res["inputs_sha256"])
        model = res["inputs"]["models"][0]
        assert model["arch"] == "preact_resnet18" and model["normalization"]["mean"] == (
            [0.0, 0.0, 0.0] if extra[-1:] == ["none"] else CIFAR10[0])
    assert hashes[0] == hashes[1] != hashes[2]  # Rice's default is cifar10: the same numbers, the same hash


# ----------------------------------------------------------------------------------------- RobustBench WideResNet
@pytest.mark.parametrize("sub_block1,bias_last", [(False, True), (True, False)])
def test_robustbench_wide_resnet(tmp_path, capsys, sub_block1, bias_last):
    sd = random_state(wrn_layout(16, 2, sub_block1=sub_block1, bias_last=bias_last), seed=7)
    torch.save(sd, tmp_path / "wrn.pt")
    loaded = load_model(str(tmp_path / "wrn.pt"))
    assert loaded.card["arch"] == "wide_resnet" and loaded.card["arch_args"]["depth"] == 16
    assert loaded.card["arch_args"]["widen_factor"] == 2
    with torch.no_grad():
        assert torch.allclose(loaded.model(X), ref_wrn(sd, X), atol=1e-5)  # [0, 1] pixels: no normalization
    code, out, err = run(capsys, "inspect", tmp_path / "wrn.pt")
    assert code == 0 and "wide_resnet" in out and "none (RobustBench)" in out, err


# ----------------------------------------------------------------------------------------- ambiguous and bad input
def test_ambiguous_and_unknown_layouts_ask_for_arch(tmp_path, capsys):
    args = {"in_channels": 3, "num_classes": 3, "widths": [4, 8], "depth": 1}
    torch.save(PreActResNet(**args).state_dict(), tmp_path / "ours.pt")
    code, _, err = run(capsys, "inspect", tmp_path / "ours.pt")
    one_line_error(code, err, "ambiguous", "--arch")
    code, out, err = run(capsys, "inspect", tmp_path / "ours.pt", "--arch", "preact_resnet", "--arch-args",
                         json.dumps(args))
    assert code == 0 and "from --arch" in out, err
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "odd.pt")
    one_line_error(*run(capsys, "inspect", tmp_path / "odd.pt")[::2], "--arch")
    odd = random_state(torchvision_layout("basic", (1, 1, 1, 1)))
    torch.save(odd, tmp_path / "tv.pt")
    one_line_error(*run(capsys, "inspect", tmp_path / "tv.pt")[::2], "[1, 1, 1, 1]", "--arch")
    with pytest.raises(BnadaptError, match="--arch"):
        load_model(str(tmp_path / "odd.pt"))


@pytest.mark.parametrize("bad,words", [("1,2/3", ["--normalize", "standard deviations"]),
                                        ("imagenett", ["--normalize", "imagenet, cifar10, none"]),
                                        ("0.5,0.5,0.5/0,1,1", ["--normalize", "positive"]),
                                        ("nan/1", ["--normalize", "finite"]),
                                        ("0.5,0.5/0.2,0.2", ["3-channel"])])
def test_bad_normalize_is_one_line(tmp_path, capsys, bad, words):
    torch.save(random_state(wrn_layout(10, 1)), tmp_path / "w.pt")
    one_line_error(*run(capsys, "inspect", tmp_path / "w.pt", "--normalize", bad)[::2], *words)


def test_normalize_validator_and_fixed_models(tmp_path):
    with pytest.raises(BnadaptError, match="^normalize must be"):
        load_model("zoo:adv-l2-1.5", normalize="bogus")
    with pytest.raises(BnadaptError, match="model factory"):
        load_model("tests.conftest:make_trained_bn_model", normalize="none")
    m = build_model("wide_resnet", {"depth": 10, "widen_factor": 1}).eval()
    torch.jit.save(torch.jit.trace(m, X), str(tmp_path / "m.ts"))
    with pytest.raises(BnadaptError, match="TorchScript"):
        load_model(str(tmp_path / "m.ts"), normalize="cifar10")
    assert "normalization" not in load_model("zoo:adv-l2-1.5").describe()  # the zoo's inputs hashes stay


# ----------------------------------------------------------------------------------------- issue 19 item 3
def test_refused_pickle_is_one_line_in_our_words(tmp_path, capsys):
    sd = random_state(wrn_layout(10, 1))
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1, arch="resnet18")}, tmp_path / "ns.pt")
    # A legacy-format file with pickle protocol 4: torch warns before it refuses.
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False, pickle_protocol=4)
    for name in ("ns.pt", "old.pt"):
        for argv in (["inspect", tmp_path / name], ["noise", "--model", tmp_path / name, "--arch", "wide_resnet"]):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                code, out, err = run(capsys, *argv)
            assert not caught, [str(w.message) for w in caught]
            line = one_line_error(code, err, "argparse.Namespace", "torch.save(ckpt['model']", "safetensors")
            assert "weights_only` set to `False" not in line and "weights_only=False" not in line
            assert "\x1b" not in line and "Warning" not in err


def test_unreadable_files_are_one_line(tmp_path, capsys):
    (tmp_path / "t.pt").write_text("not a checkpoint")
    one_line_error(*run(capsys, "inspect", tmp_path / "t.pt")[::2], "corrupt or not")
    torch.save({"model": {"a": [1, 2]}}, tmp_path / "l.pt")
    one_line_error(*run(capsys, "inspect", tmp_path / "l.pt")[::2], "state dict of tensors")


def test_every_architecture_name_is_listed():
    assert set(EXPECTED) | {"preact_resnet"} == set(ARCHITECTURES)
    s = summarize(load_model("zoo:adv-l2-1.5"))
    assert s["format"].startswith("bnadapt checkpoint") and s["normalization"]["source"] == "model card"
