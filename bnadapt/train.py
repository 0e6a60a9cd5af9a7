"""Training recipes: ``standard``, ``gaussian`` (Cohen et al. 2019), ``pgd-linf`` / ``pgd-l2`` (Madry et al. 2018).

``bnadapt train RECIPE --out PATH`` trains the Fashion-MNIST pre-activation ResNet (depth 2, widths
16/32/64, stride-2 stem, about 175k parameters) and writes our checkpoint (``PATH.safetensors`` + the
model card ``PATH.json``). The Python API is :func:`train` (its options are the fields of
:class:`TrainConfig`, spelled once); :func:`bnadapt.card.evaluate_metrics` re-measures the card's test
metrics for any model.

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
- **Metrics** in the card (test-set fractions, eval mode) are described by its ``metrics_protocol``.
- **Outputs.** ``out`` is checked before the first epoch; a finished checkpoint is never overwritten
  unless ``overwrite=True`` (``--overwrite``).

Every file is written atomically (temporary file + rename), and the card is written after the
weights, so an interrupted run never leaves a checkpoint that loads as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnadapt.card import (
    PGD_THREAT, RECIPES, clean_accuracy, evaluate_metrics, machine_info, metrics_protocol, noise_accuracy, pgd_accuracy,
    training_card,
)
from bnadapt.errors import check, check_choice, check_float, check_int, check_seed
from bnadapt.runs import Progress, resolve_device
from bnadapt.train_files import RESUME_FORMAT, check_outputs, load_resume, save_resume

DEFAULT_EPS = {"pgd-linf": 0.1, "pgd-l2": 1.5}
DEFAULT_SIGMA = 0.5
VAL_SEED = 20200          # hold-out choice: fixed, independent of the training seed
VAL_ATTACK_STEPS = 10
WARMUP_FRACTION = 0.4
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CROP_PAD = 2
# Training-time augmentation: random crop (pad CROP_PAD) + horizontal flip, flip only, or none.
AUGMENTATIONS = ("crop-flip", "flip", "none")

# The Fashion-MNIST architecture (~175k parameters); in_channels / num_classes follow the data.
FMNIST_ARCH: dict[str, Any] = {
    "in_channels": 1, "num_classes": 10, "widths": [16, 32, 64], "depth": 2, "stem_stride": 2,
    "mean": [0.5], "std": [0.5],
}


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that determines the trained weights (the "training identity") plus run options.

    These fields are the options of :func:`train` and ``bnadapt train`` (spelled here once). Fields in
    :data:`RUN_OPTIONS` (evaluation and bookkeeping) may differ between a run and its resume; all
    others must match. ``None`` means the recipe's default (filled in by :func:`make_config`).
    """

    recipe: str
    epochs: int = 10
    eps: float | None = None
    step_size: float | None = None
    steps: int | None = None
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
CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))


def make_config(recipe: str, **options: Any) -> TrainConfig:
    """Validate ``options`` (the fields of :class:`TrainConfig`; one-line :class:`BnadaptError` naming
    problem and fix) and fill the recipe's defaults (eps, steps, step size, sigma)."""
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    check(not unknown, f"unknown training option(s) {', '.join(unknown)}; use {', '.join(CONFIG_FIELDS[1:])}")
    cfg = TrainConfig(recipe=check_choice(recipe, RECIPES, "recipe"),
                      **{k: v for k, v in options.items() if v is not None or k in ("train_limit", "eval_limit")})
    check_choice(cfg.augment, AUGMENTATIONS, "augmentation")
    cfg.epochs = check_int(cfg.epochs, "--epochs", min=1)
    if recipe in PGD_THREAT:
        cfg.eps = check_float(DEFAULT_EPS[recipe] if cfg.eps is None else cfg.eps, "--eps", min=0.0, min_open=True,
                              hint="it is the attack radius in pixel units")
        cfg.steps = check_int(7 if cfg.steps is None else cfg.steps, "--steps", min=1, hint="PGD needs at least one step")
        cfg.step_size = check_float(2.5 * cfg.eps / cfg.steps if cfg.step_size is None else cfg.step_size,
                                    "--step-size", min=0.0, min_open=True)
    else:
        check(cfg.eps is None and cfg.step_size is None and cfg.steps is None,
              f"--eps/--step-size/--steps apply to the pgd-linf and pgd-l2 recipes, not {recipe!r}; drop them")
        cfg.steps = 0
    if recipe == "gaussian":
        cfg.sigma = check_float(DEFAULT_SIGMA if cfg.sigma is None else cfg.sigma, "--sigma", min=0.0,
                                hint="it is the noise std in pixel units")
    else:
        check(cfg.sigma is None, f"--sigma applies to the gaussian recipe, not {recipe!r}; drop it")
    cfg.lr = check_float(cfg.lr, "--lr", min=0.0, min_open=True)
    cfg.batch_size = check_int(cfg.batch_size, "--batch-size", min=2, hint="train-mode BN needs two images per batch")
    cfg.val_size = check_int(cfg.val_size, "--val-size", min=0, hint="0 disables early stopping")
    if cfg.train_limit is not None:
        cfg.train_limit = check_int(cfg.train_limit, "--train-limit", min=cfg.batch_size,
                                    hint=f"at least one batch of {cfg.batch_size}")
    if cfg.eval_limit is not None:
        cfg.eval_limit = check_int(cfg.eval_limit, "--eval-limit", min=1)
    check(isinstance(cfg.data, str) and cfg.data.strip() != "", "empty --data; use fashion-mnist or another dataset spec")
    cfg.seed = check_seed(cfg.seed, "--seed")
    check(isinstance(cfg.arch_args, dict), "arch_args must be a dict of PreActResNet arguments")
    cfg.arch_args = dict(cfg.arch_args)
    cfg.channels_last = bool(cfg.channels_last)
    return cfg


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


def _prep(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


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


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ----------------------------------------------------------------------------- training
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
    device = next(model.parameters()).device
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


@dataclass
class _Run:
    """The state of one training run (what the resume file holds)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    dev_gen: torch.Generator
    epoch: int = 0
    step: int = 0
    wall: float = 0.0
    history: list = field(default_factory=list)
    best: dict | None = None

    def state(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"format": RESUME_FORMAT, "identity": cfg.identity(), "epoch": self.epoch, "step": self.step,
                "model": _clone_state(self.model), "optimizer": self.opt.state_dict(), "best": self.best,
                "history": self.history, "wall_time": self.wall,
                "rng": {"torch": torch.get_rng_state(), "generator": self.gen.get_state(),
                        **({"device_generator": self.dev_gen.get_state()} if self.dev_gen is not self.gen else {})}}

    def restore(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.epoch, self.step, self.history = int(st["epoch"]), int(st["step"]), list(st["history"])
        self.wall, self.best = float(st["wall_time"]), st["best"]
        torch.set_rng_state(st["rng"]["torch"])
        self.gen.set_state(st["rng"]["generator"])
        if self.dev_gen is not self.gen:
            self.dev_gen.set_state(st["rng"]["device_generator"])


def _new_run(cfg: TrainConfig, arch: dict, dev: torch.device) -> _Run:
    from bnadapt.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model("preact_resnet", arch).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU: augmentation, noise
    dev_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(cfg.seed)  # PGD starts
    return _Run(model, opt, gen, dev_gen)


def _train_epoch(run: _Run, cfg: TrainConfig, dataset, train_idx, attack, total_steps: int, progress: bool) -> dict:
    """One epoch over ``train_idx`` in the order drawn from ``(seed, epoch)``; returns its history entry
    (without the validation metric)."""
    steps_per_epoch = len(train_idx) // cfg.batch_size
    order = np.random.default_rng([cfg.seed, run.epoch + 1]).permutation(train_idx)
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    with Progress(steps_per_epoch * cfg.batch_size, f"{cfg.recipe} epoch {run.epoch + 1}/{cfg.epochs}",
                  quiet=not progress, interval=30.0) as bar:
        for b in range(steps_per_epoch):
            x, y = dataset.get(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            for g in run.opt.param_groups:
                g["lr"] = lr_at(run.step, total_steps, cfg.lr)
            loss, hits = training_step(run.model, run.opt, x, y, sigma=cfg.sigma if cfg.recipe == "gaussian" else None,
                                       attack=attack, generator=run.gen, device_generator=run.dev_gen,
                                       channels_last=cfg.channels_last, augmentation=cfg.augment)
            run.step += 1
            loss_sum += loss * len(y)
            correct += hits
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    train_s = time.perf_counter() - t0
    return {"epoch": run.epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "train_img_per_s": round(seen / train_s, 1)}


def train(
    recipe: str,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    keep_resume: bool = False,
    overwrite: bool = False,
    train_dataset=None,
    test_dataset=None,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    log=None,
    **options: Any,
) -> TrainResult:
    """Train ``recipe`` with ``options`` (the fields of :class:`TrainConfig`) and write ``out``
    (``.safetensors`` + ``.json`` card); see the module docstring.

    ``train_dataset`` / ``test_dataset`` replace loading ``data`` (tests pass small in-memory sets).
    ``stop_after=k`` stops after epoch ``k`` with the resume state written and no checkpoint (continue
    later with ``resume=True``). ``resume=True`` without a resume state starts from scratch; a resume
    state without ``resume=True`` is an error (it would be overwritten), and so is a finished
    checkpoint at ``out`` unless ``overwrite=True``. Returns a :class:`TrainResult`."""
    cfg = make_config(recipe, **options)
    if stop_after is not None:
        stop_after = check_int(stop_after, "--stop-after", min=1)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wpath, rpath = check_outputs(out, resume, overwrite)
    dev = resolve_device(device)

    if train_dataset is None:
        from bnadapt.data import load_dataset

        train_dataset = load_dataset(cfg.data, split="train")
    train_idx, val_idx = split_indices(len(train_dataset), cfg.val_size)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    check(len(train_idx) >= cfg.batch_size,
          f"{len(train_idx)} training images is less than one batch of {cfg.batch_size}; lower --batch-size or --val-size")
    arch = build_arch_args(train_dataset, cfg.arch_args)
    total_steps = (len(train_idx) // cfg.batch_size) * cfg.epochs

    with _deterministic():
        run = _new_run(cfg, arch, dev)
        attack = None
        if cfg.recipe in PGD_THREAT:
            from bnadapt.attacks import make_pgd

            attack = make_pgd(PGD_THREAT[cfg.recipe], cfg.eps, steps=cfg.steps, step_size=cfg.step_size, random_start=True)
        if resume and rpath.exists():
            run.restore(load_resume(rpath, cfg))
            log(f"resuming {cfg.recipe} from {rpath} after epoch {run.epoch}/{cfg.epochs}")
        elif resume:
            log(f"no resume state at {rpath}; starting from scratch")

        while run.epoch < cfg.epochs:
            t0 = time.perf_counter()
            entry = _train_epoch(run, cfg, train_dataset, train_idx, attack, total_steps, progress)
            run.epoch += 1
            val = _val_metric(run.model, cfg, train_dataset, val_idx) if len(val_idx) else float("nan")
            improved = run.best is None or len(val_idx) == 0 or val > run.best["metric"]
            if improved:
                run.best = {"epoch": run.epoch, "metric": val, "state": _clone_state(run.model)}
            epoch_s = time.perf_counter() - t0
            run.wall += epoch_s
            run.history.append(dict(entry, val_metric=val, seconds=round(epoch_s, 2)))
            log(f"{cfg.recipe} epoch {run.epoch}/{cfg.epochs}: loss {entry['train_loss']:.4f}, train acc "
                f"{entry['train_acc']:.4f}, val {val:.4f}{' (best)' if improved else ''}, "
                f"{entry['train_img_per_s']:.0f} img/s, {epoch_s:.1f} s")
            save_resume(rpath, run.state(cfg))
            if stop_after is not None and run.epoch >= stop_after and run.epoch < cfg.epochs:
                log(f"stopped after epoch {run.epoch} as asked; continue with --resume (state: {rpath})")
                return TrainResult(None, None, run.history, run.best["epoch"] if run.best else None, False)

        # ---- final model: the best epoch, measured on the test set
        run.model.load_state_dict(run.best["state"])
        run.model.eval()
        if test_dataset is None:
            from bnadapt.data import load_dataset

            test_dataset = load_dataset(cfg.data, split="test")
        t_eval = time.perf_counter()
        metrics = evaluate_metrics(run.model, cfg.recipe, test_dataset, eps=cfg.eps, sigma=cfg.sigma,
                                   limit=cfg.eval_limit, progress=progress)
        eval_s = time.perf_counter() - t_eval
        n_eval = len(test_dataset) if cfg.eval_limit is None else min(cfg.eval_limit, len(test_dataset))

    from bnadapt.models import save_checkpoint

    recipe = {
        "name": cfg.recipe, "eps": cfg.eps, "threat_model": PGD_THREAT.get(cfg.recipe), "step_size": cfg.step_size,
        "steps": cfg.steps if cfg.recipe in PGD_THREAT else None, "sigma": cfg.sigma, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "lr": cfg.lr,
        "lr_schedule": f"one-cycle per step: linear 0 -> lr over the first {WARMUP_FRACTION:.0%} of steps, then -> 0",
        "optimizer": f"SGD momentum {MOMENTUM}, nesterov, weight decay {WEIGHT_DECAY}",
        "augmentation": {"crop-flip": f"random crop (pad {CROP_PAD}, zeros) + horizontal flip",
                         "flip": "horizontal flip", "none": "none"}[cfg.augment]
                        + (f" + N(0, {cfg.sigma:g}^2) noise, no clipping" if cfg.recipe == "gaussian" else ""),
        "adversarial_examples": ("PGD with random start, generated in eval mode, trained on in train mode"
                                 if cfg.recipe in PGD_THREAT else None),
        "seed": cfg.seed, "data": cfg.data, "train_images": int(len(train_idx)), "train_limit": cfg.train_limit,
        "val_size": cfg.val_size, "val_seed": VAL_SEED, "val_metric": val_metric_description(cfg),
        "best_epoch": run.best["epoch"], "best_val_metric": run.best["metric"],
    }
    training = {"wall_time_s": round(run.wall, 1), "final_eval_s": round(eval_s, 1), "machine": machine_info(dev),
                "torch": torch.__version__, "channels_last": cfg.channels_last, "history": run.history}
    card = training_card(name=wpath.name[: -len(".safetensors")], arch=arch, input_shape=train_dataset.image_shape,
                         class_names=train_dataset.class_names, parameters=sum(p.numel() for p in run.model.parameters()),
                         recipe=recipe, training=training, metrics=metrics,
                         metrics_protocol=metrics_protocol(cfg.recipe, eps=cfg.eps, sigma=cfg.sigma, n_images=n_eval,
                                                           test_set=getattr(test_dataset, "name", "test"),
                                                           limit=cfg.eval_limit),
                         eval_limit=cfg.eval_limit)
    path = save_checkpoint(wpath, run.model, card)
    if not keep_resume:
        rpath.unlink(missing_ok=True)
    log(f"wrote {path} and {path.with_suffix('.json')}: best epoch {run.best['epoch']}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; training {run.wall:.0f} s")
    return TrainResult(path, json.loads(path.with_suffix(".json").read_text()), run.history, run.best["epoch"], True)
