"""Tests for bnadapt.smoothing (Cohen et al.'s core): soundness of the certificates, the model left
untouched, the fast sampler against the published loop, bad input. Everything is tiny."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from bnadapt.errors import BnadaptError
from bnadapt.certify import certify_run
from bnadapt.smoothing import ABSTAIN, Smooth, certified_radius, clopper_pearson_lower, plain_sample_counts

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_torchrun_certify", HERE / "_torchrun_certify.py")
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)


# --------------------------------------------------------------------------------------------------
# A linear binary classifier with a known smoothed classifier
# --------------------------------------------------------------------------------------------------

class LinearBinary(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, on 1x2x2 images (float64)."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


W = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
X = torch.tensor([[[0.3, 0.6], [0.2, 0.9]]], dtype=torch.float64)  # 1x2x2


def linear_at(p_a: float, sigma: float, cls: int = 1):
    """A linear model and the point X where the smoothed classifier returns ``cls`` with P = p_a.

    Returns (model, true certified radius |margin| / ||w||)."""
    wn = float(W.norm())
    margin = sigma * wn * norm.ppf(p_a) * (1 if cls == 1 else -1)
    b = margin - float(W @ X.flatten())
    return LinearBinary(W, b), abs(margin) / wn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def not_more_than(failures: int, trials: int, rate: float, p: float = 1e-3) -> bool:
    """False when ``failures`` out of ``trials`` is significantly more than ``rate`` (upper binomial tail)."""
    return binom.sf(failures - 1, trials, rate) > p


# --------------------------------------------------------------------------------------------------
# Soundness
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [1, 0])
def test_certify_is_sound(cls):
    sigma, alpha, trials = 0.5, 0.05, 600
    model, true_r = linear_at(0.9, sigma, cls)
    smooth = Smooth(model, 2, sigma, batch_size=200)
    g = gen(10 + cls)
    failures = certified = 0
    for _ in range(trials):
        pred, r = smooth.certify(X, n0=16, n=200, alpha=alpha, generator=g)
        if pred == ABSTAIN:
            assert r == 0.0
            continue
        certified += 1
        failures += int(pred != cls or r > true_r)
    assert certified > 0.9 * trials  # p_A = 0.9 is certified almost always at n = 200
    assert not_more_than(failures, trials, alpha), (failures, trials)


def test_radius_approaches_true_radius():
    sigma, alpha = 0.5, 0.05
    model, true_r = linear_at(0.9, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=10_000)
    g = gen(3)
    gaps = []
    for n in (100, 1_000, 10_000):
        radii = [smooth.certify(X, 16, n, alpha, g)[1] for _ in range(12)]
        gaps.append(true_r - float(np.mean(radii)))
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps
    assert gaps[2] < 0.05 * true_r, gaps


def test_clopper_pearson_matches_cohen():
    # proportion_confint(k, n, alpha=2*alpha, method="beta")[0] closed forms:
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    assert clopper_pearson_lower(1, 10, 0.05) == pytest.approx(1 - 0.95 ** (1 / 10))
    assert certified_radius(50, 100, 0.05, 1.0) is None
    r = certified_radius(100, 100, 0.001, 0.5)
    assert r == pytest.approx(0.5 * norm.ppf(0.001 ** 0.01))


def test_predict_abstains_on_boundary_and_rarely_errs():
    sigma, alpha, trials = 0.5, 0.05, 300
    # On the decision boundary P(f = 0) = P(f = 1) = 1/2: g(x) is undefined, any answer is a coin flip.
    model, _ = linear_at(0.5, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=100)
    g = gen(4)
    answered = sum(smooth.predict(X, 100, alpha, g) != ABSTAIN for _ in range(trials))
    assert answered < trials / 2
    assert not_more_than(answered, trials, alpha), answered
    # Near the boundary (p_A = 0.6 for class 1): wrong answers at most ~alpha, right ones often.
    model, _ = linear_at(0.6, sigma)
    smooth = Smooth(model, 2, sigma, batch_size=100)
    answers = [smooth.predict(X, 100, alpha, g) for _ in range(trials)]
    wrong = sum(a == 0 for a in answers)
    assert not_more_than(wrong, trials, alpha), wrong
    assert sum(a == 1 for a in answers) > trials / 5


# --------------------------------------------------------------------------------------------------
# The model is used as given
# --------------------------------------------------------------------------------------------------

def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def same(model, snap):
    state, flags, grads = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and [m.training for m in model.modules()] == flags
            and [p.requires_grad for p in model.parameters()] == grads)


def test_model_untouched(tmp_path):
    model = helper.build_model()
    snap = snapshot(model)
    smooth = Smooth(model, helper.NUM_CLASSES, 0.25, batch_size=16)
    x, _ = helper.build_dataset()[0]
    smooth.sample_counts(x, 40, gen(0))
    smooth.certify(x, 8, 40, 0.05, gen(0))
    smooth.predict(x, 40, 0.05, gen(0))
    certify_run(lambda s: Smooth(model, helper.NUM_CLASSES, s, batch_size=16), helper.build_dataset(), [0, 1],
                tmp_path / "r.tsv", sigmas=[0.25], n0=4, n=16, alpha=0.05, seed=0, quiet=True)
    assert same(model, snap)


def test_batch_dependent_models_refused():
    model = helper.build_model().train()
    snap = snapshot(model)
    with pytest.raises(BnadaptError, match="training mode"):
        Smooth(model, helper.NUM_CLASSES, 0.25)
    assert same(model, snap)  # still in train mode, statistics untouched
    model.eval()
    smooth = Smooth(model, helper.NUM_CLASSES, 0.25)
    model[1].train()  # switched after construction: refused at sampling time
    with pytest.raises(BnadaptError, match="training mode"):
        smooth.sample_counts(helper.build_dataset()[0][0], 10)
    model.eval()

    class PerBatchBN(nn.Module):  # duck-typed bnadapt.adapt.AdaptiveBatchNorm before freezing
        frozen, rho = False, 1.0

        def forward(self, x):
            return x

    with pytest.raises(BnadaptError, match="per-batch adaptive BN"):
        Smooth(nn.Sequential(PerBatchBN(), nn.Flatten(), nn.Linear(4, 2)).eval(), 2, 0.25)


# --------------------------------------------------------------------------------------------------
# Fast sampler vs the published loop
# --------------------------------------------------------------------------------------------------

def test_sample_counts_matches_plain_loop():
    model = helper.build_model()
    x, _ = helper.build_dataset()[2]
    c = helper.NUM_CLASSES
    # Deterministic regime (tiny sigma): identical counts, last batch smaller.
    fast = Smooth(model, c, 1e-7, batch_size=64).sample_counts(x, 150, gen(0))
    torch.manual_seed(0)
    plain = plain_sample_counts(model, x, 150, 1e-7, 64, c)
    assert fast.dtype == np.int64 and fast.shape == (c,)
    assert np.array_equal(fast, plain) and fast.sum() == 150 and fast.max() == 150
    # Noisy regime: same total and the same distribution (two-sample chi-square).
    num, sigma = 6000, 0.5
    fast = Smooth(model, c, sigma, batch_size=1000).sample_counts(x, num, gen(1))
    torch.manual_seed(1)
    plain = plain_sample_counts(model, x, num, sigma, 700, c)
    assert fast.sum() == plain.sum() == num
    assert (fast > 0).sum() >= 2  # the test is not trivial
    from scipy.stats import chi2_contingency

    table = np.stack([fast, plain])
    table = table[:, table.sum(0) > 0]
    assert chi2_contingency(table).pvalue > 1e-3, table
    # Same generator seed: same counts; the linear model's frequency matches its known p_A.
    model, _ = linear_at(0.7, 0.5)
    smooth = Smooth(model, 2, 0.5, batch_size=999)
    a, b = smooth.sample_counts(X, 20_000, gen(7)), smooth.sample_counts(X, 20_000, gen(7))
    assert np.array_equal(a, b)
    assert abs(a[1] / 20_000 - 0.7) < 5 * math.sqrt(0.21 / 20_000)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), "x"])
def test_bad_sigma(sigma):
    with pytest.raises(BnadaptError, match="sigma"):
        Smooth(LinearBinary(W, 0.0), 2, sigma)


@pytest.mark.parametrize("kw, word", [(dict(n0=0), "n0"), (dict(n=0), "n"), (dict(alpha=0.0), "alpha"),
                                      (dict(alpha=1.0), "alpha"), (dict(alpha=-0.1), "alpha")])
def test_bad_certify_args(kw, word):
    smooth = Smooth(LinearBinary(W, 0.0), 2, 0.5, batch_size=10)
    args = dict(n0=5, n=10, alpha=0.05) | kw
    with pytest.raises(BnadaptError, match=word):
        smooth.certify(X, args["n0"], args["n"], args["alpha"], gen(0))
    if "n0" not in kw:
        with pytest.raises(BnadaptError, match=word):
            smooth.predict(X, args["n"], args["alpha"], gen(0))


def test_bad_input_shape_and_classes(tmp_path):
    smooth = Smooth(LinearBinary(W, 0.0), 2, 0.5)
    with pytest.raises(BnadaptError, match=r"\(C, H, W\)"):
        smooth.certify(X[None], 5, 10, 0.05)
    with pytest.raises(BnadaptError, match="float image"):
        smooth.sample_counts((X * 255).to(torch.uint8), 5)
    with pytest.raises(BnadaptError, match="num_classes"):
        Smooth(LinearBinary(W, 0.0), 3, 0.5).sample_counts(X, 5)
    with pytest.raises(BnadaptError, match="batch_size"):
        Smooth(LinearBinary(W, 0.0), 2, 0.5, batch_size=0)
