"""Device, precision and thread plumbing. CPU tests run everywhere; CUDA tests skip without a GPU (CI
has none, and no GPU has been lent to this project's sessions so far: docs/performance.md says so).
Where a CUDA kernel is stricter than its CPU twin, a CPU test enforces the CUDA contract."""

import pytest
import torch

from bnadapt.errors import BnadaptError
from bnadapt.runs import autocast, check_precision, generator, resolve_device

from tests.conftest import make_trained_bn_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    for bad in ("tpu", "cuda:x", "", "mps:0"):
        with pytest.raises(BnadaptError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(BnadaptError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_torchrun_ranks_map_to_their_gpu_and_backend(monkeypatch):
    """Under torchrun a bare ``cuda`` is ``cuda:LOCAL_RANK`` and the group uses nccl on CUDA, gloo on the
    CPU; the group is destroyed on exit, even after an error (CUDA faked: CI has no GPU)."""
    import torch.distributed as dist

    from bnadapt import runs

    monkeypatch.setattr(runs, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    with pytest.raises(BnadaptError, match="4 GPU"):
        resolve_device("cuda:4")
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy", None)))
    with pytest.raises(RuntimeError, match="boom"):
        with runs.distributed(torch.device("cuda", 3)) as multi:
            assert multi
            raise RuntimeError("boom")
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl"), ("destroy", None)]
    calls.clear()
    with runs.distributed(torch.device("cpu")):
        pass
    assert calls == [("init", "gloo"), ("destroy", None)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    calls.clear()
    with runs.distributed(torch.device("cpu")) as multi:
        assert not multi
    assert calls == []


def test_precision_rules():
    cpu = torch.device("cpu")
    assert check_precision("bf16", cpu) == "bf16"
    with pytest.raises(BnadaptError, match="fp16 needs a CUDA device"):
        check_precision("fp16", cpu)
    with pytest.raises(BnadaptError, match="precision"):
        check_precision("int8", cpu)
    with autocast(cpu, "bf16"):
        y = torch.nn.Linear(4, 2)(torch.rand(3, 4))
    assert y.dtype == torch.bfloat16


def test_generators_live_on_their_device_and_repeat():
    g1, g2 = generator(0, 5), generator(0, 5)
    assert g1.device.type == "cpu" and torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert not torch.equal(torch.rand(4, generator=generator(0, 6)), torch.rand(4, generator=generator(0, 5)))


def test_bf16_noise_accuracy_on_cpu_runs():
    from bnadapt.data import TensorImageDataset
    from bnadapt.noise import accuracy

    model = make_trained_bn_model()
    ds = TensorImageDataset(torch.rand(24, 1, 12, 12), torch.arange(24) % 3)
    a32 = accuracy(model, ds, sigma=0.1, rho=1.0, batch_size=8, device="cpu")
    a16 = accuracy(model, ds, sigma=0.1, rho=1.0, batch_size=8, device="cpu", precision="bf16")
    assert 0 <= a16 <= 1 and abs(a32 - a16) <= 0.5


@cuda
def test_noise_and_adaptation_on_cuda():
    from bnadapt.adapt import adapt
    from bnadapt.data import TensorImageDataset
    from bnadapt.noise import accuracy

    model = make_trained_bn_model().cuda()
    ds = TensorImageDataset(torch.rand(24, 1, 12, 12), torch.arange(24) % 3)
    a = accuracy(model, ds, sigma=0.2, rho=1.0, batch_size=8, device="cuda", seed=1)
    assert a == accuracy(model, ds, sigma=0.2, rho=1.0, batch_size=8, device="cuda", seed=1)  # reproducible
    x = torch.rand(8, 1, 12, 12, device="cuda")
    cpu_model = make_trained_bn_model()
    assert torch.allclose(adapt(model, 0.5)(x).cpu(), adapt(cpu_model, 0.5)(x.cpu()), atol=1e-4)
    for p in ("bf16", "fp16"):
        accuracy(model, ds, sigma=0.2, rho=1.0, batch_size=8, device="cuda", precision=p)


@cuda
def test_certify_on_cuda(tmp_path):
    from bnadapt.certify import certify
    from bnadapt.data import select
    from bnadapt.models import load_model

    loaded = load_model("zoo:adv-l2-1.5")
    sel = select("fashion-mnist", images=3)
    res = certify(loaded, sel, tmp_path / "c.tsv", sigmas=[0.5], adapt=True, n0=16, n=512, alpha=0.01,
                  sample_batch=256, device="cuda", compile=False, quiet=True)
    assert res.inputs["device"] == "cuda" and res.results["complete"]


def test_stream_statistics_kernel_follows_the_cuda_contract(monkeypatch):
    """CUDA's ``batch_norm_update_stats`` takes a running mean only together with a running variance
    (``TORCH_CHECK(running_mean.defined() == running_var.defined())``); the CPU kernel accepts a mean
    alone. The ema estimator used to pass the mean alone: fine on CPU, a crash on CUDA from the second
    batch of every stream. Every call must honour the stricter contract, and the values stay the same."""
    from bnadapt.adapt import stream_adapt

    real = torch.batch_norm_update_stats

    def strict(x, running_mean, running_var, momentum):
        assert (running_mean is None) == (running_var is None), "running_mean and running_var: both or neither"
        return real(x, running_mean, running_var, momentum)

    m = make_trained_bn_model()
    xs = [torch.rand(b, 1, 12, 12, generator=torch.Generator().manual_seed(b)) for b in (4, 1, 3, 2)]
    with torch.no_grad():
        ref = [y.clone() for y in map(stream_adapt(m, estimator="ema", momentum=0.2), xs)]
        monkeypatch.setattr(torch, "batch_norm_update_stats", strict)
        for est in ("ema", "window", "prior"):
            kw = {"prior_n": 4} if est == "prior" else {"momentum": 0.2, "window": 4, "rho": 0.7}
            net = stream_adapt(m, estimator=est, **kw)
            out = [net(x) for x in xs]
            if est == "ema":
                net = stream_adapt(m, estimator="ema", momentum=0.2)
                assert all(torch.equal(net(x), r) for x, r in zip(xs, ref))
        for rho in (1.0, 0.5):
            from bnadapt.adapt import adapt
            adapt(m, rho)(xs[0])
    assert len(out) == len(xs)


@cuda
def test_stream_adaptation_on_cuda():
    from bnadapt.adapt import stream_adapt

    m = make_trained_bn_model()
    xs = [torch.rand(b, 1, 12, 12) for b in (4, 1, 3, 1, 2)]
    for est in ("ema", "window", "prior"):
        for robust in (None, "trimmed"):
            kw = {"prior_n": 4} if est == "prior" else {"momentum": 0.2, "window": 4}
            cpu = stream_adapt(m, estimator=est, robust=robust, **kw)
            gpu = stream_adapt(m, estimator=est, robust=robust, **kw).cuda()
            with torch.no_grad():
                for x in xs:
                    assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4)
            if est != "prior":
                gpu.snapshot()


def test_adaptation_under_bf16_autocast_on_cpu():
    """Every adaptation mode runs under CPU bf16 autocast (adapt-then-freeze at rho 1 used to fail with
    'mixed dtype': its statistics stayed bf16); statistics are fp32 and outputs close to fp32's."""
    from bnadapt.adapt import adapt, adapt_then_freeze, stream_adapt

    m = make_trained_bn_model()
    x = torch.rand(16, 1, 12, 12)
    for make in (lambda: adapt(m, 1.0), lambda: adapt(m, 0.5), lambda: adapt_then_freeze(m, x, 1.0),
                 lambda: adapt_then_freeze(m, x, 0.5), lambda: adapt(m, 1.0, robust="trimmed"),
                 lambda: stream_adapt(m, estimator="ema")):
        ref = make()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = make()(x)
        assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=0.15, rtol=0.05)
