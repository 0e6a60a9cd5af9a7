"""Architectures, checkpoints and model loading (see :mod:`bnadapt.models.checkpoint`; other code's
checkpoint files: :mod:`bnadapt.models.formats`)."""

from bnadapt.models.arch import ARCHITECTURES, Normalize, PreActResNet, ResNet, ResNet50, RicePreActResNet, WideResNet
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
from bnadapt.models.formats import check_normalize, detect_arch
from bnadapt.models.setup import Setup, setup_models

__all__ = [
    "ARCHITECTURES", "Normalize", "PreActResNet", "ResNet", "ResNet50", "RicePreActResNet", "WideResNet", "ZOO_DIR",
    "LoadedModel", "build_model", "check_input_shape", "check_model_on_data", "check_normalize", "detect_arch",
    "load_model", "load_state_into", "save_checkpoint", "Setup", "setup_models", "zoo_names",
]
