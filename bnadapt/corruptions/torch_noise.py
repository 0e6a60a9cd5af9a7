"""The noise family (gaussian, shot, impulse, speckle) in torch, on any device, with either table.

Each function reproduces the library's arithmetic (``imagecorruptions-imaug`` 1.1.5, which follows
Hendrycks' ImageNet-C code): pixels ``x = u / 255`` in float64, the noise, ``clip(., 0, 1) * 255``
and the truncating ``uint8`` cast. It is equal in distribution to the library at the same table
(tests/test_corruptions.py compares moments and histograms), not equal in bytes: the random streams
differ. Every image draws from its own generator seeded with
:func:`bnadapt.corruptions.names.corruption_seed`, so a set does not depend on batch size, order or
worker count; a CPU set is reproducible byte for byte, a CUDA set too but with other bytes than CPU.

- gaussian_noise: ``x + N(0, c^2)`` per pixel and channel;
- shot_noise: ``Poisson(x * c) / c`` (``c`` photons per unit intensity);
- impulse_noise: with probability ``c`` a pixel channel is replaced, half by 1 (salt) and half by 0
  (pepper), as scikit-image's ``random_noise(mode='s&p', amount=c)``;
- speckle_noise: ``x + x * N(0, c^2)``.

For gray images the library is fed three equal channels and bnadapt keeps the first, which is one
independent draw per pixel: exactly what these functions draw for a one-channel image.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bnadapt.corruptions.names import TORCH_NOISE, check_params, check_severity, corruption_seed, table_for
from bnadapt.errors import check


def _noisy(x: torch.Tensor, corruption: str, c: float, gen: torch.Generator) -> torch.Tensor:
    """One image (float64 in [0, 1]) with the noise of ``corruption`` at parameter ``c`` (unclipped)."""
    if corruption == "gaussian_noise":
        return x + c * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    if corruption == "shot_noise":
        return torch.poisson(x * c, generator=gen) / float(c)
    if corruption == "impulse_noise":
        flipped = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) <= c
        salted = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) <= 0.5
        out = x.clone()
        out[flipped & salted] = 1.0
        out[flipped & ~salted] = 0.0
        return out
    if corruption == "speckle_noise":
        return x + x * (c * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))
    raise AssertionError(corruption)  # pragma: no cover - checked by the caller


def noise_images(images: torch.Tensor, corruption: str, severity: int, *, params: str = "imagenet",
                 seed: int = 0, indices: Sequence[int] | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``corruption`` at ``severity`` of table ``params`` applied to uint8 ``images`` (N, C, H, W),
    image ``k`` seeded with ``corruption_seed(seed, corruption, severity, indices[k])`` (default
    ``indices = 0..N-1``: pass the images' indices in their data set). Runs on ``device`` (default:
    where ``images`` are) and returns uint8 images of the same shape on that device."""
    check(corruption in TORCH_NOISE, f"the torch path covers {', '.join(TORCH_NOISE)} only (not {corruption!r}); "
                                     "use the library engine for the other corruptions")
    severity = check_severity(severity)
    c = float(table_for(check_params(params), [corruption])[corruption][severity - 1])
    check(images.dtype == torch.uint8 and images.dim() == 4,
          f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    idx = list(range(images.shape[0])) if indices is None else [int(i) for i in indices]
    check(len(idx) == images.shape[0], f"{images.shape[0]} images but {len(idx)} indices; give one index per image")
    dev = torch.device(device) if device is not None else images.device
    x = images.to(dev).to(torch.float64) / 255.0
    out = torch.empty(images.shape, dtype=torch.uint8, device=dev)
    gen = torch.Generator(device=dev)
    for k, i in enumerate(idx):
        gen.manual_seed(corruption_seed(seed, corruption, severity, i))
        y = _noisy(x[k], corruption, c, gen)
        out[k] = torch.floor(torch.clamp(y, 0.0, 1.0) * 255.0).to(torch.uint8)
    return out
