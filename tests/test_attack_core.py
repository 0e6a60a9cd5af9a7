"""The attacks of bnadapt.attacks: threat model and box exactly for every attack, no side
effect on any model, strength on an undefended tiny model (PGD vs noise, APGD vs PGD), EoT-PGD with
m = 1 and rho = 0 equal to PGD, the gradient through the batch statistics, whole batches only, the
losses, and batch poisoning. Tiny models trained in the test (tests/test_attacks.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnadapt.adapt import adapt, adapt_then_freeze
from bnadapt.attacks import (
    APGD, PGD, EoTPGD, Threat, cross_entropy, dlr, eot_nll, judge_batch, make_pgd, margin,
)
from bnadapt.attacks.poison import BatchPoisoning, n_poison
from bnadapt.errors import BnadaptError
from tests.test_attacks import _synthetic, tiny_model

LINF_TOL, L2_TOL = 1e-6, 1e-5


def _shifted(n: int = 32, seed: int = 7):
    """A batch under covariate shift (lower contrast, brighter): the plain model fails, adaptation helps."""
    x, y = _synthetic(n, seed)
    return 0.4 * x + 0.5, y


def _inside(x, x_adv, threat: Threat) -> None:
    d = (x_adv.double() - x.double()).flatten(1)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if threat.norm.value == "linf":
        assert float(d.abs().max()) <= threat.eps + LINF_TOL
    else:
        assert float(d.norm(dim=1).max()) <= threat.eps * (1 + L2_TOL)


def _attacks(threat: Threat):
    """(name, run(model, x, y, gen) -> x_adv) for every attack of the package, on a model and its deployment."""
    pgd = PGD.from_threat(threat, steps=4, step_size=threat.eps / 4, restarts=2, keep_best=True)
    a_ce = APGD(threat, steps=5, restarts=2, loss="ce")
    a_dlr = APGD(threat, steps=5, loss="dlr")
    eot = EoTPGD(threat, m=2, rho=1.0, steps=3, restarts=2)
    return [
        ("pgd", lambda m, x, y, g: pgd.run(m, x, y, generator=g).x_adv),
        ("apgd-ce", lambda m, x, y, g: a_ce.run(m, x, y, generator=g).x_adv),
        ("apgd-dlr", lambda m, x, y, g: a_dlr.run(m, x, y, generator=g).x_adv),
        ("pgd-through-stats", lambda m, x, y, g: pgd.run(adapt(m, 1.0), x, y, generator=g).x_adv),
        ("apgd-ce-through-stats", lambda m, x, y, g: a_ce.run(adapt(m, 0.5), x, y, generator=g).x_adv),
        ("eot-pgd", lambda m, x, y, g: eot.run(m, x, y, generator=g).x_adv),
        ("poison", lambda m, x, y, g: BatchPoisoning(threat, q=0.25, steps=3).run(adapt(m, 1.0), x, y,
                                                                                    generator=g).x),
    ]


THREATS = [Threat("linf", 0.1), Threat("linf", 0.3), Threat("l2", 1.0), Threat("l2", 3.0)]


@pytest.mark.parametrize("threat", THREATS, ids=str)
def test_every_attack_stays_inside_threat_model_and_box(threat):
    model = tiny_model()
    x, y = _shifted(16)
    x[:3] = (x[:3] > 0.6).float()  # pixels on the box faces
    for name, run in _attacks(threat):
        x_adv = run(model, x, y, torch.Generator().manual_seed(2))
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad, name
        _inside(x, x_adv, threat)
    box = Threat.box()
    out = BatchPoisoning(box, q=0.25, steps=3).run(adapt(model, 1.0), x, y, generator=torch.Generator().manual_seed(0))
    _inside(x, out.x, box)


def test_no_attack_changes_the_model():
    model = tiny_model()
    model.fc.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    deployed = adapt(model, 1.0)
    dep_before = {k: v.clone() for k, v in deployed.state_dict().items()}
    x, y = _shifted(12)
    for threat in (Threat("linf", 0.1), Threat("l2", 1.0)):
        for _name, run in _attacks(threat):
            run(model, x, y, torch.Generator().manual_seed(0))
        PGD.from_threat(threat, steps=2, keep_best=True).run(deployed, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == req
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(dep_before[k], v) for k, v in deployed.state_dict().items())
    # a train-mode BN model attacked through its batch statistics keeps its running statistics
    model.train()
    APGD(Threat("linf", 0.1), steps=3).run(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_pgd_defeats_undefended_model_where_noise_of_same_size_does_not():
    model = tiny_model()
    x, y = _synthetic(96, 11)
    eps = 0.1
    noise = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1) * eps
    assert float(judge_batch(model, x, y).float().mean()) > 0.95
    assert float(judge_batch(model, (x + noise).clamp(0, 1), y).float().mean()) > 0.9  # noise of the same size
    out = make_pgd("linf", eps, steps=20, keep_best=True).run(model, x, y, generator=torch.Generator().manual_seed(1))
    assert float(out.correct.float().mean()) <= 0.02
    assert torch.equal(out.correct, judge_batch(model, out.x_adv, y))  # the verdict is on the returned batch


@pytest.mark.parametrize("threat", [Threat("linf", 0.05), Threat("l2", 1.0)], ids=str)
def test_apgd_at_least_as_strong_as_pgd_with_same_budget(threat):
    model = tiny_model()
    x, y = _synthetic(96, 11)
    pgd = PGD.from_threat(threat, steps=20, step_size=threat.eps / 4, keep_best=True)
    acc_pgd = float(pgd.run(model, x, y, generator=torch.Generator().manual_seed(3)).correct.float().mean())
    acc_apgd = float(APGD(threat, steps=20).run(model, x, y, generator=torch.Generator().manual_seed(3))
                     .correct.float().mean())
    assert 0.1 < acc_pgd < 0.95  # a regime where the attacks can differ
    assert acc_apgd <= acc_pgd


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 1.0)], ids=str)
def test_eot_with_one_model_and_rho_zero_equals_pgd(threat):
    model = tiny_model()
    x, y = _synthetic(24, 5)
    pgd = PGD.from_threat(threat, steps=5, step_size=threat.eps / 4, restarts=2, keep_best=True)
    eot = EoTPGD(threat, m=1, rho=0.0, steps=5, step_size=threat.eps / 4, restarts=2, keep_best=True)
    a = pgd.run(model, x, y, generator=torch.Generator().manual_seed(9))
    b = eot.run(model, x, y, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.correct, b.correct)
    plain = make_pgd(threat.norm, threat.eps, steps=5)  # the legacy last-iterate PGD too
    eot1 = EoTPGD(threat, m=1, rho=0.0, steps=5, keep_best=False)
    assert torch.equal(plain(model, x, y, torch.Generator().manual_seed(4)), eot1(model, x, y, torch.Generator().manual_seed(4)))


def test_through_statistics_stronger_than_same_attack_on_frozen_copy():
    model = tiny_model()
    x, y = _shifted(64)
    deployed = adapt(model, 1.0)
    assert float(judge_batch(model, x, y).float().mean()) < 0.7  # adaptation matters here
    assert float(judge_batch(deployed, x, y).float().mean()) > 0.95
    threat = Threat("linf", 0.03)
    attack = PGD.from_threat(threat, steps=20, step_size=threat.eps / 4, keep_best=True)
    frozen = adapt_then_freeze(model, x, 1.0)  # the deployed model's statistics on the clean batch, frozen
    assert torch.allclose(frozen(x), deployed(x), atol=1e-4)
    through = attack.run(deployed, x, y, generator=torch.Generator().manual_seed(1))
    on_frozen = attack.run(frozen, x, y, generator=torch.Generator().manual_seed(1), judge=frozen)
    acc_through = float(through.correct.float().mean())
    acc_frozen = float(judge_batch(deployed, on_frozen.x_adv, y).float().mean())  # fed to the deployed model
    assert acc_through < acc_frozen - 0.1
    # the gradients differ: the adapted model's flows through the batch statistics
    xg = x.clone().requires_grad_(True)
    g1, = torch.autograd.grad(F.cross_entropy(deployed(xg), y, reduction="sum"), xg)
    xg = x.clone().requires_grad_(True)
    g2, = torch.autograd.grad(F.cross_entropy(frozen(xg), y, reduction="sum"), xg)
    assert not torch.allclose(g1, g2, atol=1e-6)


def test_every_forward_sees_the_whole_batch():
    model = tiny_model()
    deployed = adapt(model, 1.0)
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: sizes.append(inp[0].shape[0]))
             for m in (model, deployed)]
    x, y = _shifted(20)
    threat = Threat("linf", 0.05)
    for attack in (PGD.from_threat(threat, steps=3, restarts=3, keep_best=True), APGD(threat, steps=6, restarts=3)):
        attack.run(deployed, x, y)
        attack.run(model, x, y)
    EoTPGD(threat, m=2, steps=2, restarts=2).run(model, x, y)
    BatchPoisoning(threat, q=0.1, steps=2, restarts=2).run(deployed, x, y)
    for h in hooks:
        h.remove()
    assert sizes and set(sizes) == {20}


def test_restarts_never_make_the_batch_weaker():
    model = tiny_model()
    x, y = _shifted(32)
    deployed = adapt(model, 1.0)
    threat = Threat("linf", 0.02)
    for target in (model, deployed):
        one = PGD.from_threat(threat, steps=5, restarts=1, keep_best=True).run(target, x, y,
                                                                               generator=torch.Generator().manual_seed(0))
        three = PGD.from_threat(threat, steps=5, restarts=3, keep_best=True).run(target, x, y,
                                                                                 generator=torch.Generator().manual_seed(0))
        assert int(three.correct.sum()) <= int(one.correct.sum())
        assert torch.equal(three.correct, judge_batch(target, three.x_adv, y))


def test_losses():
    torch.manual_seed(0)
    z, y = torch.randn(3, 8, 5), torch.randint(0, 5, (8,))
    naive = -torch.log(z.softmax(2).mean(0).gather(1, y[:, None])[:, 0])
    assert torch.allclose(eot_nll(z, y), naive, atol=1e-5)  # Eq. 3: log outside the mean
    assert not torch.allclose(eot_nll(z, y), F.cross_entropy(z.reshape(-1, 5), y.repeat(3), reduction="none")
                              .view(3, 8).mean(0))  # not AutoAttack's mean of cross-entropies
    assert torch.equal(eot_nll(z[:1], y), cross_entropy(z[0], y))
    zs, ind = z[0].sort(1)
    z_y = z[0].gather(1, y[:, None])[:, 0]
    other = torch.where(ind[:, -1] == y, zs[:, -2], zs[:, -1])
    assert torch.allclose(dlr(z[0], y), -(z_y - other) / (zs[:, -1] - zs[:, -3] + 1e-12))
    assert torch.allclose(dlr(3 * z[0] + 2, y), dlr(z[0], y), atol=1e-5)  # shift and scale invariant
    assert bool(((margin(z[0], y) > 0) == (z[0].argmax(1) != y)).all())
    with pytest.raises(BnadaptError, match="3 classes"):
        dlr(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(BnadaptError, match="EoT"):
        cross_entropy(z, y)


def test_poisoning_moves_only_its_images_and_spares_per_image_models():
    model = tiny_model()
    x, y = _shifted(32)
    threat = Threat("linf", 0.1)
    out = BatchPoisoning(threat, q=0.25, steps=5).run(adapt(model, 1.0), x, y, generator=torch.Generator().manual_seed(1))
    assert int(out.poison.sum()) == n_poison(0.25, 32) == 8
    assert torch.equal(out.x[~out.poison], x[~out.poison])  # benign images untouched
    assert out.benign == 24 and 0 <= out.benign_correct <= 24
    # rho = 0 (no adaptation): the poison cannot reach the benign images
    plain = BatchPoisoning(Threat.box(), q=0.25, steps=3).run(adapt(model, 0.0), x, y,
                                                              generator=torch.Generator().manual_seed(1))
    assert plain.benign_correct == int(judge_batch(model, x, y)[~plain.poison].sum())
    assert n_poison(0.01, 64) == 1 and n_poison(0.9, 2) == 1 and n_poison(0.25, 512) == 128


@pytest.mark.parametrize("make", [
    lambda: Threat("l3", 0.1), lambda: Threat("linf", 0.0), lambda: Threat("l2", -1.0), lambda: Threat("linf", math.nan),
    lambda: PGD.from_threat(Threat("linf", 0.1), steps=0), lambda: APGD(Threat("l2", 1.0), steps=0),
    lambda: APGD(Threat("l2", 1.0), loss="xent"), lambda: EoTPGD(Threat("linf", 0.1), m=0),
    lambda: EoTPGD(Threat("linf", 0.1), rho=1.5), lambda: BatchPoisoning(Threat("linf", 0.1), q=0.0),
    lambda: BatchPoisoning(Threat("linf", 0.1), q=1.0), lambda: BatchPoisoning(Threat("linf", 0.1), q=0.1, loss="x"),
])
def test_bad_arguments_are_one_line_errors(make):
    with pytest.raises(BnadaptError) as e:
        make()
    assert "\n" not in str(e.value)


def test_adapted_attack_needs_batch_norm_and_two_images():
    from torch import nn

    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    with pytest.raises(BnadaptError, match="BatchNorm"):
        EoTPGD(Threat("linf", 0.1), m=1).run(no_bn, *_synthetic(4, 0))
    x, y = _synthetic(1, 0)
    with pytest.raises(BnadaptError, match="batch of one"):
        PGD.from_threat(Threat("linf", 0.1), steps=1).run(adapt(tiny_model(), 1.0), x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_with_cuda_generators():
    dev = torch.device("cuda")
    model = tiny_model().to(dev)
    x, y = _shifted(16)
    x, y = x.to(dev), y.to(dev)
    threat = Threat("linf", 0.1)
    for name, run in _attacks(threat):
        x_adv = run(model, x, y, torch.Generator(device=dev).manual_seed(0))
        assert x_adv.device.type == "cuda", name
        _inside(x, x_adv, threat)
