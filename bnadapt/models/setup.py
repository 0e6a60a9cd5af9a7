"""The one way every experiment sets up its models: validated against the data, copied onto the
device (the caller's models stay as they are), checked for adaptation where the experiment adapts."""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import nn

from bnadapt.adapt import check_model
from bnadapt.errors import check, check_adapt_images
from bnadapt.models.checkpoint import LoadedModel, check_model_on_data
from bnadapt.runs import check_precision, device_copy, resolve_device

EAGER_HINT = "a checkpoint, or a state dict with --arch"


class Setup(NamedTuple):
    """What :func:`setup_models` returns: the device, the precision, one device copy per model (in eval
    mode as loaded) and each model's number of outputs."""

    device: torch.device
    precision: str
    nets: list[nn.Module]
    classes: list[int]


def setup_models(models: Sequence[LoadedModel], image_shape: tuple[int, ...], num_classes: int, *, device=None,
                 precision: str | None = "fp32", adapting: Literal["no", "eager", "all"] = "no",
                 needs: str = "adapting the model", hint: str = "", images: int | None = None) -> Setup:
    """Validate ``models`` against data of per-image ``image_shape`` and ``num_classes`` labels and copy
    each onto ``device`` (resolved once here), before any work. ``adapting``: ``"no"`` (used as given),
    ``"eager"`` (eager models are adapted, so they must have BN layers; TorchScript models are evaluated
    without adaptation), ``"all"`` (every model is adapted: a TorchScript model is a one-line error saying
    that ``needs`` needs the eager model, then ``hint``). ``images``: the number of images adapted on (at least 2).
    Every failure is a one-line error."""
    dev = resolve_device(device)
    precision = check_precision(precision, dev)
    check(len(models) >= 1, "no model given; pass at least one --model")
    if adapting != "no" and images is not None:
        check_adapt_images(images)
    nets, classes = [], []
    for m in models:
        classes.append(int(check_model_on_data(m, tuple(image_shape), num_classes)))
        if adapting == "all":
            check(not m.is_torchscript, f"model {m.name} is TorchScript; {needs} needs the eager model ({EAGER_HINT}){hint}")
        if adapting != "no" and not m.is_torchscript:
            check_model(m.model)
        nets.append(device_copy(m.model, dev))
    return Setup(dev, precision, nets, classes)
