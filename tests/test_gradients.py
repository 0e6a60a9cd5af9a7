"""Loss-gradient maps and Fourier spectra (bnadapt/gradients.py, paper Fig. 2 and Fig. 4): without
adaptation a map is d loss / d x of the eval-mode model, image by image; with adaptation the gradient
goes through the statistics of the batch the image sits in (autograd through ``adapt(model, rho)`` on
the whole batch, unlike the frozen copy of the same statistics); the spectrum is the centred 2-D Fourier
amplitude; result files and .npz arrays are written and read back."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnadapt import gradients as G
from bnadapt.adapt import adapt, adapt_then_freeze
from bnadapt.corruptions import names
from bnadapt.data import select
from bnadapt.models import load_model
from bnadapt.results import jsonable, read_result

from tests.conftest import make_tiny_files

BATCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def tiny(tmp_path):
    _, data, ck = make_tiny_files(tmp_path, 40, warm_bn=True)
    return tmp_path, load_model(ck), select(data, images=12)


def _grad(net, x, y, i):
    """d CE(net(x)[i], y[i]) / d x[i], through the forward of the whole batch ``x`` (plain autograd)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x)[i:i + 1], y[i:i + 1]), x)
    return g[i]


def _close(a, b, rel=1e-4):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return bool(torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max()) + 1e-12))


def _maps(tmp_path, model, sel, sigmas=(0.0, 0.5)):
    # every image of the test batch is shown, so the .npz holds the whole batch the gradients went through
    res = G.gradient_maps([model], sel, tmp_path / "maps.npz", sigmas=list(sigmas), images=BATCH, batch_size=BATCH,
                          seed=3, device="cpu")
    return res, G.load_npz(tmp_path / "maps.npz")


def test_map_without_adaptation_is_the_eval_mode_input_gradient(tiny):
    tmp_path, model, sel = tiny
    _, arrays = _maps(tmp_path, model, sel)
    net = copy.deepcopy(model.model).eval()
    y = torch.from_numpy(arrays["labels"]).long()
    for s_i in range(2):
        x = torch.from_numpy(arrays[f"noisy_s{s_i}"])
        got = arrays[f"grad_m0_s{s_i}_standard"]
        assert got.shape == tuple(x.shape)
        for i in range(BATCH):
            alone = _grad(net, x[i:i + 1], y[i:i + 1], 0)  # the image on its own: eval mode has no batch effect
            assert _close(got[i], alone), (s_i, i)
            assert _close(np.abs(got[i]), alone.abs())  # the map |d loss / d x|
    assert np.array_equal(arrays["noisy_s0"], arrays["clean"])  # sigma 0: the clean images
    assert not np.array_equal(arrays["noisy_s1"], arrays["clean"])


def test_map_with_adaptation_goes_through_the_batch_statistics(tiny):
    tmp_path, model, sel = tiny
    _, arrays = _maps(tmp_path, model, sel)
    y = torch.from_numpy(arrays["labels"]).long()
    per_batch = adapt(model.model, 1.0)
    for s_i in range(2):
        x = torch.from_numpy(arrays[f"noisy_s{s_i}"])  # the whole test batch
        frozen = adapt_then_freeze(model.model, x, 1.0)  # the same statistics, frozen: no gradient through them
        with torch.no_grad():
            assert torch.allclose(frozen(x), per_batch(x), atol=1e-5)  # same outputs on this batch...
        got = arrays[f"grad_m0_s{s_i}_adapted"]
        for i in range(BATCH):
            through = _grad(per_batch, x, y, i)
            assert _close(got[i], through), (s_i, i)
            fixed = _grad(frozen, x, y, i)
            # ...but another gradient: the path through the batch mean and variance is part of it
            assert float((torch.from_numpy(got[i]) - fixed).norm()) > 1e-3 * float(fixed.norm()), (s_i, i)
        # and the gradient of image 0 depends on its batch mates (their pixels enter the statistics)
        mates = x.clone()
        mates[1:] = torch.flip(mates[1:], dims=(-1,))
        assert not _close(_grad(per_batch, mates, y, 0), got[0])
    assert not _close(arrays["grad_m0_s1_adapted"], arrays["grad_m0_s1_standard"])


def test_spectrum_is_the_centred_fourier_amplitude():
    h = w = 16
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.cos(2 * np.pi * 3 * xx / w) + 0.5 * np.cos(2 * np.pi * 2 * yy / h)  # 3 cycles across, 2 down
    batch = np.stack([np.stack([img, -img]), np.stack([2 * img, img])]).astype(np.float64)  # (N=2, C=2, H, W)
    spec = G.spectrum(batch)
    amp = np.abs(np.fft.fftshift(np.fft.fft2(img)))
    assert spec.shape == (h, w)
    assert np.allclose(spec, amp * (1 + 1 + 2 + 1) / 4)  # |FFT| per map, then the mean over images and channels
    cy, cx = h // 2, w // 2  # fftshift puts frequency 0 at the centre
    peaks = {tuple(int(v) for v in p) for p in np.argwhere(amp > 1e-6 * amp.max())}
    assert peaks == {(cy, cx - 3), (cy, cx + 3), (cy - 2, cx), (cy + 2, cx)}
    assert np.isclose(amp[cy, cx + 3], h * w / 2) and np.isclose(amp[cy + 2, cx], 0.5 * h * w / 2)
    # the high-frequency share: energy outside the central band
    low = np.cos(2 * np.pi * 1 * xx / w)[None, None]
    high = np.cos(2 * np.pi * 7 * xx / w)[None, None]
    assert G.high_frequency_share(G.spectrum(low)) == pytest.approx(0.0, abs=1e-12)
    assert G.high_frequency_share(G.spectrum(high)) == pytest.approx(1.0, abs=1e-12)
    assert G.high_frequency_share(spec) == pytest.approx(2 * 128 ** 2 / (2 * 128 ** 2 + 2 * 64 ** 2))  # 3 > band 2


def test_gradient_maps_result_and_arrays_round_trip(tiny):
    tmp_path, model, sel = tiny
    res, arrays = _maps(tmp_path, model, sel)
    path = res.write(tmp_path / "maps.json")
    d = read_result(path, "gradient_maps")
    assert d["inputs_sha256"] == res.inputs_sha256 and d["results"] == jsonable(res.results)
    assert d["inputs"] == G.gradient_maps_inputs([model], sel, sigmas=[0.0, 0.5], images=BATCH, batch_size=BATCH,
                                                 seed=3, device="cpu")
    assert set(arrays) == {"clean", "labels", "sigmas", "noisy_s0", "noisy_s1", "grad_m0_s0_standard",
                           "grad_m0_s0_adapted", "grad_m0_s1_standard", "grad_m0_s1_adapted"}
    assert np.array_equal(arrays["sigmas"], [0.0, 0.5])
    clean, labels = sel.dataset.get(sel.indices[:BATCH])
    assert np.array_equal(arrays["clean"], clean.numpy()) and np.array_equal(arrays["labels"], labels.numpy())
    rows = {(r["sigma"], r["mode"]): r for r in d["results"]["rows"]}
    assert set(rows) == {(s, m) for s in (0.0, 0.5) for m in ("standard", "adapted")}
    for s_i, s in enumerate((0.0, 0.5)):
        for mode in ("standard", "adapted"):
            g = arrays[f"grad_m0_s{s_i}_{mode}"]
            shares = [G.background_share(g[i], arrays["clean"][i]) for i in range(BATCH)]
            assert rows[(s, mode)]["background_share"] == pytest.approx(shares)
            assert rows[(s, mode)]["mean_background_share"] == pytest.approx(float(np.mean(shares)))
    again = G.load_npz(tmp_path / "maps.npz")  # read twice: the same arrays, nothing pickled
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)


@pytest.mark.skipif(names.library_version() is None, reason="imagecorruptions-imaug not installed")
def test_corruption_spectra_result_and_arrays(tiny):
    from bnadapt.corruptions.evaluate import clean_set
    from bnadapt.corruptions.generate import generate
    from bnadapt.data.corrupted import open_corrupted

    tmp_path, model, _ = tiny
    sel = select(str(tmp_path / "d.npz"), images=4)
    generate(sel, tmp_path / "c", corruptions=["gaussian_noise", "contrast"], workers=0, seed=0, quiet=True)
    cset = open_corrupted("cifar10-c", tmp_path / "c")
    clean = clean_set(cset)
    kw = dict(corruptions=["gaussian_noise", "contrast"], severity=3, images=4, batch_size=4, seed=0, device="cpu")
    res = G.corruption_spectra(model, cset, clean, tmp_path / "spectra.npz", **kw)
    d = read_result(res.write(tmp_path / "spectra.json"), "spectra")
    assert d["results"] == jsonable(res.results) and d["inputs"] == G.spectra_inputs(model, cset, clean, **kw)
    arrays = G.load_npz(tmp_path / "spectra.npz")
    clean_x, y = clean[0].get(np.asarray(clean[1][:4]))
    eval_net, per_batch = copy.deepcopy(model.model).eval(), adapt(model.model, 1.0)
    for row in d["results"]["rows"]:
        c = row["corruption"]
        xc, _ = cset.dataset(c, 3).get(np.arange(4))
        pert = G.spectrum((xc - clean_x).numpy())
        assert np.allclose(arrays[f"{c}/perturbation"], pert)
        assert row["perturbation_hf_share"] == pytest.approx(G.high_frequency_share(pert))
        for mode, net in (("standard", eval_net), ("adapted", per_batch)):
            x = xc.clone().requires_grad_(True)  # summed loss over the batch: the attacker's view of it
            (g,) = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), x)
            assert _close(arrays[f"{c}/grad_{mode}"], G.spectrum(g.numpy()), rel=1e-3)
            assert row[f"gradient_hf_share_{mode}"] == pytest.approx(G.high_frequency_share(arrays[f"{c}/grad_{mode}"]),
                                                                    rel=1e-9)
    assert arrays["clean_example"].shape == tuple(clean_x[0].shape)
