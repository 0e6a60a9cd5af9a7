"""Helper for tests/test_smoothing.py: a tiny certification run under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_torchrun_certify.py OUTDIR

writes ``OUTDIR/dist.tsv`` (merged by rank 0) plus the per-rank ``dist.tsv.rank<r>`` files. The test
imports :func:`build_model`, :func:`build_dataset`, :data:`INDICES` and :data:`RUN` from here to make
the single-process reference run with exactly the same setup.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from bnadapt.certify import certify_run_distributed
from bnadapt.smoothing import Smooth

NUM_CLASSES = 3
INDICES = [5, 0, 3, 6, 2, 1]  # deliberately not sorted: merged rows follow this order
RUN = dict(sigmas=[0.25, 0.5], n0=8, n=64, alpha=0.05, seed=123)
BATCH_SIZE = 32


def build_model() -> nn.Module:
    """A tiny conv net with a BatchNorm layer in eval mode (deterministic weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, NUM_CLASSES)
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.linspace(-0.2, 0.2, 4))
        bn.running_var.copy_(torch.linspace(0.5, 1.5, 4))
    return model.eval()


def build_dataset() -> list[tuple[torch.Tensor, int]]:
    """Seven 1x4x4 images in [0, 1] with labels 0, 1, 2, 0, ..."""
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(7, 1, 4, 4, generator=g)
    return [(xs[i], i % NUM_CLASSES) for i in range(7)]


def factory(sigma: float) -> Smooth:
    return Smooth(build_model(), NUM_CLASSES, sigma, batch_size=BATCH_SIZE)


def main(outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        certify_run_distributed(factory, build_dataset(), INDICES, Path(outdir) / "dist.tsv", quiet=True, **RUN)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
