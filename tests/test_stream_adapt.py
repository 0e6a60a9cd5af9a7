"""Online (stream) adaptation: the estimators' defining equalities, the batch-of-one rule, reset, robust
statistics and bad input."""

import copy
import math

import pytest
import torch
from torch import nn

from bnadapt.adapt import AdaptiveBatchNorm, StreamAdapted, adapt, adapt_then_freeze, bn_layers, stream_adapt, to_plain
from bnadapt.errors import BnadaptError
from bnadapt.robust_stats import robust_batch_stats, robust_mean_var



def batches(seed=0, sizes=(5, 3, 6, 2), shift=0.15):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 1, 12, 12, generator=g) + shift * i for i, b in enumerate(sizes)]


def run(net, xs):
    with torch.no_grad():
        return [net(x) for x in xs]


def close(a, b, atol=1e-5):
    return all(torch.allclose(u, v, atol=atol) for u, v in zip(a, b, strict=True))


def parallel_bn_model(bn1d: bool = False):
    """Three BN layers that all see the raw input (so pooled statistics are layer-exact), optionally plus a
    BN1d on the image means (one value per image and channel)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.BatchNorm2d(1), nn.BatchNorm2d(1, affine=False), nn.BatchNorm2d(1)
            self.d = nn.BatchNorm1d(1)

        def forward(self, x):
            out = [self.a(x).flatten(1), self.b(x).flatten(1), 2 * self.c(x).flatten(1)]
            return torch.cat(out + ([self.d(x.mean((2, 3)))] if bn1d else []), 1)

    torch.manual_seed(0)
    m = M()
    for bn in (m.a, m.b, m.c, m.d):
        bn.running_mean.fill_(0.2)
        bn.running_var.fill_(0.5)
    with torch.no_grad():
        m.a.weight.fill_(1.3)
        m.c.bias.fill_(-0.4)
    return m.eval()


@pytest.mark.parametrize("rho", [1.0, 0.6])
def test_ema_momentum_one_is_per_batch_adaptation(bn_model, rho):
    xs = batches()
    ref = run(adapt(bn_model, rho), xs)
    assert close(run(stream_adapt(bn_model, rho, estimator="ema", momentum=1.0), xs), ref)
    # also with gradients enabled (the differentiable path) and for a batch of one image
    s = stream_adapt(bn_model, rho, estimator="ema", momentum=1.0)
    assert close([s(x.requires_grad_()) for x in xs], ref)
    one = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(stream_adapt(bn_model, rho, estimator="ema", momentum=1.0, min_images=1)(one),
                              adapt(bn_model, rho)(one), atol=1e-5)


def test_window_as_long_as_the_stream_is_adapt_then_freeze():
    m = parallel_bn_model()
    xs = batches(sizes=(1, 4, 3, 1, 5))
    for rho in (1.0, 0.7):
        s = stream_adapt(m, rho, estimator="window", window=14)  # exactly the stream's length
        outs = run(s, xs)
        frozen = adapt_then_freeze(m, xs, rho)
        with torch.no_grad():
            assert torch.allclose(outs[-1], frozen(xs[-1]), atol=1e-5)  # the last batch sees the whole stream
            probe = torch.rand(3, 1, 12, 12)
            assert torch.allclose(s.snapshot()(probe), frozen(probe), atol=1e-5)
            # a longer window changes nothing; a shorter one forgets the first images
            assert torch.allclose(run(stream_adapt(m, rho, estimator="window", window=100), xs)[-1], outs[-1], atol=1e-6)
            assert not torch.allclose(run(stream_adapt(m, rho, estimator="window", window=5), xs)[-1], outs[-1], atol=1e-3)


def test_window_on_one_batch_is_adapt_then_freeze_for_a_deep_model(bn_model):
    x = torch.rand(9, 1, 12, 12)
    s = stream_adapt(bn_model, 0.8, estimator="window", window=9)
    frozen = adapt_then_freeze(bn_model, x, 0.8)
    with torch.no_grad():
        assert torch.allclose(s(x), frozen(x), atol=1e-5)
        assert torch.allclose(to_plain(s.snapshot())(x), frozen(x), atol=1e-5)


def test_ema_is_the_weighted_mixture_with_a_warm_start():
    m = parallel_bn_model()
    xs = batches(sizes=(1, 1, 1, 1, 1, 1, 1, 1))
    mom = 0.3
    s = stream_adapt(m, estimator="ema", momentum=mom)
    run(s, xs)
    # reference: pooled per-image statistics with the documented weights
    mean = var = None
    n = 0
    for x in xs:
        v, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        w = 1.0 if n == 0 else max(1 - (1 - mom), 1 / (n + 1))
        if mean is None:
            mean, var = mu, v
        else:
            d = mu - mean
            mean, var = mean + w * d, (1 - w) * var + w * v + w * (1 - w) * d * d
        n += 1
    got_mean, got_var = s.net.a.estimate()
    assert torch.allclose(got_mean, mean, atol=1e-6) and torch.allclose(got_var, var, atol=1e-6)
    # the first two images weigh equally: their pooled statistics exactly
    s2 = stream_adapt(m, estimator="ema", momentum=0.01)
    run(s2, xs[:2])
    v2, m2 = torch.var_mean(torch.cat(xs[:2]), dim=(0, 2, 3), correction=0)
    assert torch.allclose(s2.net.a.estimate()[0], m2, atol=1e-6) and torch.allclose(s2.net.a.estimate()[1], v2, atol=1e-6)


def test_prior_limits(bn_model):
    xs = batches()
    assert close(run(stream_adapt(bn_model, estimator="prior", prior_n=0), xs), run(adapt(bn_model, 1.0), xs))
    with torch.no_grad():
        std = [bn_model(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(run(stream_adapt(bn_model, estimator="prior", prior_n=math.inf), xs), std))
    assert close(run(stream_adapt(bn_model, estimator="prior", prior_n=1e12), xs), std, atol=1e-4)
    # N = b gives rho = 1/2 for a batch of b
    x = torch.rand(6, 1, 12, 12) + 0.3
    with torch.no_grad():
        assert torch.allclose(stream_adapt(bn_model, estimator="prior", prior_n=6)(x), adapt(bn_model, 0.5)(x), atol=1e-5)
    s = stream_adapt(bn_model, estimator="prior", prior_n=6)
    assert torch.allclose(s(x.requires_grad_()), adapt(bn_model, 0.5)(x), atol=1e-5)


@pytest.mark.parametrize("estimator", ["ema", "window"])
def test_a_batch_of_one_works_once_the_estimate_has_seen_two(estimator):
    m = parallel_bn_model()
    imgs = torch.rand(4, 1, 12, 12) * 2
    s = stream_adapt(m, estimator=estimator, window=8)
    with torch.no_grad():
        first = s(imgs[:1])
        assert torch.equal(first, m(imgs[:1]))  # one image seen: the training statistics (standard inference)
        second = s(imgs[1:2])
        pooled = adapt_then_freeze(m, [imgs[:1], imgs[1:2]], 1.0)
        assert torch.allclose(second, pooled(imgs[1:2]), atol=1e-5)  # two seen: their pooled statistics
        assert not torch.allclose(second, m(imgs[1:2]), atol=1e-3)
        # a BN1d layer (one value per image) works too: standard first, then finite adapted outputs
        m1 = parallel_bn_model(bn1d=True)
        s1 = stream_adapt(m1, estimator=estimator, window=8)
        assert torch.equal(s1(imgs[:1]), m1(imgs[:1]))
        outs = [s1(imgs[i:i + 1]) for i in range(1, 4)]
        assert all(torch.isfinite(o).all() for o in outs) and not torch.allclose(outs[-1], m1(imgs[3:4]), atol=1e-3)
    # min_images=1 uses the single image's own statistics
    one = stream_adapt(m, estimator=estimator, min_images=1)
    with torch.no_grad():
        own = nn.functional.batch_norm(imgs[:1], None, None, m.a.weight, m.a.bias, True, 0.0, m.a.eps)
        assert torch.allclose(one(imgs[:1])[:, :144], own.flatten(1), atol=1e-5)
    # the prior estimator's estimate is the batch: a batch of one is standard inference unless min_images=1
    with torch.no_grad():
        assert torch.equal(stream_adapt(m, estimator="prior", prior_n=0)(imgs[:1]), m(imgs[:1]))


@pytest.mark.parametrize("estimator", ["ema", "window"])
def test_reset_restores_the_starting_state(bn_model, estimator):
    xs = batches(sizes=(2, 1, 3, 1, 2))
    fresh = run(stream_adapt(bn_model, 0.9, estimator=estimator, momentum=0.2, window=4), xs)
    s = stream_adapt(bn_model, 0.9, estimator=estimator, momentum=0.2, window=4)
    run(s, batches(seed=5))
    s.reset()
    assert s.images_since_reset == 0
    assert close(run(s, xs), fresh, atol=0)
    # reset_every=k: before the first batch that starts at or after k images
    auto = stream_adapt(bn_model, 0.9, estimator=estimator, momentum=0.2, window=4, reset_every=3)
    manual = stream_adapt(bn_model, 0.9, estimator=estimator, momentum=0.2, window=4)
    seq = batches(sizes=(2, 1, 3, 1, 2))  # resets before the 3rd batch (3 images since) and the 4th (3 since)
    a = run(auto, seq)
    b = []
    with torch.no_grad():
        for i, x in enumerate(seq):
            if i in (2, 3):
                manual.reset()
            b.append(manual(x))
    assert close(a, b, atol=0)


def test_user_model_untouched_train_eval_immune_dtype_and_device(bn_model):
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    xs = batches()
    s = stream_adapt(bn_model, 0.8, estimator="ema", momentum=0.1)
    s.train()
    a = run(s, xs)
    s2 = stream_adapt(bn_model, 0.8, estimator="ema", momentum=0.1).eval()
    assert close(a, run(s2, xs), atol=0)
    assert all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())
    assert all(type(m) is not AdaptiveBatchNorm for _, m in bn_layers(bn_model))
    assert isinstance(s, StreamAdapted)
    # the estimate moves and casts with the module (.double(), .to(device)); works under inference_mode
    d = stream_adapt(bn_model, 0.8, estimator="window", window=5).double().to("cpu")
    with torch.inference_mode():
        out = [d(x.double()) for x in xs]
    assert out[-1].dtype == torch.float64
    assert close([o.float() for o in out], run(stream_adapt(bn_model, 0.8, estimator="window", window=5), xs), atol=1e-5)


def test_gradients_flow_through_the_current_batch(bn_model):
    for est in ("ema", "window", "prior"):
        s = stream_adapt(bn_model, estimator=est, momentum=0.3, prior_n=2)
        with torch.no_grad():
            s(torch.rand(3, 1, 12, 12))
        x = torch.rand(4, 1, 12, 12, requires_grad=True)
        ref = copy.deepcopy(s)
        out = s(x)
        with torch.no_grad():
            assert torch.allclose(out, ref(x.detach()), atol=1e-5)  # same values as the no-grad path
        out[0].sum().backward()
        assert x.grad[1:].abs().sum() > 0, est  # image 0's output depends on images 1..3 through the estimate


def test_robust_statistics_clean_and_with_outliers():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 20000, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [3.0]]) + torch.tensor([[0.0], [1.0], [-2.0], [5.0]])
    var, mean = torch.var_mean(v, dim=1, correction=0)
    for kind in ("median", "trimmed"):
        loc, rvar = robust_mean_var(v, kind)
        assert torch.allclose(loc, mean, atol=0.05 * var.sqrt().max())
        assert torch.allclose(rvar.sqrt(), var.sqrt(), rtol=0.05)
        # 2% of the values poisoned far away: the ordinary statistics move a lot, the robust ones barely
        bad = v.clone()
        bad[:, :400] = 1e3
        pvar, pmean = torch.var_mean(bad, dim=1, correction=0)
        ploc, prvar = robust_mean_var(bad, kind)
        assert (pmean - mean).abs().min() > 10
        assert torch.allclose(ploc, mean, atol=0.1 * var.sqrt().max())
        assert torch.allclose(prvar.sqrt(), var.sqrt(), rtol=0.15)
    x = torch.randn(8, 3, 6, 6, generator=g)
    m, s2 = robust_batch_stats(x, "median")
    assert m.shape == (3,) and s2.shape == (3,)


def test_robust_adaptation_per_batch_and_online(bn_model):
    x = torch.randn(16, 1, 12, 12) * 0.3 + 0.5
    with torch.no_grad():
        plain = adapt(bn_model, 1.0)(x)
        for kind in ("median", "trimmed"):
            rob = adapt(bn_model, 1.0, robust=kind)(x)
            assert (rob.argmax(1) == plain.argmax(1)).float().mean() >= 0.8  # clean: nearly the same decisions
            # one poisoned image moves the plain batch statistics, far less the robust ones
            poisoned = torch.cat([x[:15], torch.full((1, 1, 12, 12), 50.0)])
            d_plain = (adapt(bn_model, 1.0)(poisoned)[:15] - plain[:15]).abs().mean()
            d_rob = (adapt(bn_model, 1.0, robust=kind)(poisoned)[:15] - rob[:15]).abs().mean()
            assert d_rob < 0.3 * d_plain
            for est in ("ema", "window", "prior"):
                s = stream_adapt(bn_model, estimator=est, robust=kind, window=16, prior_n=0)
                out = s(x)
                assert out.shape == plain.shape and torch.isfinite(out).all()
    # robust window is not differentiable: a clear error
    s = stream_adapt(bn_model, estimator="window", robust="median")
    with pytest.raises(BnadaptError, match="no_grad"):
        s(torch.rand(3, 1, 12, 12, requires_grad=True))


def test_snapshot_rules(bn_model):
    s = stream_adapt(bn_model, estimator="ema")
    with pytest.raises(BnadaptError, match="holds 0 image"):
        s.snapshot()
    with torch.no_grad():
        s(torch.rand(3, 1, 12, 12))
    frozen = s.snapshot()
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(frozen(x), to_plain(frozen)(x), atol=1e-6)
    with pytest.raises(BnadaptError, match="prior"):
        stream_adapt(bn_model, estimator="prior").snapshot()
    # adapt() on a stream model gives back the per-batch mechanism
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(adapt(s.net, 1.0)(x), adapt(bn_model, 1.0)(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"momentum": 0.0}, "momentum"), ({"momentum": 1.5}, "momentum"), ({"window": 1}, "window"),
    ({"prior_n": -1.0}, "prior_n"), ({"estimator": "kalman"}, "estimator"), ({"robust": "mode"}, "robust"),
    ({"estimator": "prior", "rho": 0.5}, "prior"), ({"reset_every": 0}, "reset_every"), ({"rho": 1.2}, "rho"),
])
def test_bad_input_one_line(bn_model, kwargs, match):
    with pytest.raises(BnadaptError, match=match) as e:
        stream_adapt(bn_model, **kwargs)
    assert "\n" not in str(e.value)


def test_low_precision_autocast_keeps_the_estimate_in_float32(bn_model):
    from bnadapt.runs import autocast

    for est in ("ema", "window", "prior"):
        s = stream_adapt(bn_model, None if est == "prior" else 0.7, estimator=est, momentum=0.2, prior_n=4)
        with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
            outs = [s(x) for x in batches()]
        assert all(torch.isfinite(o).all() for o in outs)
        layer = s.net.bn
        assert layer._st is None or layer._st[0].dtype == torch.float32
        if est != "prior":
            assert layer.seen == sum(x.shape[0] for x in batches())
