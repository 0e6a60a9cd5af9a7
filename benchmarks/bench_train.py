"""Training throughput of the ``standard`` and ``pgd-linf`` (7 steps) recipes, images per second.

Runs :func:`bnadapt.train.training_step` (augmentation, PGD in eval mode, SGD update in train mode;
exactly what ``bnadapt train`` runs per batch) on the Fashion-MNIST PreActResNet (depth 2, widths
16/32/64, ~175k parameters) with random 1x28x28 batches of 128. Each configuration: one warm-up run,
then ``--repeats`` timed runs (interleaved across configurations) of a fixed number of steps; the median is reported. Both memory formats
(channels_last and default contiguous) are measured; the JSON line describes the format that
``bnadapt train`` uses (channels_last).

Reference: PGD-K training costs about K+1 = 8 times a clean step (7 attack forward/backward passes
plus the update), so ``pgd_over_standard`` is compared with ``k_plus_1`` = 8 (GUIDE: about 6.5x, since
attack steps skip the weight gradients). The last line of output is one JSON object.

    .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--standard-steps 20] [--pgd-steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bnadapt.attacks import LinfPGD
from bnadapt.models import build_model
from bnadapt.train import FMNIST_ARCH, MOMENTUM, WEIGHT_DECAY, training_step

BATCH = 128
PGD_STEPS = 7
EPS = 0.1


def make_runner(recipe: str, channels_last: bool, n_steps: int):
    """A function timing ``n_steps`` training steps of ``recipe``; returns images/s."""
    torch.manual_seed(0)
    model = build_model("preact_resnet", FMNIST_ARCH)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(0)
    attack = LinfPGD(EPS, steps=PGD_STEPS, step_size=EPS / 4) if recipe == "pgd-linf" else None
    batches = [(torch.randint(0, 256, (BATCH, 1, 28, 28), dtype=torch.uint8, generator=gen).float() / 255,
                torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(n_steps)]

    def one_run() -> float:
        t0 = time.perf_counter()
        for x, y in batches:
            training_step(model, opt, x, y, attack=attack, generator=gen, channels_last=channels_last)
        return n_steps * BATCH / (time.perf_counter() - t0)

    return one_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median; default 5)")
    ap.add_argument("--standard-steps", type=int, default=20, help="steps per timed standard run (default 20)")
    ap.add_argument("--pgd-steps", type=int, default=4, help="steps per timed pgd-linf run (default 4)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as in bnadapt train

    configs = [(recipe, cl, n) for cl in (True, False)
               for recipe, n in (("standard", args.standard_steps), ("pgd-linf", args.pgd_steps))]
    runners = {(recipe, cl): make_runner(recipe, cl, n) for recipe, cl, n in configs}
    for fn in runners.values():
        fn()  # warm-up (allocator, oneDNN primitive caches), not timed
    # Interleave the timed runs so that load from other processes hits every configuration alike.
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            times[k].append(fn())
    res = {k: statistics.median(v) for k, v in times.items()}
    rows = [(recipe, "channels_last" if cl else "contiguous", res[recipe, cl]) for recipe, cl, _ in configs]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"PreActResNet {FMNIST_ARCH['widths']} depth {FMNIST_ARCH['depth']}, median of {args.repeats}")
    print(f"{'recipe':<10} {'format':<14} {'img/s':>8}  {'s/epoch (55k)':>13}")
    for recipe, fmt, ips in rows:
        print(f"{recipe:<10} {fmt:<14} {ips:>8.0f}  {55000 / ips:>13.1f}")
    for recipe in ("standard", "pgd-linf"):
        print(f"channels_last speed-up, {recipe}: {res[recipe, True] / res[recipe, False]:.2f}x")
    std, pgd = res["standard", True], res["pgd-linf", True]
    print(json.dumps({"pgd_over_standard": round(std / pgd, 3), "k_plus_1": PGD_STEPS + 1,
                      "standard_img_s": round(std, 1), "pgd_img_s": round(pgd, 1)}))


if __name__ == "__main__":
    main()
