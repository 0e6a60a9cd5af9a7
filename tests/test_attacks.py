import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnadapt.attacks import (
    L2PGD, THREAT_MODELS, L2ProjectedGradientDescentAttack, LinfPGD, ThreatModel, accuracy_under_attack,
    make_pgd, threat_model,
)
from bnadapt.data.base import TensorImageDataset
from bnadapt.errors import BnadaptError
from bnadapt.models import PreActResNet


def _synthetic(n: int, seed: int):
    """A learnable 4-class task: a fixed random template per class, blended with uniform noise."""
    templates = (torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(123)) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return 0.6 * templates[y] + 0.4 * torch.rand(n, 1, 28, 28, generator=g), y


@functools.lru_cache(maxsize=None)
def _trained_state(seed: int):
    torch.manual_seed(seed)
    m = PreActResNet(widths=(4, 8, 8), depth=1)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    m.train()
    for step in range(40):
        x, y = _synthetic(64, 1000 + step)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


def tiny_model(seed: int = 0) -> PreActResNet:
    """A tiny PreActResNet trained briefly on a synthetic task (so it is a real classifier), eval mode."""
    m = PreActResNet(widths=(4, 8, 8), depth=1)
    m.load_state_dict(_trained_state(seed))
    return m.eval()


def batch(n: int = 24, seed: int = 0):
    x, y = _synthetic(n, seed)
    x[:4] = (x[:4] > 0.5).float()  # pixels exactly on the box faces
    return x, y


def norms(x, x_adv, p, dtype):
    d = (x_adv.to(dtype) - x.to(dtype)).flatten(1)
    return d.abs().amax(1) if p == "linf" else torch.linalg.vector_norm(d, dim=1)


@pytest.mark.parametrize("p,eps", [("linf", 1 / 255), ("linf", 0.1), ("linf", 0.3), ("l2", 0.1), ("l2", 1.5),
                                   ("l2", 3.0), ("l2", 50.0)])
def test_outputs_inside_threat_model_and_box_exactly(p, eps):
    model = tiny_model()
    x, y = batch()
    attack = make_pgd(p, eps, steps=5)
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    for dtype in (torch.float32, torch.float64):
        n = norms(x, x_adv, p, dtype)
        assert bool((n <= eps).all()), (dtype, float(n.max()), eps)
    if p == "linf":  # the full budget is used (the attack is not degenerate)
        assert float(norms(x, x_adv, p, torch.float32).max()) > 0.99 * eps


def test_sum_of_squares_norm_also_inside():
    model = tiny_model()
    x, y = batch()
    x_adv = L2PGD(1.5, steps=5)(model, x, y, generator=torch.Generator().manual_seed(0))
    d = x_adv - x
    assert bool((d.pow(2).sum(dim=(1, 2, 3)).sqrt() <= 1.5).all())
    assert bool((d.flatten(1).norm(dim=1) <= 1.5).all())


@pytest.mark.parametrize("p,eps", [("linf", 0.3), ("l2", 3.0)])
def test_pgd_increases_loss_and_lowers_accuracy(p, eps):
    model = tiny_model()
    x, y = _synthetic(64, 7)
    with torch.no_grad():
        clean = model(x)
    clean_loss, clean_acc = F.cross_entropy(clean, y), (clean.argmax(1) == y).float().mean()
    assert float(clean_acc) > 0.9  # the tiny model learned the task
    x_adv = make_pgd(p, eps, steps=10)(model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x_adv)
    assert float(F.cross_entropy(out, y)) > float(clean_loss)
    assert float((out.argmax(1) == y).float().mean()) < float(clean_acc) - 0.3


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("p", THREAT_MODELS)
def test_model_state_unchanged(mode, p):
    model = tiny_model()
    model.train(mode == "train")
    model.fc.bias.requires_grad_(False)  # a frozen parameter must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    req = [q.requires_grad for q in model.parameters()]
    x, y = batch()
    make_pgd(p, 0.3 if p == "linf" else 2.0, steps=3)(model, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags
    assert [q.requires_grad for q in model.parameters()] == req
    assert all(q.grad is None for q in model.parameters())


def test_existing_param_grads_are_not_accumulated():
    model = tiny_model()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    grads = [q.grad.clone() for q in model.parameters()]
    LinfPGD(0.1, steps=2)(model, x, y)
    assert all(torch.equal(g, q.grad) for g, q in zip(grads, model.parameters()))


def test_deterministic_with_generator_and_no_random_start():
    model = tiny_model()
    x, y = batch()
    a = L2PGD(1.0, steps=3)
    r1 = a(model, x, y, generator=torch.Generator().manual_seed(5))
    r2 = a(model, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2)
    b = LinfPGD(0.1, steps=2, random_start=False)
    assert torch.equal(b(model, x, y), b(model, x, y))


def test_works_under_no_grad_and_inference_mode():
    model = tiny_model()
    x, y = batch(8)
    with torch.no_grad():
        a = LinfPGD(0.1, steps=2)(model, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    b = LinfPGD(0.1, steps=2)(model, xi, yi)
    assert a.shape == b.shape == x.shape


def test_constructor_defaults_and_aliases():
    a = LinfPGD(0.1)
    assert (a.steps, a.random_start) == (20, True)
    assert a.step_size == pytest.approx(2.5 * 0.1 / 20)
    assert L2PGD is L2ProjectedGradientDescentAttack
    assert isinstance(make_pgd("L2", 1.0, steps=4), L2PGD)
    assert threat_model("linf") is ThreatModel.LINF and threat_model("l2") is ThreatModel.L2
    assert a.describe()["threat_model"] == "linf"
    with pytest.raises(TypeError):
        LinfPGD(0.1, 20)  # keyword-only


@pytest.mark.parametrize("kwargs", [dict(eps=0), dict(eps=-0.1), dict(eps=float("nan")), dict(eps="x"),
                                    dict(eps=0.1, steps=0), dict(eps=0.1, steps=-3), dict(eps=0.1, steps=1.5),
                                    dict(eps=0.1, step_size=0.0)])
@pytest.mark.parametrize("cls", [LinfPGD, L2PGD])
def test_bad_arguments_are_one_line_errors(cls, kwargs):
    with pytest.raises(BnadaptError) as e:
        cls(**kwargs)
    assert "\n" not in str(e.value)


def test_unknown_threat_model():
    with pytest.raises(BnadaptError, match="linf, l2"):
        threat_model("l3")


def test_accuracy_under_attack():
    model = tiny_model()
    x, y = _synthetic(40, 9)
    ds = TensorImageDataset(x, y)
    with torch.no_grad():
        clean_acc = float((model(x).argmax(1) == y).float().mean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = accuracy_under_attack(model, ds, LinfPGD(0.3, steps=5), 16, progress=False)
    assert 0.0 <= acc < clean_acc - 0.3
    assert acc == accuracy_under_attack(model, ds, LinfPGD(0.3, steps=5), 16, progress=False)
    sub = accuracy_under_attack(model, ds, LinfPGD(1e-6, steps=1), 16, indices=np.arange(10), progress=False)
    with torch.no_grad():
        assert sub == float((model(x[:10]).argmax(1) == y[:10]).float().mean())
    model.train()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        accuracy_under_attack(model, ds, L2PGD(1.0, steps=2), 20, progress=False)
    assert any("train mode" in str(m.message) for m in w)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
