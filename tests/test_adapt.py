import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnadapt.adapt import AdaptiveBatchNorm, adapt, adapt_then_freeze, bn_layers, to_plain
from bnadapt.errors import BnadaptError


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_mode_outputs(model, x):
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        return m(x)


def test_rho0_equals_standard_inference(bn_model):
    x = torch.rand(8, 1, 12, 12)
    ref = bn_model(x)
    assert torch.equal(adapt(bn_model, 0.0)(x), ref)
    with torch.no_grad():
        assert torch.equal(adapt(bn_model, 0.0)(x), ref)
    frozen = adapt_then_freeze(bn_model, x, rho=0.0)
    assert torch.allclose(frozen(x), ref, atol=1e-6)


def test_rho1_equals_train_mode_batch_stats(bn_model):
    x = torch.rand(8, 1, 12, 12) + 0.3
    ref = train_mode_outputs(bn_model, x)
    a = adapt(bn_model, 1.0)
    with torch.no_grad():
        assert torch.allclose(a(x), ref, atol=1e-5)
    assert torch.allclose(a(x), ref, atol=1e-5)  # grad-enabled path


@pytest.mark.parametrize("rho", [0.3, 0.7])
@pytest.mark.parametrize("interp", ["std", "var"])
def test_mixing_formula_on_a_single_layer(rho, interp):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    model = nn.Sequential(bn).eval()
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    var_t, mean_t = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    mean = rho * mean_t + (1 - rho) * bn.running_mean
    if interp == "std":
        var = (rho * var_t.sqrt() + (1 - rho) * bn.running_var.sqrt()) ** 2
    else:
        var = rho * var_t + (1 - rho) * bn.running_var
    ref = F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    a = adapt(model, rho, interpolate=interp)
    with torch.no_grad():
        assert torch.allclose(a(x), ref, atol=1e-4)
    assert torch.allclose(a(x), ref, atol=1e-5)
    frozen = adapt_then_freeze(model, x, rho, interpolate=interp)
    assert torch.allclose(frozen(x), ref, atol=1e-5)


def test_freeze_rho1_on_x_equals_per_batch_on_x(bn_model):
    x = torch.rand(16, 1, 12, 12) * 0.8 + 0.1
    per_batch = adapt(bn_model, 1.0)
    frozen = adapt_then_freeze(bn_model, x, rho=1.0)
    with torch.no_grad():
        assert torch.allclose(frozen(x), per_batch(x), atol=1e-5)
        # frozen: outputs on another batch do not depend on that batch's statistics
        x2 = torch.rand(4, 1, 12, 12)
        single = torch.cat([frozen(x2[i:i + 1]) for i in range(4)])
        assert torch.allclose(frozen(x2), single, atol=1e-5)


def test_multi_batch_pooling_equals_one_big_batch_for_single_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm2d(2)).eval()
    x = torch.randn(12, 2, 3, 3) * 3
    one = adapt_then_freeze(model, x, 1.0)
    many = adapt_then_freeze(model, [x[:5], x[5:9], x[9:]], 1.0)
    with torch.no_grad():
        assert torch.allclose(one(x), many(x), atol=1e-5)


def test_user_model_untouched_and_immune_to_train_eval(bn_model):
    before = state(bn_model)
    x = torch.rand(8, 1, 12, 12)
    a = adapt(bn_model, 0.5)
    a.train()
    out_train = a(x)
    a.eval()
    out_eval = a(x)
    assert torch.equal(out_train, out_eval)
    f = adapt_then_freeze(bn_model, [x, x + 0.1], 0.8)
    f.train()
    o1 = f(x)
    f.eval()
    assert torch.equal(o1, f(x))
    # statistics of the adapted copies never change either
    sf = state(f)
    f.train()
    f(x)
    assert same_state(sf, state(f))
    assert same_state(before, state(bn_model))
    assert not bn_model.training
    assert all(type(m) is not AdaptiveBatchNorm for _, m in bn_layers(bn_model))


def test_eval_call_does_not_switch_off_adaptation(bn_model):
    x = torch.rand(8, 1, 12, 12) + 0.5
    a = adapt(bn_model, 1.0).eval()
    assert not torch.allclose(a(x), bn_model(x))


def test_gradients_flow_through_batch_statistics(bn_model):
    # With per-batch adaptation an image's output depends on the other images of the batch.
    x = torch.rand(6, 1, 12, 12, requires_grad=True)
    a = adapt(bn_model, 0.5)
    a(x)[0].sum().backward()
    assert x.grad[1:].abs().sum() > 0
    # and the analytic gradient matches finite differences
    a64 = adapt(copy.deepcopy(bn_model).double(), 0.5)
    xd = torch.rand(4, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: a64(z)[:, 0].sum(), (xd,), eps=1e-6, atol=1e-4)


def test_bn1d_and_bn3d_anywhere():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(2 * 8, 4),
                      nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 1, 2, 2, 2)
    assert torch.equal(adapt(m, 0.0)(x), m(x))
    ref = train_mode_outputs(m, x)
    assert torch.allclose(adapt(m, 1.0)(x), ref, atol=1e-5)
    assert torch.allclose(adapt_then_freeze(m, x, 1.0)(x), ref, atol=1e-5)


def test_to_plain_is_ordinary_pytorch(bn_model, tmp_path):
    x = torch.rand(8, 1, 12, 12)
    f = adapt_then_freeze(bn_model, x + 0.2, 0.9)
    plain = to_plain(f)
    assert not any(isinstance(m, AdaptiveBatchNorm) for m in plain.modules())
    assert plain.state_dict().keys() == bn_model.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(plain(x), f(x), atol=1e-6)
    with pytest.raises(BnadaptError):
        to_plain(adapt(bn_model, 1.0))


def test_errors(bn_model):
    with pytest.raises(BnadaptError, match="rho"):
        adapt(bn_model, 1.5)
    with pytest.raises(BnadaptError, match="rho"):
        adapt(bn_model, -0.1)
    with pytest.raises(BnadaptError, match="no BatchNorm"):
        adapt(nn.Sequential(nn.Linear(2, 2)), 1.0)
    a = adapt(bn_model, 1.0)
    with pytest.raises(BnadaptError, match="larger batch"):
        with torch.no_grad():
            adapt(nn.Sequential(nn.BatchNorm1d(3)).eval(), 1.0)(torch.rand(1, 3))
    with pytest.raises(BnadaptError, match="larger batch"):
        adapt(nn.Sequential(nn.BatchNorm1d(3)).eval(), 0.5)(torch.rand(1, 3))
    with pytest.raises(BnadaptError, match="no batches"):
        adapt_then_freeze(bn_model, [], 1.0)
    # a conv feature map gives many values per channel, so a batch of 1 image works for BN2d
    assert a(torch.rand(1, 1, 12, 12)).shape == (1, 3)
