"""Architectures: bnadapt's pre-activation ResNet for small inputs, and the literature's layouts.

Input normalization is a layer inside every model (:class:`Normalize`, buffers not saved in the state
dict), so models take pixels in [0, 1]; every architecture takes ``mean``/``std`` arguments for it.
The literature's layouts have state-dict keys identical to their published code, so their checkpoints
load unchanged (see :mod:`bnadapt.models.formats` for detection and the files' containers):

- torchvision's ResNets (``resnet18`` ... ``resnet152``, ``wide_resnet50_2``, ``wide_resnet101_2``;
  also the MadryLab ``robustness`` library's ImageNet classifiers): ImageNet normalization by default;
- Rice et al.'s pre-activation ResNets (locuslab/robust_overfitting ``preactresnet.py``:
  ``preact_resnet18`` ...): trained with CIFAR-10 normalization applied outside the model, so that is
  their default here;
- the TRADES/RobustBench WideResNet (``wide_resnet`` with ``depth``/``widen_factor``; named
  ``wrn_28_10``, ``wrn_34_10``, ``wrn_70_16``): RobustBench's models take [0, 1] pixels, so no
  normalization by default.

Every network ends in adaptive average pooling, so the spatial input size is free (the published
CIFAR networks' fixed 4x4 / 8x8 pooling is the same operation on 32x32 images).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are non-persistent buffers (kept out of state dicts).

    The input must have exactly as many channels as ``mean`` (a 1-channel image would otherwise be
    broadcast silently to 3 channels); a single-value mean applies to any number of channels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and self.mean.shape[1] != 1 and x.shape[1] != self.mean.shape[1]:
            c = self.mean.shape[1]
            shape = ", ".join([str(d) for d in x.shape])
            raise ValueError("expected images with " + str(c) + " channels, got input of shape (" + shape + ")")
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-ReLU-conv-BN-ReLU-conv plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images (1x28x28, 3x32x32).

    ``widths`` gives the channels of each stage (stage i > 0 halves the resolution), ``depth`` the
    blocks per stage, ``stem_stride`` the stride of the first 3x3 convolution (2 halves the cost on
    28x28 inputs). Every block has BatchNorm2d layers, so the whole network is BN-adaptable.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
        stem_stride: int = 2,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        super().__init__()
        if len(mean) == 1 and in_channels > 1:
            mean, std = list(mean) * in_channels, list(std) * in_channels
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(depth):
                blocks.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Rice et al. (locuslab/robust_overfitting utils.py): the training set's per-channel mean and std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
NO_MEAN = (0.0, 0.0, 0.0)
NO_STD = (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------- torchvision ResNets
class BasicBlock(nn.Module):
    """torchvision's basic block (ResNet-18/34), same attribute names."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        if base_width != 64:
            raise TypeError("basic blocks take no width_per_group other than 64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3x3 convolution; inner width ``planes * base_width / 64``,
    128 for the wide ResNets), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet with torchvision's state-dict layout (``conv1``, ``bn1``, ``layer1``..``layer4`` with
    ``downsample.0/1``, ``fc``), plus a non-persistent :class:`Normalize` in front (ImageNet's by default).

    ``block`` is ``"basic"`` or ``"bottleneck"``, ``layers`` the blocks per stage, ``width_per_group``
    the bottleneck's base width (128: the wide ResNets)."""

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width_per_group: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int = 3,
    ):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise TypeError(f"block must be 'basic' or 'bottleneck' (got {block!r})")
        if len(layers) != 4:
            raise TypeError(f"layers must list 4 stages (got {list(layers)})")
        cls = BasicBlock if block == "basic" else Bottleneck
        self.normalize = Normalize(*_per_channel(mean, std, in_channels))
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(cls, 64, layers[0], 1, width_per_group)
        self.layer2 = self._make_layer(cls, 128, layers[1], 2, width_per_group)
        self.layer3 = self._make_layer(cls, 256, layers[2], 2, width_per_group)
        self.layer4 = self._make_layer(cls, 512, layers[3], 2, width_per_group)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * cls.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, cls, planes: int, blocks: int, stride: int, base_width: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * cls.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * cls.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * cls.expansion),
            )
        layers = [cls(self.inplanes, planes, stride, downsample, base_width)]
        self.inplanes = planes * cls.expansion
        layers += [cls(self.inplanes, planes, 1, None, base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50(ResNet):
    """torchvision's ``resnet50`` (3x224x224 inputs, ImageNet normalization inside)."""

    def __init__(self, num_classes: int = 1000, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, in_channels: int = 3):
        super().__init__("bottleneck", (3, 4, 6, 3), num_classes, 64, mean, std, in_channels)


# Named torchvision layouts: (block, blocks per stage, width_per_group).
TORCHVISION_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128),
}


def _torchvision(name: str):
    block, layers, width = TORCHVISION_RESNETS[name]

    def make(num_classes: int = 1000, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             in_channels: int = 3) -> nn.Module:
        if name == "resnet50":
            return ResNet50(num_classes, mean, std, in_channels)
        return ResNet(block, layers, num_classes, width, mean, std, in_channels)

    make.__name__ = name
    make.__doc__ = f"torchvision's ``{name}`` layout ({block} blocks {list(layers)}, width per group {width})."
    return make


# ----------------------------------------------------------------------------------------- Rice et al.'s PreActResNet
class RicePreActBlock(nn.Module):
    """Pre-activation basic block in locuslab/robust_overfitting's layout: ``bn1``, ``conv1``, ``bn2``,
    ``conv2`` and, when the shape changes, ``shortcut.0`` (a 1x1 convolution of the pre-activated input)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + sc


class RicePreActBottleneck(nn.Module):
    """The pre-activation bottleneck of the same file (``bn1``/``conv1`` 1x1, ``bn2``/``conv2`` 3x3,
    ``bn3``/``conv3`` 1x1, ``shortcut.0``)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + sc


class RicePreActResNet(nn.Module):
    """Rice et al.'s pre-activation ResNet for 3x32x32 (keys ``conv1``, ``layer1``..``layer4``, ``bn``,
    ``linear``), with CIFAR-10 normalization inside (their training script normalizes outside)."""

    def __init__(
        self,
        block: str = "basic",
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise TypeError(f"block must be 'basic' or 'bottleneck' (got {block!r})")
        if len(num_blocks) != 4:
            raise TypeError(f"num_blocks must list 4 stages (got {list(num_blocks)})")
        cls = RicePreActBlock if block == "basic" else RicePreActBottleneck
        self.normalize = Normalize(*_per_channel(mean, std, 3))
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(cls, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(cls, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(cls, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(cls, 512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512 * cls.expansion)
        self.linear = nn.Linear(512 * cls.expansion, num_classes)

    def _make_layer(self, cls, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(cls(self.in_planes, planes, s))
            self.in_planes = planes * cls.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


RICE_PREACT_RESNETS = {
    "preact_resnet18": ("basic", (2, 2, 2, 2)),
    "preact_resnet34": ("basic", (3, 4, 6, 3)),
    "preact_resnet50": ("bottleneck", (3, 4, 6, 3)),
    "preact_resnet101": ("bottleneck", (3, 4, 23, 3)),
    "preact_resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _rice(name: str):
    block, blocks = RICE_PREACT_RESNETS[name]

    def make(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
             std: Sequence[float] = CIFAR10_STD) -> nn.Module:
        return RicePreActResNet(block, blocks, num_classes, mean, std)

    make.__name__ = name
    make.__doc__ = f"Rice et al.'s ``{name}`` layout ({block} blocks {list(blocks)})."
    return make


# ----------------------------------------------------------------------------------------- WideResNet
class WideBasicBlock(nn.Module):
    """The TRADES/RobustBench WideResNet block: ``bn1``, ``conv1``, ``bn2``, ``conv2`` and, when the
    width changes, ``convShortcut``. When it does, the shortcut and ``conv1`` both take the
    pre-activated input; otherwise the shortcut is the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideBlockGroup(nn.Module):
    """``NetworkBlock``: the blocks of one stage under ``layer``."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` in the TRADES/RobustBench layout (``conv1``, ``block1``..``block3``
    each with ``layer.N``, optional unused ``sub_block1``, ``bn1``, ``fc``); no normalization by default
    (RobustBench's models take [0, 1] pixels)."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        sub_block1: bool = False,
        bias_last: bool = True,
        mean: Sequence[float] = NO_MEAN,
        std: Sequence[float] = NO_STD,
    ):
        super().__init__()
        if int(depth) < 10 or (int(depth) - 4) % 6 != 0:
            raise TypeError(f"depth must be 6n+4 with n >= 1, e.g. 16, 28, 34, 70 (got {depth})")
        n = (int(depth) - 4) // 6
        ch = [16, 16 * int(widen_factor), 32 * int(widen_factor), 64 * int(widen_factor)]
        self.normalize = Normalize(*_per_channel(mean, std, 3))
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = WideBlockGroup(n, ch[0], ch[1], 1)
        if sub_block1:  # present in some published checkpoints; not used by forward
            self.sub_block1 = WideBlockGroup(n, ch[0], ch[1], 1)
        self.block2 = WideBlockGroup(n, ch[1], ch[2], 2)
        self.block3 = WideBlockGroup(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes, bias=bias_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


WIDE_RESNETS = {"wrn_28_10": (28, 10), "wrn_34_10": (34, 10), "wrn_70_16": (70, 16)}


def _wrn(name: str):
    depth, widen = WIDE_RESNETS[name]

    def make(num_classes: int = 10, sub_block1: bool = False, bias_last: bool = True,
             mean: Sequence[float] = NO_MEAN, std: Sequence[float] = NO_STD) -> nn.Module:
        return WideResNet(depth, widen, num_classes, sub_block1, bias_last, mean, std)

    make.__name__ = name
    make.__doc__ = f"WRN-{depth}-{widen} in the TRADES/RobustBench layout."
    return make


def _per_channel(mean: Sequence[float], std: Sequence[float], channels: int):
    """A single-value mean/std applies to every channel."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) == 1 and len(std) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return mean, std


ARCHITECTURES = {
    "preact_resnet": PreActResNet,
    **{name: _torchvision(name) for name in TORCHVISION_RESNETS},
    **{name: _rice(name) for name in RICE_PREACT_RESNETS},
    "wide_resnet": WideResNet,
    **{name: _wrn(name) for name in WIDE_RESNETS},
}

# The normalization each family uses when neither the checkpoint nor the caller names one, and where it comes from.
DEFAULT_NORMALIZATION = {
    **{name: (IMAGENET_MEAN, IMAGENET_STD, "ImageNet (torchvision)") for name in TORCHVISION_RESNETS},
    **{name: (CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10 (Rice et al.)") for name in RICE_PREACT_RESNETS},
    **{name: (NO_MEAN, NO_STD, "none (RobustBench)") for name in ("wide_resnet", *WIDE_RESNETS)},
    "preact_resnet": ((0.5,), (0.5,), "bnadapt's default"),
}


def input_shape_for(arch: str, arch_args: dict | None = None) -> list[int | None] | None:
    """The input shape (C, H, W) an architecture with these arguments takes: the channels exactly
    (``in_channels``, default 1 for ``preact_resnet`` and 3 for the others); every network ends in
    adaptive average pooling, so the spatial size is free (``None``)."""
    if arch not in ARCHITECTURES:
        return None
    default_c = 1 if arch == "preact_resnet" else 3
    return [int((arch_args or {}).get("in_channels", default_c)), None, None]
