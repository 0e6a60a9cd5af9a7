"""Model cards and the metrics written in them.

A card is the JSON file beside a checkpoint (``NAME.json`` beside ``NAME.safetensors``): ``name``,
``arch``, ``arch_args``, ``input_shape``, ``normalization``, ``class_names``, and when known the
training ``recipe``, ``metrics`` (fractions of the test set, eval mode, no adaptation) with the exact
``metrics_protocol``, ``robust_metrics`` (stronger attacks), or ``adaptation`` (for adapted
checkpoints, which get their own name and drop the source's metrics).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnadapt.errors import BnadaptError, check
from bnadapt.runs import model_device, to_device

EVAL_SEED = 0             # seed of the test-metric noise / PGD random starts
EVAL_ATTACK_STEPS = 20
EVAL_LINF_STEP = 0.01
EVAL_BATCH = 500
PGD_THREAT = {"pgd-linf": "linf", "pgd-l2": "l2"}
RECIPES = ("standard", "gaussian", "pgd-linf", "pgd-l2")


# ----------------------------------------------------------------------------------------- metrics
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run a block with ``model`` in eval mode; flags, buffers and ``requires_grad`` restored after."""
    from bnadapt.attacks import preserved_state

    with preserved_state(model):
        model.eval()
        yield model


@torch.no_grad()
def clean_accuracy(model: nn.Module, dataset, indices, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in eval mode (model left unchanged)."""
    device = model_device(model)
    idx = np.asarray(indices, dtype=np.int64)
    correct = 0
    with eval_mode(model):
        for x, y in dataset.batches(batch_size, idx):
            correct += int((model(to_device(x, device)).argmax(1).cpu() == y).sum())
    return correct / max(len(idx), 1)


@torch.no_grad()
def noise_accuracy(model: nn.Module, dataset, indices, sigma: float, seed: int, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in eval mode under ``N(0, sigma^2)`` pixel noise (no clipping), one CPU generator seeded with ``seed``."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    idx = np.asarray(indices, dtype=np.int64)
    correct = 0
    with eval_mode(model):
        for x, y in dataset.batches(batch_size, idx):
            x = x + sigma * torch.randn(x.shape, generator=gen)
            correct += int((model(to_device(x, device)).argmax(1).cpu() == y).sum())
    return correct / max(len(idx), 1)


def pgd_accuracy(model: nn.Module, dataset, indices, attack, seed: int, batch_size: int = EVAL_BATCH,
                 progress: bool = False) -> float:
    """Top-1 accuracy in eval mode under ``attack`` (see :func:`bnadapt.attacks.accuracy_under_attack`)."""
    from bnadapt.attacks import accuracy_under_attack

    with eval_mode(model):
        return accuracy_under_attack(model, dataset, attack, batch_size, indices, progress=progress, seed=seed)


def eval_attack(recipe: str, eps: float):
    """The card's attack for a PGD recipe: 20 steps, random start (Linf step 0.01, L2 step 2.5*eps/20)."""
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
        attack = eval_attack(recipe, eps)
        proto["pgd_acc"] = (f"top-1 accuracy under untargeted {attack.threat.value} PGD on cross-entropy: eps {eps:g}, "
                            f"{attack.steps} steps of {attack.step_size:g}, uniform random start, outputs clipped to "
                            f"[0, 1]; random starts from a torch.Generator seeded {seed}, batches in file order")
        proto["attack"] = attack.describe()
    return proto


def evaluate_metrics(model: nn.Module, recipe: str, test_dataset, *, eps: float | None = None,
                     sigma: float | None = None, limit: int | None = None, seed: int = EVAL_SEED,
                     batch_size: int = EVAL_BATCH, progress: bool = False) -> dict[str, float]:
    """The card's metrics for ``model`` on ``test_dataset`` (first ``limit`` images if given).

    Always ``clean_acc``; ``gaussian``: ``noise_acc_<sigma>``; ``pgd-linf`` / ``pgd-l2``: ``pgd_acc``
    under :func:`eval_attack`. All in eval mode, deterministic for ``seed``; the model is left
    unchanged. :func:`metrics_protocol` describes the same measurement in words."""
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
        metrics["pgd_acc"] = pgd_accuracy(model, test_dataset, idx, eval_attack(recipe, eps), seed, batch_size,
                                          progress=progress)
    return metrics


def evaluate_card(loaded, test_dataset=None, *, limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Re-measure a trained model's card metrics (``loaded`` from :func:`bnadapt.models.load_model`).

    Uses the card's recipe (name, eps, sigma) and, unless given, the test split of its data spec."""
    recipe = loaded.card.get("recipe") or {}
    check(recipe.get("name") in RECIPES, f"model {loaded.source} has no training recipe in its card; "
                                         f"use evaluate_metrics with an explicit recipe")
    if test_dataset is None:
        from bnadapt.data import load_dataset

        test_dataset = load_dataset(recipe.get("data", "fashion-mnist"), split="test")
    return evaluate_metrics(loaded.model, recipe["name"], test_dataset, eps=recipe.get("eps"),
                            sigma=recipe.get("sigma"), limit=limit, progress=progress)


# ----------------------------------------------------------------------------------------- cards
def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def training_card(*, name: str, arch: dict, input_shape, class_names, parameters: int, recipe: dict,
                  training: dict, metrics: dict, metrics_protocol: dict, eval_limit: int | None) -> dict[str, Any]:
    """The card of a trained model: what :func:`bnadapt.train.train` knows (its recipe and training
    history) plus the generic parts every card has."""
    from bnadapt.results import library_versions, utc_now

    return {
        "name": name, "arch": "preact_resnet", "arch_args": arch, "input_shape": [int(s) for s in input_shape],
        "normalization": {"mean": arch["mean"], "std": arch["std"], "inside_model": True, "pixels": "[0, 1]"},
        "class_names": list(class_names), "parameters": int(parameters), "recipe": recipe, "training": training,
        "metrics": metrics, "metrics_protocol": metrics_protocol, "eval_limit": eval_limit,
        "provenance": {"created_utc": utc_now(), "versions": library_versions()},
    }


# ----------------------------------------------------------------------------------------- adapted cards
def adapted_name(source_name: str, info: dict) -> str:
    """The name of an adapted checkpoint: the source's name plus what it was adapted to, e.g.
    ``adv-l2-1.5+bn-sigma0.5`` (never the source's own name: two different models)."""
    tag = f"+bn-sigma{float(info.get('sigma', 0.0)):g}"
    if float(info.get("rho", 1.0)) != 1.0:
        tag += f"-rho{float(info['rho']):g}"
    return f"{source_name}{tag}"


def adapted_card(loaded, info: dict, *, name: str | None = None) -> dict[str, Any]:
    """The card of a model adapted from ``loaded``: its own name, the source's architecture and classes,
    ``adaptation`` (source spec and hashes plus ``info``), and none of the source's metrics."""
    card = {k: v for k, v in loaded.card.items()
            if k not in ("metrics", "metrics_protocol", "robust_metrics", "weights_sha256", "tensors_sha256",
                         "weights_bytes", "name", "adaptation", "eval_limit")}
    card["name"] = name or adapted_name(loaded.name, info)
    card["adaptation"] = {"source_model": loaded.source, "source_name": loaded.name, "source_sha256": loaded.sha256,
                          "source_tensors_sha256": loaded.tensors_sha256, **info}
    return card


def save_adapted(path: str | Path, plain: nn.Module, loaded, info: dict, *, torchscript: bool | str | Path = False,
                 example_shape: tuple[int, ...] | None = None, name: str | None = None) -> Path:
    """Write an adapted plain model (:func:`bnadapt.adapt.to_plain`) as our checkpoint with its card, and
    optionally a TorchScript file (``True``: beside it as ``.pt``). Returns the weights path."""
    from bnadapt.models import save_checkpoint
    from bnadapt.results import atomic_write_bytes

    path = Path(path)
    card = adapted_card(loaded, info, name=name)
    plain = plain.eval()
    ts_bytes = None
    if torchscript:  # trace first: a failure leaves no file at all
        check(example_shape is not None, "a TorchScript export needs the input shape")
        dev = model_device(plain)
        try:
            traced = torch.jit.trace(plain, torch.rand(2, *example_shape, device=dev), check_trace=False)
        except Exception as e:  # noqa: BLE001 - a model that cannot be traced
            raise BnadaptError(f"cannot export {card['name']} as TorchScript ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:150]}); drop --torchscript") from e
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        ts_bytes = buf.getvalue()
    weights = save_checkpoint(path, plain, card)
    if ts_bytes is not None:
        atomic_write_bytes(weights.with_suffix(".pt") if torchscript is True else Path(torchscript), ts_bytes)
    return weights
