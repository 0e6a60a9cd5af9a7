"""APGD-T (APGD on the targeted DLR loss over several target classes): the loss on hand-made logits,
the targets, outputs inside the threat model and the box, the best result across targets, whole
batches, no side effect, the protocol names and ``bnadapt attack``. Tiny models (tests/test_attacks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt.adapt import adapt
from bnadapt.attacks import Threat, judge_batch
from bnadapt.attacks.apgd import APGD, DEFAULT_TARGETS, apgd_t
from bnadapt.attacks.evaluate import Protocol, attack_names, make_attack
from bnadapt.attacks.losses import dlr, dlr_targeted, loss_name, targeted_dlr
from bnadapt.errors import BnadaptError
from bnadapt.results import read_result
from tests.conftest import bad_cli, make_tiny_files, run_cli
from tests.test_attacks import _synthetic, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0],    # y 0, target 2: -(3 - 2) / (3 - (1 + 0) / 2)
                       [1.0, 4.0, 0.0, 2.0, 3.0]])    # y 0, target 1: -(1 - 4) / (4 - (2 + 1) / 2)
Y = torch.tensor([0, 0])


def test_targeted_dlr_on_hand_made_logits():
    t = torch.tensor([2, 1])
    v = dlr_targeted(LOGITS, Y, t)
    assert torch.allclose(v, torch.tensor([-1.0 / 2.5, 3.0 / 2.5]))
    assert torch.equal(targeted_dlr(t)(LOGITS, Y), v) and loss_name(targeted_dlr(t)) == "dlr-targeted"
    assert torch.allclose(dlr_targeted(3.0 * LOGITS - 7.0, Y, t), v, atol=1e-6)  # shift- and scale-invariant
    assert torch.allclose(dlr_targeted(LOGITS[None], Y, t), v)  # an ensemble of one model: that model's
    assert float(v[1]) > 0 > float(v[0])  # positive exactly when the target's logit beats the true one
    with pytest.raises(BnadaptError, match="at least 4 classes"):
        dlr_targeted(LOGITS[:, :3], Y, t)
    with pytest.raises(BnadaptError, match="one target per image"):
        dlr_targeted(LOGITS, Y, torch.tensor([1]))


class _Fixed(nn.Module):
    """Returns the same logits whatever the input (for the targets)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("z", logits)

    def forward(self, x):
        return self.z[: x.shape[0]] + 0.0 * x.flatten(1)[:, :1]


def test_targets_are_the_most_likely_other_classes_of_the_clean_batch():
    x = torch.rand(2, 1, 4, 4)
    a = APGD(Threat("linf", 0.1), steps=2, loss="dlr-targeted")
    assert a.n_target == DEFAULT_TARGETS
    t = a.targets(_Fixed(LOGITS), x, Y)  # 5 classes: 9 targets capped at 4
    assert t.tolist() == [[2, 1], [1, 4], [3, 3], [4, 2]]
    # a misclassified image (y = 1, top class 0) never gets its own class as a target
    t = APGD(Threat("linf", 0.1), steps=2, loss="dlr-targeted", n_target=2).targets(_Fixed(LOGITS), x,
                                                                                    torch.tensor([1, 0]))
    assert t.tolist() == [[0, 1], [2, 4]]
    with pytest.raises(BnadaptError, match="at least 4 classes"):
        a.targets(_Fixed(LOGITS[:, :3]), x, Y)


def test_options_are_checked():
    th = Threat("linf", 0.1)
    for bad in (0, -1, 1.5):
        with pytest.raises(BnadaptError) as e:
            APGD(th, loss="dlr-targeted", n_target=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(BnadaptError, match="only to the dlr-targeted loss"):
        APGD(th, loss="ce", n_target=3)
    with pytest.raises(BnadaptError, match="unknown APGD loss"):
        APGD(th, loss="dlr-t")
    a = apgd_t(th, steps=7, n_target=3)
    assert a.targeted and a.n_target == 3 and a.steps == 7 and "n_target=3" in repr(a)
    d = a.describe()
    assert d["loss"] == "dlr-targeted" and d["targets"] == 3
    assert "targets" not in APGD(th, loss="dlr").describe() and not APGD(th, loss=dlr).targeted


def _inside(x, x_adv, threat: Threat) -> None:
    d = (x_adv.double() - x.double()).flatten(1)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if threat.norm.value == "linf":
        assert float(d.abs().max()) <= threat.eps + 1e-6
    else:
        assert float(d.norm(dim=1).max()) <= threat.eps * (1 + 1e-5)


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 1.5)], ids=str)
def test_outputs_inside_threat_model_and_box(threat):
    model = tiny_model()
    x, y = _synthetic(16, 3)
    x[:3] = (x[:3] > 0.6).float()  # pixels on the box faces
    attack = APGD(threat, steps=4, restarts=2, loss="dlr-targeted", n_target=3)
    for m in (model, adapt(model, 1.0)):
        out = attack.run(m, x, y, generator=torch.Generator().manual_seed(0))
        assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype and not out.x_adv.requires_grad
        _inside(x, out.x_adv, threat)
        assert torch.equal(out.correct, judge_batch(m, out.x_adv, y))  # the verdict is on the returned batch
        assert int(out.correct.sum()) <= int(judge_batch(m, x, y).sum())  # never weaker than the clean batch


@pytest.mark.parametrize("threat", [Threat("linf", 0.05), Threat("l2", 1.0)], ids=str)
def test_best_across_targets_never_worse_than_the_first_target_alone(threat):
    model = tiny_model()
    x, y = _synthetic(64, 11)
    first = APGD(threat, steps=10, loss="dlr-targeted", n_target=1)
    out1 = first.run(model, x, y, generator=torch.Generator().manual_seed(3))
    # the first target's run is exactly one APGD run on the targeted DLR loss towards those targets
    alone = APGD(threat, steps=10, loss=targeted_dlr(first.targets(model, x, y)[0]))
    ref = alone.run(model, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out1.x_adv, ref.x_adv) and torch.equal(out1.correct, ref.correct)
    out = APGD(threat, steps=10, loss="dlr-targeted", n_target=4).run(model, x, y,
                                                                     generator=torch.Generator().manual_seed(3))
    assert not bool((out.correct & ~out1.correct).any())  # per image: every image the first run fools stays fooled
    assert 0 < int(out.correct.sum()) < int(out1.correct.sum())  # and the further targets fool more here
    _inside(x, out.x_adv, threat)


def test_forwards_whole_batches_and_leaves_the_model_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = adapt(model, 1.0)
    sizes = []
    hook = deployed.register_forward_pre_hook(lambda mod, inp: sizes.append(inp[0].shape[0]))
    x, y = _synthetic(12, 4)
    APGD(Threat("l2", 1.0), steps=3, restarts=2, loss="dlr-targeted", n_target=3).run(
        deployed, x, y, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert sizes and set(sizes) == {12}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_protocol_names_and_attacks():
    p = Protocol(plain=("pgd", "apgd-t"), adapted=("apgd-dlr", "apgd-t", "transfer"), runs=1).validated()
    plain, adapted = attack_names(p)
    assert plain == ["pgd", "apgd-t"]
    assert adapted == ["apgd-dlr-through-stats", "apgd-t-through-stats", "transfer:pgd", "transfer:apgd-t"]
    for name in ("apgd-t", "apgd-t-through-stats"):
        a = make_attack(name, Threat("linf", 0.1), p)
        assert isinstance(a, APGD) and a.targeted and a.n_target == DEFAULT_TARGETS and a.steps == p.steps
    assert "apgd-t" not in Protocol().plain  # opt-in: about 9 times APGD's cost


def _five_class_files(tmp_path, n_images: int = 16):
    """A tiny npz data set with 5 classes and a tiny 5-class checkpoint (12x12, one channel)."""
    from bnadapt.models import PreActResNet, save_checkpoint

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d5.npz", x=rng.integers(0, 256, size=(n_images, 12, 12, 1), dtype=np.uint8),
             y=np.arange(n_images) % 5)
    args = {"in_channels": 1, "num_classes": 5, "widths": [4, 8], "depth": 1}
    torch.manual_seed(0)
    m = PreActResNet(**args)
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 1, 12, 12) * 0.3)
    card = {"arch": "preact_resnet", "arch_args": args, "input_shape": [1, 12, 12], "name": "tiny5"}
    return str(tmp_path / "d5.npz"), str(save_checkpoint(tmp_path / "m5.safetensors", m.eval(), card))


def test_attack_command_reports_apgd_t(tmp_path, capsys):
    data, ck = _five_class_files(tmp_path)
    out = tmp_path / "a.json"
    code, text, err = run_cli(capsys, "attack", "--model", ck, "--data", data, "--threat", "linf", "--eps", "0.1",
                              "--images", "16", "--batch-size", "8", "--runs", "1", "--steps", "2",
                              "--no-adapt-attacks", "apgd-ce,apgd-t", "--attacks", "apgd-t,transfer",
                              "--threads", "1", "--quiet", "--out", str(out))
    assert code == 0, err
    res = read_result(out, "attack")
    prm = res["inputs"]["params"]
    assert prm["no_adaptation_attacks"] == ["apgd-ce", "apgd-t"]
    assert prm["adapted_attacks"] == ["apgd-t-through-stats", "transfer:apgd-ce", "transfer:apgd-t"]
    assert prm["attacks"]["0:apgd-t"]["targets"] == DEFAULT_TARGETS and prm["attacks"]["0:apgd-t"]["loss"] == "dlr-targeted"
    m = res["results"]["models"][0]
    assert m["no_adaptation"]["attacks"]["apgd-t"]["mean"] is not None
    assert m["adapted"]["attacks"]["apgd-t-through-stats"]["mean"] is not None
    assert all(w <= a + 1e-12 for w, a in zip(m["no_adaptation"]["worst_case"]["runs"],
                                              m["no_adaptation"]["attacks"]["apgd-t"]["runs"]))
    assert "apgd-t-through-stats" in text and "apgd-t" in text


def test_attack_command_bad_input(tmp_path, capsys):
    tmp, data3, ck3 = make_tiny_files(tmp_path, 16)  # a 3-class model: the targeted DLR loss needs 4
    err = bad_cli(capsys, tmp, "attack", "--model", ck3, "--data", data3, "--threat", "linf", "--eps", "0.1",
                  "--images", "8", "--batch-size", "4", "--runs", "1", "--steps", "1", "--no-adapt-attacks", "apgd-t",
                  "--attacks", "none", "--threads", "1", "--quiet")
    assert "at least 4 classes" in err and "apgd-t" in err
    err = bad_cli(capsys, tmp, "attack", "--model", ck3, "--data", data3, "--threat", "linf", "--eps", "0.1",
                  "--no-adapt-attacks", "apgd-tt", "--attacks", "none", "--quiet")
    assert "unknown no-adaptation attack" in err and "apgd-t" in err
