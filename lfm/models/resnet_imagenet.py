"""The ImageNet ResNets of He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016: ResNet-18/34 (basic blocks) and ResNet-50/101/152 (bottleneck blocks).

The layout and parameter names follow torchvision exactly (stride on the 3x3 conv of the
bottleneck, "ResNet v1.5"; 1x1 conv + BN projection shortcuts), so a torchvision state dict
maps onto `body.*` (everything but `fc`) and `head.*` (`fc`); see `lfm.models.weights`.
With 1000 classes and the 7x7 stem, ResNet-18 has 11,689,512 and ResNet-50 25,557,032
parameters, as torchvision's.

`small_input=True` swaps the 7x7 stride-2 stem and max pool for a 3x3 stride-1 conv, the usual
CIFAR adaptation, so a 32x32 image is not shrunk to 8x8 before the first block. By default
it is chosen when the shorter image side is at most 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lfm.models.base import Classifier, image_shape, init_weights
from lfm.models.registry import MODELS


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, c_in, H, W) -> (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, c_in, H, W) -> (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # -> (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # -> (B, 4 * planes, H/s, W/s)
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNetBody(nn.Module):
    """Stem, four stages (64/128/256/512 planes), global average pool -> (B, 512 * expansion)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        self.small_input = small_input
        if small_input:
            self.conv1 = _conv3x3(in_channels, 64)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self._c = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512 * block.expansion

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._c != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._c, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self._c, planes, stride, downsample)]
        self._c = planes * block.expansion
        blocks += [block(self._c, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, C, H, W) -> (B, 64, H/2, W/2); small: H, W
        x = self.maxpool(x)  # -> (B, 64, H/4, W/4); small: unchanged
        x = self.layer1(x)  # -> (B, 64e, h, w), e = expansion
        x = self.layer2(x)  # -> (B, 128e, h/2, w/2)
        x = self.layer3(x)  # -> (B, 256e, h/4, w/4)
        x = self.layer4(x)  # -> (B, 512e, h/8, w/8)
        return self.avgpool(x).flatten(1)  # -> (B, 512e)


_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def resnet_imagenet(
    depth: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    small_input: bool | None = None,
    weights: str | Path | None = None,
) -> Classifier:
    """ImageNet-style ResNet-`depth`; loads a local torchvision state dict when `weights` is set."""
    c, h, w = image_shape(input_shape, f"model 'resnet{depth}'")
    if small_input is None:
        small_input = min(h, w) <= 64
    block, layers = _SPECS[depth]
    body = ResNetBody(block, layers, c, small_input)
    model = Classifier(body, body.out_dim, num_classes, input_shape)
    init_weights(model)
    if weights is not None:
        from lfm.models.weights import load_torchvision_resnet

        load_torchvision_resnet(model, weights)
    return model


def _register(depth: int, params: str) -> None:
    @MODELS.register(
        f"resnet{depth}",
        f"ImageNet ResNet-{depth} (He et al. 2016, {params}); options small_input, weights",
    )
    def factory(
        num_classes: int,
        input_shape: tuple[int, ...],
        *,
        small_input: bool | None = None,
        weights: str | Path | None = None,
    ) -> Classifier:
        return resnet_imagenet(depth, num_classes, input_shape, small_input, weights)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"ImageNet-style ResNet-{depth}, torchvision layout."


for _depth, _params in (
    (18, "11.7M"),
    (34, "21.8M"),
    (50, "25.6M"),
    (101, "44.5M"),
    (152, "60.2M"),
):
    _register(_depth, _params)
