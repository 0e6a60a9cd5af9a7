"""Loss gradients and Fourier spectra (paper Fig. 2 / Appendix C and Fig. 4 / Appendix F.2).

**Loss-gradient maps** (:func:`gradient_maps`). For a few test images and each noise level sigma,
the gradient of the cross-entropy loss of image i with respect to image i, ``d loss_i / d x_i``, for
each model without adaptation (eval mode) and with per-batch adaptation. With adaptation the image sits
in a test batch of ``batch_size`` noisy images (the others drawn from the test set) and the gradient
goes through that batch's statistics: one backward pass per image, so other images' losses do not
leak into it. The raw gradients are stored in an ``.npz`` beside the result file; figures show them
"scaled, translated and clipped" as the paper says: ``clip(0.5 + g / (6 std(g)), 0, 1)`` per map,
nothing else. The result file summarizes each map by its **background share**: the fraction of the
gradient's L1 mass on background pixels (pixels darker than 0.1 in the clean image) — the paper's
observation is that adaptation lowers it under noise.

**Spectra** (:func:`corruption_spectra`). For each corruption and severity, the mean magnitude of the
2-D Fourier transform (centered, averaged over channels and images) of the corruption itself
(``x_corrupted - x_clean``) and of the loss gradients on the corrupted images with and without
adaptation (Yin et al. 2019's Fourier view); the result summarizes each by its **high-frequency share**
(energy outside the central quarter of the spectrum).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bnadapt.adapt import adapt
from bnadapt.corruptions.names import check_severity, parse_corruptions
from bnadapt.errors import check, check_batch_size, check_count, check_rho, check_seed, check_sigma, check_unique
from bnadapt.models.setup import setup_models
from bnadapt.results import Result, atomic_write_bytes, make_inputs
from bnadapt.runs import generator, resolve_device, to_device

BACKGROUND = 0.1


def _grad_one(net, batch: torch.Tensor, labels: torch.Tensor, i: int) -> torch.Tensor:
    """d CE(net(batch)[i], labels[i]) / d batch[i], through the whole batch's forward."""
    with torch.inference_mode(False), torch.enable_grad():
        x = batch.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(net(x)[i:i + 1], labels[i:i + 1])
        (g,) = torch.autograd.grad(loss, x)
    return g[i].detach()


def display(g: np.ndarray) -> np.ndarray:
    """The paper's visualization of one gradient map (C, H, W): scaled, translated, clipped to [0, 1]."""
    s = float(g.std()) or 1.0
    return np.clip(0.5 + g / (6.0 * s), 0.0, 1.0)


def background_share(g: np.ndarray, clean: np.ndarray) -> float:
    """Fraction of |g|'s mass on background pixels (clean intensity < 0.1 in every channel)."""
    a = np.abs(g).sum(axis=0)
    bg = (clean.max(axis=0) < BACKGROUND)
    total = float(a.sum())
    return float(a[bg].sum() / total) if total > 0 else 0.0


def _grad_params(sel, *, sigmas=(0.0, 0.25, 0.5, 0.75), images=4, rho=1.0, batch_size=128, seed=0, device=None):
    sigmas = check_unique([check_sigma(s, "sigmas") for s in sigmas], "sigmas")
    images = check_count(images, "images")
    batch_size = check_batch_size(batch_size, "batch size", adapting=True)
    check(len(sel) >= max(images, 2), f"the data holds {len(sel)} images; gradient maps need at least {max(images, 2)}")
    batch_size = min(batch_size, len(sel))
    check(images <= batch_size, f"images ({images}) must fit in one test batch of {batch_size}")
    return dict(sigmas=sigmas, images=images, rho=check_rho(rho), batch_size=batch_size, seed=check_seed(seed),
                device=resolve_device(device))


def gradient_maps_inputs(models: Sequence, sel, **kw) -> dict:
    """The ``inputs`` of :func:`gradient_maps` for these arguments (computed without running it)."""
    p = _grad_params(sel, **kw)
    return make_inputs(models=[m.describe() for m in models], data=sel.describe(),
                       params={"sigmas": p["sigmas"], "images": p["images"], "rho": p["rho"],
                               "batch_size": p["batch_size"],
                               "loss": "cross-entropy of the image itself, gradient w.r.t. that image",
                               "display": "clip(0.5 + g / (6 std g), 0, 1)", "background": f"clean < {BACKGROUND}"},
                       seed=p["seed"], device=p["device"], precision="fp32")


def gradient_maps(models: Sequence, sel, out_npz: str | Path, **kw) -> Result:
    """Fig. 2: loss-gradient maps of each model (``LoadedModel``) with and without adaptation as sigma
    grows (keywords: sigmas, images, rho, batch_size, seed, device), for the first ``images`` images of
    ``sel`` (the rest of each test batch: other images of ``sel``). Writes the raw gradients, the noisy
    inputs and the clean images to ``out_npz``."""
    p = _grad_params(sel, **kw)
    sigmas, images, rho, batch_size, seed, dev = (p[k] for k in ("sigmas", "images", "rho", "batch_size", "seed", "device"))
    t0 = time.time()
    _, _, nets, _ = setup_models(models, sel.image_shape, sel.num_classes, device=dev, adapting="all",
                                 needs="a gradient map (it adapts the model)")
    idx = np.asarray(sel.indices[:batch_size])  # the shown images first, then their batch mates
    clean, labels = sel.dataset.get(idx)
    clean, labels = to_device(clean, dev), labels.to(dev)
    arrays: dict[str, np.ndarray] = {"clean": clean[:images].cpu().numpy(), "labels": labels[:images].cpu().numpy(),
                                     "sigmas": np.asarray(sigmas, dtype=np.float64)}
    rows = []
    for m_i, m in enumerate(models):
        std_net = nets[m_i]
        ada_net = adapt(std_net, rho)
        for s_i, s in enumerate(sigmas):
            gen = generator(seed, 17, s_i, device=dev)  # the same noisy batch for every model
            x = clean + s * torch.randn(clean.shape, generator=gen, device=dev) if s > 0 else clean
            if m_i == 0:
                arrays[f"noisy_s{s_i}"] = x[:images].cpu().numpy()
            for mode, net in (("standard", std_net), ("adapted", ada_net)):
                g = torch.stack([_grad_one(net, x, labels, i) for i in range(images)]).cpu().numpy()
                arrays[f"grad_m{m_i}_s{s_i}_{mode}"] = g
                shares = [background_share(g[i], arrays["clean"][i]) for i in range(images)]
                with torch.no_grad():
                    pred = net(x).argmax(1)[:images].cpu().numpy()
                rows.append({"model": m.name, "sigma": s, "mode": mode, "background_share": shares,
                             "mean_background_share": float(np.mean(shares)),
                             "correct": [int(p == int(y)) for p, y in zip(pred, arrays["labels"])]})
    _save_npz(out_npz, arrays)
    return Result("gradient_maps", gradient_maps_inputs(models, sel, **kw),
                  {"npz": str(out_npz), "models": [m.name for m in models], "rows": rows}, time.time() - t0)


def spectrum(batch: np.ndarray) -> np.ndarray:
    """Mean magnitude of the centered 2-D FFT of (N, C, H, W) arrays, averaged over N and C: (H, W)."""
    f = np.fft.fftshift(np.abs(np.fft.fft2(batch, axes=(-2, -1))), axes=(-2, -1))
    return f.mean(axis=(0, 1))


def high_frequency_share(spec: np.ndarray) -> float:
    """Share of the spectrum's energy (squared magnitude) outside its central quarter (|f| < 1/4 band)."""
    h, w = spec.shape
    e = spec.astype(np.float64) ** 2
    cy, cx, ry, rx = h // 2, w // 2, max(h // 8, 1), max(w // 8, 1)
    low = e[cy - ry:cy + ry + 1, cx - rx:cx + rx + 1].sum()
    total = e.sum()
    return float(1.0 - low / total) if total > 0 else 0.0


def _spectra_params(cset, *, corruptions=None, severity: int = 3, images=64, rho=1.0, batch_size=64, seed=0,
                    device=None):
    names = [c for c in parse_corruptions(corruptions) if c in cset.available]
    check(bool(names), f"{cset.root} holds none of the requested corruptions; generate them first")
    return dict(names=names, severity=check_severity(int(severity)), images=min(check_count(images, "images", min=2), cset.n),
                rho=check_rho(rho), seed=check_seed(seed), batch_size=check_batch_size(batch_size, "batch size", adapting=True),
                device=resolve_device(device))


def spectra_inputs(model, cset, clean, **kw) -> dict:
    """The ``inputs`` of :func:`corruption_spectra` (computed without running it)."""
    p = _spectra_params(cset, **kw)
    return make_inputs(models=[model.describe()], data={"set": cset.describe(), "clean": clean[2], "n": p["images"]},
                       params={"corruptions": p["names"], "severity": p["severity"], "images": p["images"],
                               "rho": p["rho"], "batch_size": p["batch_size"],
                               "spectrum": "mean |fftshift(fft2)| over images and channels",
                               "high_frequency": "energy outside the central quarter band"},
                       seed=p["seed"], device=p["device"], precision="fp32")


def corruption_spectra(model, cset, clean, out_npz: str | Path, **kw) -> Result:
    """Fig. 4: for each corruption of the corrupted set ``cset`` at ``severity``, the spectrum of the
    corruption (corrupted minus clean image, position by position: ``clean`` is the aligned clean set,
    ``(dataset, indices, description)`` as :func:`bnadapt.corruptions.evaluate.clean_set` returns it)
    and of the loss gradients with and without adaptation, on the set's first ``images`` images
    (keywords: corruptions, severity, images, rho, batch_size, seed, device)."""
    p = _spectra_params(cset, **kw)
    images, rho, batch_size, dev = p["images"], p["rho"], p["batch_size"], p["device"]
    check(clean is not None, f"the clean images of {cset.root} are unknown; spectra need them (see --clean)")
    t0 = time.time()
    _, _, (std_net,), _ = setup_models([model], tuple(cset.image_shape), len(cset.class_names), device=dev,
                                       adapting="all", needs="a spectrum (it adapts the model)")
    clean_x, labels = clean[0].get(np.asarray(clean[1][:images]))
    ada_net = adapt(std_net, rho)
    arrays: dict[str, np.ndarray] = {"clean_example": clean_x[0].numpy()}
    rows = []
    for name in p["names"]:
        xc, yc = cset.dataset(name, p["severity"]).get(np.arange(images))
        check(bool(torch.equal(yc, labels)), f"corrupted set {name} is not aligned with the clean images (labels differ)")
        pert = (xc - clean_x).numpy()
        row = {"corruption": name, "severity": p["severity"], "perturbation_hf_share": high_frequency_share(spectrum(pert))}
        arrays[f"{name}/perturbation"] = spectrum(pert)
        arrays[f"{name}/example"] = xc[0].numpy()
        x, y = to_device(xc, dev), labels.to(dev)
        for mode, net in (("standard", std_net), ("adapted", ada_net)):
            grads = []
            for start in range(0, images, batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                if len(xb) < 2:
                    continue
                with torch.inference_mode(False), torch.enable_grad():
                    xg = xb.detach().clone().requires_grad_(True)
                    # summed per-image losses: for the adapted model this includes each loss's path
                    # through the shared statistics (the gradient an attacker on the batch would see)
                    (g,) = torch.autograd.grad(F.cross_entropy(net(xg), yb, reduction="sum"), xg)
                grads.append(g.detach().cpu().numpy())
            g = np.concatenate(grads)
            spec = spectrum(g)
            arrays[f"{name}/grad_{mode}"] = spec
            arrays[f"{name}/grad_example_{mode}"] = g[0]
            row[f"gradient_hf_share_{mode}"] = high_frequency_share(spec)
        rows.append(row)
    _save_npz(out_npz, arrays)
    return Result("spectra", spectra_inputs(model, cset, clean, **kw),
                  {"npz": str(out_npz), "model": model.name, "rows": rows}, time.time() - t0)


def _save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a gradients/spectra ``.npz`` (never unpickled)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
