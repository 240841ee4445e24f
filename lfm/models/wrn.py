"""Wide Residual Networks, Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016.

Pre-activation blocks (BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3) in three groups of
widths 16k/32k/64k, with (depth - 4) / 6 blocks per group and a 1x1 conv shortcut where the
shape changes; a final BN-ReLU, global average pool and a linear classifier. WRN-28-10 has
36.5M parameters on CIFAR-10.
"""

from __future__ import annotations

import torch
from torch import nn

from lfm.errors import LFMError
from lfm.models.base import Classifier, image_shape, init_weights
from lfm.models.registry import MODELS


class WideBlock(nn.Module):
    """Pre-activation basic block with optional dropout between the two convs."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        # Identity when off, so dropout=0 draws no random numbers (clean under torch.func.vmap)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        same = stride == 1 and c_in == c_out
        self.shortcut = (
            None if same else nn.Conv2d(c_in, c_out, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        # As in the authors' code, a projection shortcut takes the pre-activated input.
        skip = x if self.shortcut is None else self.shortcut(a)  # (B, c_out, H/s, W/s)
        out = self.conv1(a)  # (B, c_in, H, W) -> (B, c_out, H/s, W/s)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + skip


class WideResNetBody(nn.Module):
    """Stem conv (16), three groups of wide blocks, BN-ReLU, global pool -> (B, 64 * width)."""

    def __init__(self, in_channels: int, depth: int, width: int, dropout: float):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, c_in = [], 16
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(c_in, c_out, stride, dropout))
                c_in = c_out
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, C, H, W) -> (B, 16, H, W)
        x = self.block1(x)  # -> (B, 16k, H, W)
        x = self.block2(x)  # -> (B, 32k, H/2, W/2)
        x = self.block3(x)  # -> (B, 64k, H/4, W/4)
        x = self.relu(self.bn(x))
        return self.pool(x).flatten(1)  # -> (B, 64k)


@MODELS.register("wrn", "Wide ResNet (Zagoruyko & Komodakis 2016); options depth, width, dropout")
def wrn(
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> Classifier:
    """WRN-depth-width; depth must be 6n + 4."""
    if depth < 10 or (depth - 4) % 6:
        raise LFMError(f"Wide ResNet depth must be 6n + 4 (e.g. 16, 28, 40), got {depth}")
    if width < 1:
        raise LFMError(f"Wide ResNet width must be a positive integer, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise LFMError(f"dropout must be in [0, 1), got {dropout}")
    c, _, _ = image_shape(input_shape, "model 'wrn'")
    body = WideResNetBody(c, depth, width, dropout)
    model = Classifier(body, body.out_dim, num_classes, input_shape)
    init_weights(model)
    # The authors zero the classifier bias; the weight keeps PyTorch's default.
    nn.init.zeros_(model.head.bias)
    return model


@MODELS.register("wrn28_10", "Wide ResNet-28-10 (36.5M parameters); option dropout")
def wrn28_10(num_classes: int, input_shape: tuple[int, ...], *, dropout: float = 0.0) -> Classifier:
    """WRN-28-10."""
    return wrn(num_classes, input_shape, depth=28, width=10, dropout=dropout)
