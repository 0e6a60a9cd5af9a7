"""Training recipes: ``standard``, ``gaussian`` (Cohen et al. 2019), ``pgd-linf`` / ``pgd-l2`` (Madry et al. 2018).

``bnadapt train RECIPE --out PATH`` trains the Fashion-MNIST pre-activation ResNet (depth 2, widths
16/32/64, stride-2 stem, about 175k parameters) and writes our checkpoint (``PATH.safetensors`` + the
model card ``PATH.json``). The Python API is :func:`train`; :func:`evaluate_metrics` re-measures the
card's test metrics for any model.

The recipe, exactly:

- **Data.** The training split, minus a validation hold-out of ``val_size`` images chosen with a
  fixed seed (:data:`VAL_SEED`, independent of the training seed, so every model sees the same
  hold-out). Each epoch visits the remaining images in an order drawn from ``(seed, epoch)``; the last
  incomplete batch is dropped (a train-mode BN batch must have more than one image). Augmentation:
  random crop with 2-pixel zero padding and a random horizontal flip, on tensors.
- **Recipes.** ``standard``: clean images. ``gaussian``: every training image gets fresh noise
  ``N(0, sigma^2)`` in pixel space, no clipping (Cohen et al.). ``pgd-linf`` / ``pgd-l2``: every
  training batch is replaced by PGD adversarial examples (random start, ``steps`` steps of
  ``step_size``, default ``2.5 * eps / steps``) -- Madry et al.'s min-max training.
- **Adversarial examples are generated with the model in eval mode**, then the model is trained on
  them in train mode. In eval mode the attack's forwards use the running statistics, so they neither
  update BN statistics nor attack a batch-statistics model that differs from the deployed one (the
  deployed model is evaluated in eval mode); this is also what :mod:`bnadapt.attacks` guarantees:
  an attack leaves the model's state unchanged.
- **Optimizer.** SGD, momentum 0.9, Nesterov, weight decay 5e-4 on all parameters, batch 128, and a
  one-cycle piecewise-linear learning rate per step: 0 -> ``lr`` over the first 40% of the steps, then
  linearly -> 0 (Wong et al. 2020's schedule).
- **Early stopping (Rice et al. 2020).** After every epoch the model is measured on the hold-out in
  eval mode: ``pgd-*``: accuracy under PGD of the training threat model and eps, 10 steps of
  ``2.5 * eps / 10``, random start, fixed seed; ``gaussian``: accuracy under noise ``sigma`` (fixed
  seed); ``standard``: clean accuracy. The best epoch (earliest on ties) is the final model. With
  ``val_size=0`` the last epoch is kept.
- **Determinism.** Model initialization, shuffling, augmentation, noise and PGD random starts all
  come from ``seed`` (``torch.manual_seed`` and explicit generators);
  ``torch.use_deterministic_algorithms(True)`` is on while training. On one machine with the same
  thread count a run is bitwise reproducible, and a run resumed from its per-epoch state ends with
  exactly the weights of an uninterrupted run.
- **Resume.** After every epoch the full state (model, optimizer, schedule step, RNG states, epoch,
  best-so-far, history, the training identity) is written atomically to ``PATH.resume.pt``
  (``torch.save``; read back with ``torch.load(weights_only=True)``). ``--resume`` continues from it;
  a state from another recipe, seed or training argument is refused. It is deleted once the final
  checkpoint is written (``keep_resume=True`` keeps it).
- **Speed.** Model and inputs use the channels_last memory format: measured here (2 cores, torch 2.13,
  ``benchmarks/bench_train.py``) it is as fast as the default format for standard training and 1.1-1.35x
  faster for PGD-7 training (attack passes skip weight gradients, where channels_last gains most).
- **Metrics** in the card (fractions of the test set, eval mode, no adaptation) are described exactly
  by the card's ``metrics_protocol``; see :func:`evaluate_metrics`.

Every file is written atomically (temporary file + rename), and the card is written after the
weights, so an interrupted run never leaves a checkpoint that loads as complete.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnadapt.errors import BnadaptError, check

RECIPES = ("standard", "gaussian", "pgd-linf", "pgd-l2")
PGD_THREAT = {"pgd-linf": "linf", "pgd-l2": "l2"}
DEFAULT_EPS = {"pgd-linf": 0.1, "pgd-l2": 1.5}
DEFAULT_SIGMA = 0.5
VAL_SEED = 20200          # hold-out choice: fixed, independent of the training seed
EVAL_SEED = 0             # seed of the test-metric noise / PGD random starts
VAL_ATTACK_STEPS = 10
EVAL_ATTACK_STEPS = 20
EVAL_LINF_STEP = 0.01
EVAL_BATCH = 500
WARMUP_FRACTION = 0.4
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CROP_PAD = 2
# Training-time augmentation: random crop (pad CROP_PAD) + horizontal flip, flip only, or none.
AUGMENTATIONS = ("crop-flip", "flip", "none")
RESUME_FORMAT = "bnadapt-train-resume/1"

# The Fashion-MNIST architecture (~175k parameters); in_channels / num_classes follow the data.
FMNIST_ARCH: dict[str, Any] = {
    "in_channels": 1, "num_classes": 10, "widths": [16, 32, 64], "depth": 2, "stem_stride": 2,
    "mean": [0.5], "std": [0.5],
}


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that determines the trained weights (the "training identity") plus run options.

    Fields in :data:`RUN_OPTIONS` (evaluation and bookkeeping) may differ between a run and its resume;
    all others must match.
    """

    recipe: str
    epochs: int = 10
    eps: float | None = None
    step_size: float | None = None
    steps: int = 7
    sigma: float | None = None
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 128
    val_size: int = 5000
    data: str = "fashion-mnist"
    train_limit: int | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True
    eval_limit: int | None = None
    augment: str = "crop-flip"

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in RUN_OPTIONS:
            d.pop(k, None)
        d["weight_decay"] = WEIGHT_DECAY
        d["momentum"] = MOMENTUM
        d["schedule"] = f"one-cycle linear, peak at {WARMUP_FRACTION:g}"
        d["val_seed"] = VAL_SEED
        return d


RUN_OPTIONS = ("eval_limit", "channels_last")


def _num(value: Any, what: str, kind=float):
    try:
        if kind is int:
            check(not isinstance(value, bool) and float(value) == int(value), "")
            return int(value)
        return float(value)
    except (TypeError, ValueError, BnadaptError):
        raise BnadaptError(f"{what} must be {'an integer' if kind is int else 'a number'} (got {value!r})") from None


def make_config(
    recipe: str,
    *,
    epochs: int = 10,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    sigma: float | None = None,
    seed: int = 0,
    lr: float = 0.1,
    batch_size: int = 128,
    val_size: int = 5000,
    data: str = "fashion-mnist",
    train_limit: int | None = None,
    eval_limit: int | None = None,
    arch_args: dict[str, Any] | None = None,
    channels_last: bool = True,
    augment: str = "crop-flip",
) -> TrainConfig:
    """Validate the arguments (one-line :class:`BnadaptError` naming problem and fix) and fill defaults."""
    check(recipe in RECIPES, f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    check(augment in AUGMENTATIONS, f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    epochs = _num(epochs, "epochs", int)
    check(epochs >= 1, f"epochs must be >= 1 (got {epochs})")
    is_pgd = recipe in PGD_THREAT
    if is_pgd:
        eps = DEFAULT_EPS[recipe] if eps is None else _num(eps, "eps")
        check(math.isfinite(eps) and eps > 0, f"eps must be > 0 (got {eps}); it is the attack radius in pixel units")
        steps = 7 if steps is None else _num(steps, "steps", int)
        check(steps >= 1, f"steps must be >= 1 (got {steps}); PGD needs at least one step")
        step_size = 2.5 * eps / steps if step_size is None else _num(step_size, "step size")
        check(math.isfinite(step_size) and step_size > 0, f"step size must be > 0 (got {step_size})")
    else:
        check(eps is None and step_size is None and steps is None,
              f"--eps/--step-size/--steps apply to the pgd-linf and pgd-l2 recipes, not {recipe!r}; drop them")
        steps = 0
    if recipe == "gaussian":
        sigma = DEFAULT_SIGMA if sigma is None else _num(sigma, "sigma")
        check(math.isfinite(sigma) and sigma >= 0, f"sigma must be >= 0 (got {sigma}); it is the noise std in pixel units")
    else:
        check(sigma is None, f"--sigma applies to the gaussian recipe, not {recipe!r}; drop it")
    lr = _num(lr, "lr")
    check(math.isfinite(lr) and lr > 0, f"lr must be > 0 (got {lr})")
    batch_size = _num(batch_size, "batch size", int)
    check(batch_size >= 2, f"batch size must be >= 2 (got {batch_size}); train-mode BN needs two images per batch")
    val_size = _num(val_size, "val size", int)
    check(val_size >= 0, f"val size must be >= 0 (got {val_size}); 0 disables early stopping")
    if train_limit is not None:
        train_limit = _num(train_limit, "train limit", int)
        check(train_limit >= batch_size, f"train limit must be >= the batch size {batch_size} (got {train_limit})")
    if eval_limit is not None:
        eval_limit = _num(eval_limit, "eval limit", int)
        check(eval_limit >= 1, f"eval limit must be >= 1 (got {eval_limit})")
    check(isinstance(data, str) and data.strip() != "", "empty --data; use fashion-mnist or another dataset spec")
    seed = _num(seed, "seed", int)
    check(arch_args is None or isinstance(arch_args, dict), "arch_args must be a dict of PreActResNet arguments")
    return TrainConfig(
        recipe=recipe, epochs=epochs, eps=eps, step_size=step_size, steps=steps, sigma=sigma, seed=seed, lr=lr,
        batch_size=batch_size, val_size=val_size, data=data, train_limit=train_limit,
        arch_args=dict(arch_args or {}), channels_last=bool(channels_last), eval_limit=eval_limit,
        augment=augment,
    )


# ----------------------------------------------------------------------------- pieces
def lr_at(step: int, total_steps: int, lr_max: float) -> float:
    """One-cycle piecewise-linear learning rate at optimizer step ``step`` (0-based) of ``total_steps``."""
    t = (step + 0.5) / max(total_steps, 1)
    return float(np.interp(t, [0.0, WARMUP_FRACTION, 1.0], [0.0, lr_max, 0.0]))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = CROP_PAD, mode: str = "crop-flip") -> torch.Tensor:
    """Random crop (``pad`` pixels of zero padding) and random horizontal flip, per image, seeded
    (``mode="crop-flip"``); ``"flip"``: the flip only; ``"none"``: ``x`` unchanged."""
    if mode == "none":
        return x
    if mode == "flip":
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def split_indices(n: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a training set of ``n`` images; the hold-out uses :data:`VAL_SEED`."""
    check(val_size < n, f"val size {val_size} leaves no training images out of {n}; lower --val-size")
    perm = np.random.default_rng(VAL_SEED).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def build_arch_args(dataset, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    args = dict(FMNIST_ARCH)
    args["in_channels"] = int(dataset.image_shape[0])
    args["num_classes"] = len(dataset.class_names)
    args.update(overrides or {})
    for k in ("widths", "mean", "std"):
        if k in args:
            args[k] = [float(v) if k != "widths" else int(v) for v in args[k]]
    return args


def _fmt(x: float) -> str:
    return f"{x:g}"


def _prep(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    from bnadapt.attacks import preserved_state

    with preserved_state(model):
        model.eval()
        yield model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def clean_accuracy(model: nn.Module, dataset, indices, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in eval mode (model left unchanged)."""
    device = _model_device(model)
    idx = np.asarray(indices, dtype=np.int64)
    correct = 0
    with _eval_mode(model):
        for x, y in dataset.batches(batch_size, idx):
            correct += int((model(_prep(x, device, True)).argmax(1).cpu() == y).sum())
    return correct / max(len(idx), 1)


@torch.no_grad()
def noise_accuracy(model: nn.Module, dataset, indices, sigma: float, seed: int, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in eval mode under ``N(0, sigma^2)`` pixel noise (no clipping), one CPU generator seeded with ``seed``."""
    device = _model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    idx = np.asarray(indices, dtype=np.int64)
    correct = 0
    with _eval_mode(model):
        for x, y in dataset.batches(batch_size, idx):
            x = x + sigma * torch.randn(x.shape, generator=gen)
            correct += int((model(_prep(x, device, True)).argmax(1).cpu() == y).sum())
    return correct / max(len(idx), 1)


def pgd_accuracy(model: nn.Module, dataset, indices, attack, seed: int, batch_size: int = EVAL_BATCH,
                 progress: bool = False) -> float:
    """Top-1 accuracy in eval mode under ``attack`` (see :func:`bnadapt.attacks.accuracy_under_attack`)."""
    from bnadapt.attacks import accuracy_under_attack

    with _eval_mode(model):
        return accuracy_under_attack(model, dataset, attack, batch_size, indices, progress=progress, seed=seed)


def _eval_attack(recipe: str, eps: float):
    from bnadapt.attacks import make_pgd

    step = EVAL_LINF_STEP if recipe == "pgd-linf" else 2.5 * eps / EVAL_ATTACK_STEPS
    return make_pgd(PGD_THREAT[recipe], eps, steps=EVAL_ATTACK_STEPS, step_size=step, random_start=True)


def noise_key(sigma: float) -> str:
    return f"noise_acc_{sigma:g}"


def metrics_protocol(recipe: str, *, eps: float | None = None, sigma: float | None = None, n_images: int,
                     test_set: str = "fashion-mnist/test", limit: int | None = None, seed: int = EVAL_SEED,
                     batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """How :func:`evaluate_metrics` measures each metric, in words and numbers (stored in cards)."""
    proto: dict[str, Any] = {
        "test_set": test_set,
        "images": n_images,
        "subset": f"first {n_images} images in file order" if limit is not None else "all images",
        "eval_limit": limit,
        "mode": "eval mode (BN running statistics), no adaptation; fractions of images classified correctly",
        "batch_size": batch_size,
        "clean_acc": "top-1 accuracy on the clean images",
    }
    if recipe == "gaussian":
        proto[noise_key(sigma)] = (f"top-1 accuracy on x + N(0, {sigma:g}^2) noise in pixel space, no clipping, one "
                                   f"draw per image from a CPU torch.Generator seeded {seed}, batches in file order")
    if recipe in PGD_THREAT:
        attack = _eval_attack(recipe, eps)
        proto["pgd_acc"] = (f"top-1 accuracy under untargeted {attack.threat.value} PGD on cross-entropy: eps {eps:g}, "
                            f"{attack.steps} steps of {attack.step_size:g}, uniform random start, outputs clipped to "
                            f"[0, 1]; random starts from a torch.Generator seeded {seed}, batches in file order")
        proto["attack"] = attack.describe()
    return proto


def evaluate_metrics(
    model: nn.Module,
    recipe: str,
    test_dataset,
    *,
    eps: float | None = None,
    sigma: float | None = None,
    limit: int | None = None,
    seed: int = EVAL_SEED,
    batch_size: int = EVAL_BATCH,
    progress: bool = False,
) -> dict[str, float]:
    """The card's metrics for ``model`` on ``test_dataset`` (first ``limit`` images if given).

    Always ``clean_acc``; ``gaussian``: ``noise_acc_<sigma>``; ``pgd-linf``: ``pgd_acc`` under Linf PGD
    (eps, 20 steps of 0.01, random start); ``pgd-l2``: ``pgd_acc`` under L2 PGD (eps, 20 steps of
    ``2.5 * eps / 20``, random start). All in eval mode, deterministic for ``seed``; the model is left
    unchanged. :func:`metrics_protocol` describes the same measurement in words.
    """
    check(recipe in RECIPES, f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    n = len(test_dataset) if limit is None else min(int(limit), len(test_dataset))
    check(n >= 1, "no test images to evaluate; check the test set and --eval-limit")
    idx = np.arange(n)
    metrics = {"clean_acc": clean_accuracy(model, test_dataset, idx, batch_size)}
    if recipe == "gaussian":
        check(sigma is not None and sigma >= 0, "evaluate_metrics for 'gaussian' needs sigma >= 0")
        metrics[noise_key(sigma)] = noise_accuracy(model, test_dataset, idx, sigma, seed, batch_size)
    if recipe in PGD_THREAT:
        check(eps is not None and eps > 0, f"evaluate_metrics for {recipe!r} needs eps > 0")
        metrics["pgd_acc"] = pgd_accuracy(model, test_dataset, idx, _eval_attack(recipe, eps), seed, batch_size,
                                          progress=progress)
    return metrics


def evaluate_card(loaded, test_dataset=None, *, limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Re-measure a trained model's card metrics (``loaded`` from :func:`bnadapt.models.load_model`).

    Uses the card's recipe (name, eps, sigma) and, unless given, the test split of its data spec.
    """
    recipe = loaded.card.get("recipe") or {}
    check(recipe.get("name") in RECIPES, f"model {loaded.source} has no training recipe in its card; "
                                         f"use evaluate_metrics with an explicit recipe")
    if test_dataset is None:
        from bnadapt.data import load_dataset

        test_dataset = load_dataset(recipe.get("data", "fashion-mnist"), split="test")
    return evaluate_metrics(loaded.model, recipe["name"], test_dataset, eps=recipe.get("eps"),
                            sigma=recipe.get("sigma"), limit=limit, progress=progress)


def _val_metric(model, cfg: TrainConfig, dataset, val_idx) -> float:
    if cfg.recipe in PGD_THREAT:
        from bnadapt.attacks import make_pgd

        attack = make_pgd(PGD_THREAT[cfg.recipe], cfg.eps, steps=VAL_ATTACK_STEPS, random_start=True)
        return pgd_accuracy(model, dataset, val_idx, attack, VAL_SEED)
    if cfg.recipe == "gaussian":
        return noise_accuracy(model, dataset, val_idx, cfg.sigma, VAL_SEED)
    return clean_accuracy(model, dataset, val_idx)


def val_metric_description(cfg: TrainConfig) -> str:
    if cfg.val_size == 0:
        return "none (val_size 0): the last epoch is kept"
    if cfg.recipe in PGD_THREAT:
        return (f"{PGD_THREAT[cfg.recipe]} PGD accuracy, eps {cfg.eps:g}, {VAL_ATTACK_STEPS} steps of "
                f"{2.5 * cfg.eps / VAL_ATTACK_STEPS:g}, random start (seed {VAL_SEED}), eval mode")
    if cfg.recipe == "gaussian":
        return f"accuracy under N(0, {cfg.sigma:g}^2) pixel noise (seed {VAL_SEED}), eval mode"
    return "clean accuracy, eval mode"


# ----------------------------------------------------------------------------- resume state
def weights_path(out: str | os.PathLike) -> Path:
    """The checkpoint file for ``--out``: ``PATH.safetensors`` (``.safetensors`` appended unless present;
    dots inside names such as ``gaussian-0.5`` are kept)."""
    p = Path(out)
    if p.suffix == ".safetensors":
        return p
    if p.suffix == ".json":
        return p.with_suffix(".safetensors")
    return p.with_name(p.name + ".safetensors")


def resume_path(out: str | os.PathLike) -> Path:
    """``PATH.resume.pt`` beside the checkpoint ``PATH.safetensors``."""
    w = weights_path(out)
    return w.with_name(w.name[: -len(".safetensors")] + ".resume.pt")


def _save_resume(path: Path, state: dict[str, Any]) -> None:
    from bnadapt.results import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_resume(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise BnadaptError(f"cannot read resume state {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                           f"delete it to start over") from None
    check(isinstance(state, dict) and state.get("format") == RESUME_FORMAT,
          f"{path} is not a bnadapt training resume state; delete it to start over")
    want, have = cfg.identity(), state.get("identity", {})
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        k = diff[0]
        raise BnadaptError(
            f"resume state {path} is from a different run ({k}: saved {have.get(k)!r}, now {want.get(k)!r}"
            f"{f'; {len(diff) - 1} more' if len(diff) > 1 else ''}); rerun with the same recipe, seed and "
            f"training arguments, or delete it to start over")
    return state


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- training
@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def training_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float | None = None,
    attack=None,
    generator: torch.Generator,
    device_generator: torch.Generator | None = None,
    channels_last: bool = True,
    augmentation: str = "crop-flip",
) -> tuple[float, int]:
    """One optimizer step of a recipe on a CPU batch ``(x, y)``: augment, add noise (``sigma``) or
    replace by PGD examples (``attack``, generated in eval mode), then a train-mode update.
    Returns (mean loss, number of correct predictions on the training inputs)."""
    device = _model_device(model)
    x = augment(x, generator, mode=augmentation)
    if sigma:
        x = x + sigma * torch.randn(x.shape, generator=generator)
    x, y = _prep(x, device, channels_last), y.to(device)
    if attack is not None:
        model.eval()
        x = attack(model, x, y, generator=device_generator or generator)
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())


@dataclass
class TrainResult:
    """What :func:`train` did: the checkpoint (``None`` when stopped early by ``stop_after``)."""

    path: Path | None
    card: dict[str, Any] | None
    history: list[dict[str, Any]]
    best_epoch: int | None
    completed: bool


def train(
    recipe: str,
    out: str | os.PathLike,
    *,
    epochs: int = 10,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    sigma: float | None = None,
    seed: int = 0,
    lr: float = 0.1,
    batch_size: int = 128,
    val_size: int = 5000,
    data: str = "fashion-mnist",
    train_limit: int | None = None,
    eval_limit: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    keep_resume: bool = False,
    arch_args: dict[str, Any] | None = None,
    train_dataset=None,
    test_dataset=None,
    device: str = "cpu",
    channels_last: bool = True,
    augment: str = "crop-flip",
    progress: bool = True,
    log=None,
) -> TrainResult:
    """Train ``recipe`` and write ``out`` (``.safetensors`` + ``.json`` card); see the module docstring.

    ``train_dataset`` / ``test_dataset`` replace loading ``data`` (tests pass small in-memory sets);
    ``arch_args`` override the PreActResNet arguments. ``stop_after=k`` stops after epoch ``k`` with the
    resume state written and no checkpoint (continue later with ``resume=True``). ``resume=True``
    without a resume state starts from scratch; a resume state without ``resume=True`` is an error
    (it would be overwritten). Returns a :class:`TrainResult`.
    """
    from bnadapt.attacks import make_pgd
    from bnadapt.models import build_model, save_checkpoint
    from bnadapt.results import provenance

    cfg = make_config(recipe, epochs=epochs, eps=eps, step_size=step_size, steps=steps, sigma=sigma, seed=seed, lr=lr,
                      batch_size=batch_size, val_size=val_size, data=data, train_limit=train_limit,
                      eval_limit=eval_limit, arch_args=arch_args, channels_last=channels_last, augment=augment)
    if stop_after is not None:
        stop_after = _num(stop_after, "stop after", int)
        check(stop_after >= 1, f"stop after must be >= 1 (got {stop_after})")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wpath = weights_path(out)
    check(not wpath.is_dir() and not Path(out).is_dir(), f"--out {out} is a folder; give a checkpoint path")
    rpath = resume_path(out)
    check(resume or not rpath.exists(),
          f"found resume state {rpath} from an earlier run; pass --resume to continue it or delete it to start over")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BnadaptError(f"unknown device {device!r}; use cpu or cuda") from None
    check(dev.type != "cuda" or torch.cuda.is_available(), "device cuda requested but CUDA is not available; use --device cpu")

    if train_dataset is None:
        from bnadapt.data import load_dataset

        train_dataset = load_dataset(cfg.data, split="train")
    train_idx, val_idx = split_indices(len(train_dataset), cfg.val_size)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    check(len(train_idx) >= cfg.batch_size,
          f"{len(train_idx)} training images is less than one batch of {cfg.batch_size}; lower --batch-size or --val-size")
    arch = build_arch_args(train_dataset, cfg.arch_args)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs

    with _deterministic():
        torch.manual_seed(cfg.seed)
        model = build_model("preact_resnet", arch).to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
        gen = torch.Generator().manual_seed(cfg.seed)  # CPU: augmentation, noise
        dev_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(cfg.seed)  # PGD starts
        attack = (make_pgd(PGD_THREAT[cfg.recipe], cfg.eps, steps=cfg.steps, step_size=cfg.step_size, random_start=True)
                  if cfg.recipe in PGD_THREAT else None)
        start_epoch, step, history, wall = 0, 0, [], 0.0
        best: dict[str, Any] | None = None
        if resume and rpath.exists():
            st = _load_resume(rpath, cfg)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            start_epoch, step, history, wall = int(st["epoch"]), int(st["step"]), list(st["history"]), float(st["wall_time"])
            best = st["best"]
            torch.set_rng_state(st["rng"]["torch"])
            gen.set_state(st["rng"]["generator"])
            if dev_gen is not gen:
                dev_gen.set_state(st["rng"]["device_generator"])
            log(f"resuming {cfg.recipe} from {rpath} after epoch {start_epoch}/{cfg.epochs}")
        elif resume:
            log(f"no resume state at {rpath}; starting from scratch")

        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(train_idx)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch * cfg.batch_size, desc=f"{cfg.recipe} epoch {epoch}/{cfg.epochs}",
                           unit="img", dynamic_ncols=True, mininterval=1.0, file=sys.stderr, leave=False)
            loss_sum, correct, seen = 0.0, 0, 0
            try:
                for b in range(steps_per_epoch):
                    x, y = train_dataset.get(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, total_steps, cfg.lr)
                    loss, hits = training_step(model, opt, x, y, sigma=cfg.sigma if cfg.recipe == "gaussian" else None,
                                               attack=attack, generator=gen, device_generator=dev_gen,
                                               channels_last=cfg.channels_last, augmentation=cfg.augment)
                    step += 1
                    loss_sum += loss * len(y)
                    correct += hits
                    seen += len(y)
                    if bar is not None:
                        bar.update(len(y))
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                        lr=f"{opt.param_groups[0]['lr']:.3g}", refresh=False)
            finally:
                if bar is not None:
                    bar.close()
            train_s = time.perf_counter() - t0
            val = _val_metric(model, cfg, train_dataset, val_idx) if len(val_idx) else float("nan")
            improved = best is None or (len(val_idx) == 0) or val > best["metric"]
            if improved:
                best = {"epoch": epoch, "metric": val, "state": _clone_state(model)}
            epoch_s = time.perf_counter() - t0
            wall += epoch_s
            history.append({"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                            "val_metric": val, "seconds": round(epoch_s, 2),
                            "train_img_per_s": round(seen / train_s, 1)})
            log(f"{cfg.recipe} epoch {epoch}/{cfg.epochs}: loss {loss_sum / seen:.4f}, train acc {correct / seen:.4f}, "
                f"val {val:.4f}{' (best)' if improved else ''}, {seen / train_s:.0f} img/s, {epoch_s:.1f} s")
            _save_resume(rpath, {
                "format": RESUME_FORMAT, "identity": cfg.identity(), "epoch": epoch, "step": step,
                "model": _clone_state(model), "optimizer": opt.state_dict(), "best": best, "history": history,
                "wall_time": wall,
                "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state(),
                        **({"device_generator": dev_gen.get_state()} if dev_gen is not gen else {})},
            })
            if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs:
                log(f"stopped after epoch {epoch} as asked; continue with --resume (state: {rpath})")
                return TrainResult(None, None, history, best["epoch"] if best else None, False)

        # ---- final model: the best epoch, measured on the test set
        model.load_state_dict(best["state"])
        model.eval()
        if test_dataset is None:
            from bnadapt.data import load_dataset

            test_dataset = load_dataset(cfg.data, split="test")
        t_eval = time.perf_counter()
        metrics = evaluate_metrics(model, cfg.recipe, test_dataset, eps=cfg.eps, sigma=cfg.sigma,
                                   limit=cfg.eval_limit, progress=progress)
        eval_s = time.perf_counter() - t_eval
        n_eval = len(test_dataset) if cfg.eval_limit is None else min(cfg.eval_limit, len(test_dataset))

    card = {
        "name": wpath.name[: -len(".safetensors")],
        "arch": "preact_resnet",
        "arch_args": arch,
        "input_shape": [int(s) for s in train_dataset.image_shape],
        "normalization": {"mean": arch["mean"], "std": arch["std"], "inside_model": True, "pixels": "[0, 1]"},
        "class_names": list(train_dataset.class_names),
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {
            "name": cfg.recipe,
            "eps": cfg.eps,
            "threat_model": PGD_THREAT.get(cfg.recipe),
            "step_size": cfg.step_size,
            "steps": cfg.steps if cfg.recipe in PGD_THREAT else None,
            "sigma": cfg.sigma,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "lr_schedule": f"one-cycle per step: linear 0 -> lr over the first {WARMUP_FRACTION:.0%} of steps, then -> 0",
            "optimizer": f"SGD momentum {MOMENTUM}, nesterov, weight decay {WEIGHT_DECAY}",
            "augmentation": {"crop-flip": f"random crop (pad {CROP_PAD}, zeros) + horizontal flip",
                             "flip": "horizontal flip", "none": "none"}[cfg.augment]
                            + (f" + N(0, {cfg.sigma:g}^2) noise, no clipping" if cfg.recipe == "gaussian" else ""),
            "adversarial_examples": ("PGD with random start, generated in eval mode, trained on in train mode"
                                     if cfg.recipe in PGD_THREAT else None),
            "seed": cfg.seed,
            "data": cfg.data,
            "train_images": int(len(train_idx)),
            "train_limit": cfg.train_limit,
            "val_size": cfg.val_size,
            "val_seed": VAL_SEED,
            "val_metric": val_metric_description(cfg),
            "best_epoch": best["epoch"],
            "best_val_metric": best["metric"],
        },
        "training": {
            "wall_time_s": round(wall, 1),
            "final_eval_s": round(eval_s, 1),
            "machine": machine_info(dev),
            "torch": torch.__version__,
            "channels_last": cfg.channels_last,
            "history": history,
        },
        "metrics": metrics,
        "metrics_protocol": metrics_protocol(cfg.recipe, eps=cfg.eps, sigma=cfg.sigma, n_images=n_eval,
                                             test_set=getattr(test_dataset, "name", "test"), limit=cfg.eval_limit),
        "eval_limit": cfg.eval_limit,
        "provenance": provenance(),
    }
    path = save_checkpoint(wpath, model, card)
    if not keep_resume:
        rpath.unlink(missing_ok=True)
    log(f"wrote {path} and {path.with_suffix('.json')}: best epoch {best['epoch']}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; training {wall:.0f} s")
    import json

    card = json.loads(path.with_suffix(".json").read_text())
    return TrainResult(path, card, history, best["epoch"], True)


# ----------------------------------------------------------------------------- CLI
def cmd_train(args) -> int:
    out = Path(args.out)
    check(not out.is_dir(), f"--out {args.out} is a folder; give a checkpoint path such as models/NAME.safetensors")
    res = train(
        args.recipe, out, epochs=args.epochs, eps=args.eps, step_size=args.step_size, steps=args.steps,
        sigma=args.sigma, seed=args.seed, lr=args.lr, batch_size=args.batch_size, val_size=args.val_size,
        data=args.data, train_limit=args.train_limit, eval_limit=args.eval_limit, resume=args.resume,
        stop_after=args.stop_after, keep_resume=args.keep_resume, device=args.device,
        augment=args.augment, progress=not args.no_progress,
    )
    if res.completed:
        print(f"{res.path}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.card["metrics"].items()))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model: standard, gaussian, pgd-linf or pgd-l2 (Fashion-MNIST ResNet)",
                       description="Train the Fashion-MNIST pre-activation ResNet with one recipe, keep the best "
                                   "epoch on a validation hold-out, and write a checkpoint with a model card.")
    p.add_argument("recipe", metavar="RECIPE", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--out", required=True, help="output checkpoint PATH(.safetensors); the card is PATH.json")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--eps", type=float, default=None,
                   help="pgd recipes: attack radius in pixels (default 0.1 for pgd-linf, 1.5 for pgd-l2)")
    p.add_argument("--step-size", type=float, default=None, help="pgd recipes: PGD step size (default 2.5*eps/steps)")
    p.add_argument("--steps", type=int, default=None, help="pgd recipes: PGD steps (default 7)")
    p.add_argument("--sigma", type=float, default=None, help="gaussian: noise std in pixels (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, order, augmentation, noise (default 0)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--val-size", type=int, default=5000, help="validation hold-out for early stopping (default 5000)")
    p.add_argument("--data", default="fashion-mnist", help="dataset spec with train and test splits (default fashion-mnist)")
    p.add_argument("--resume", action="store_true", help="continue from PATH.resume.pt if it exists")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch, keeping the resume state (continue later with --resume)")
    p.add_argument("--keep-resume", action="store_true", help="keep PATH.resume.pt after the final checkpoint")
    p.add_argument("--eval-limit", type=int, default=None, help="measure test metrics on the first N images only")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only (quick runs)")
    p.add_argument("--augment", default="crop-flip", choices=AUGMENTATIONS,
                   help="training augmentation: crop-flip (default), flip, none")
    p.add_argument("--device", default="cpu", help="cpu (default; deterministic) or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries are still printed)")
    p.set_defaults(func=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    """``bnadapt train ...`` as a function: returns the exit code (2 for bad input, one ``error:`` line)."""
    from bnadapt.cli import _Parser

    parser = _Parser(prog="bnadapt")
    register(parser.add_subparsers(dest="command", parser_class=_Parser))
    try:
        args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except BnadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
