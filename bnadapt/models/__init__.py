"""Architectures, checkpoints and model loading (see :mod:`bnadapt.models.checkpoint`)."""

from bnadapt.models.arch import ARCHITECTURES, Normalize, PreActResNet, ResNet50
from bnadapt.models.checkpoint import (
    ZOO_DIR,
    LoadedModel,
    build_model,
    check_input_shape,
    check_model_on_data,
    load_model,
    load_state_into,
    save_checkpoint,
    zoo_names,
)

__all__ = [
    "ARCHITECTURES", "Normalize", "PreActResNet", "ResNet50", "ZOO_DIR", "LoadedModel", "build_model",
    "check_input_shape", "check_model_on_data", "load_model", "load_state_into", "save_checkpoint", "zoo_names",
]
