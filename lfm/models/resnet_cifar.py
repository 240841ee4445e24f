"""The CIFAR ResNets of He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", 2016.

Section 4.2 of the paper: a 3x3 conv with 16 channels, then three stages of n basic blocks
with widths 16/32/64 (the first block of stages 2 and 3 halves the resolution), global
average pooling and a linear classifier; depth = 6n + 2. Shortcuts are "option A": identity,
subsampled by 2 and zero-padded in channels when the shape changes, so they add no
parameters. This is the ResNet-32 used by Meta-Weight-Net and the class-balanced-loss code
(0.46M parameters on CIFAR-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm.errors import LFMError
from lfm.models.base import Classifier, image_shape, init_weights
from lfm.models.registry import MODELS


class ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsample, then zero-pad the channels from c_in to c_out."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = c_out - c_in
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)  # (W, W, H, H, C-front, C-back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ceil(H/2) rows, the same size a 3x3, stride-2, padding-1 conv gives, odd H included
        x = x[:, :, :: self.stride, :: self.stride]  # (B, c_in, H, W) -> (B, c_in, H/s, W/s)
        return F.pad(x, self.pad)  # -> (B, c_out, H/s, W/s)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else ShortcutA(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, c_in, H, W) -> (B, c_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifarBody(nn.Module):
    """Stem, three stages of n blocks (16/32/64 channels), global average pool -> (B, 64)."""

    def __init__(self, in_channels: int, n: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, C, H, W) -> (B, 16, H, W)
        x = self.layer1(x)  # -> (B, 16, H, W)
        x = self.layer2(x)  # -> (B, 32, H/2, W/2)
        x = self.layer3(x)  # -> (B, 64, H/4, W/4)
        return self.pool(x).flatten(1)  # -> (B, 64)


def resnet_cifar(num_classes: int, input_shape: tuple[int, ...], depth: int) -> Classifier:
    """A CIFAR ResNet of depth 6n + 2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise LFMError(f"CIFAR ResNet depth must be 6n + 2 (e.g. 20, 32, 56), got {depth}")
    c, _, _ = image_shape(input_shape, f"model 'resnet{depth}'")
    body = ResNetCifarBody(c, (depth - 2) // 6)
    model = Classifier(body, body.out_dim, num_classes, input_shape)
    init_weights(model)
    return model


def _register(depth: int, params: str) -> None:
    @MODELS.register(f"resnet{depth}", f"CIFAR ResNet-{depth} (He et al. 2016, option A), {params}")
    def factory(num_classes: int, input_shape: tuple[int, ...]) -> Classifier:
        return resnet_cifar(num_classes, input_shape, depth)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} with option-A shortcuts."


for _depth, _params in ((20, "0.27M"), (32, "0.46M"), (44, "0.66M"), (56, "0.85M"), (110, "1.7M")):
    _register(_depth, _params)
