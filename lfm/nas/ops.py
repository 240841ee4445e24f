"""The eight candidate operations of the DARTS search space and the blocks they are built from.

References:
- Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019
  (`operations.py` of the official code: the op table, SepConv, DilConv, FactorizedReduce).
- Chen, Xie, Wu, Tian, "Progressive Differentiable Architecture Search" (P-DARTS), ICCV 2019.

Every op maps (B, C, H, W) -> (B, C, H/stride, W/stride). `affine=False` is what the search
supernet uses (BatchNorm without learnable scale, so the op weights in alpha carry the scale);
the evaluation network uses `affine=True`.

`dim=1` gives the same operations on sequences, (B, C, L) -> (B, C, L/stride), for search
spaces over 1-D data such as MNIST-1D: a "3x3" op there has a kernel of 3, a "5x5" one of 5,
and the receptive fields are the 2-D ones' along one axis (sep 3: 5, sep 5: 9, dil 3: 5,
dil 5: 9, pools: 3). The 2-D ops (the default) are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The order matters: alpha columns follow it, and index 0 is the `none` op.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


DIMS = (1, 2)


def _conv(dim: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d}[dim]


def _bn(dim: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]


class ReLUConvBN(nn.Module):
    """ReLU -> Conv(k, stride) -> BN; the cell's input pre-processing and the aux head's block."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        padding: int,
        affine: bool,
        dim: int = 2,
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            _conv(dim)(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            _bn(dim)(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN (DARTS `dil_conv_kxk`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool,
        dim: int = 2,
    ):
        super().__init__()
        conv = _conv(dim)
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            conv(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            conv(c_in, c_out, 1, bias=False),
            _bn(dim)(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked depthwise-separable convs, the first with `stride` (DARTS `sep_conv_kxk`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        padding: int,
        affine: bool,
        dim: int = 2,
    ):
        super().__init__()
        self.op = nn.Sequential(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine, dim),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Identity(nn.Module):
    """skip_connect at stride 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (kept so alpha can learn to switch an edge off)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        every = (slice(None, None, self.stride),) * (x.dim() - 2)  # each spatial axis
        return x[(slice(None), slice(None), *every)].mul(0.0)  # (B, C, ceil(H/s), ceil(W/s))


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1x1 stride-2 convs, concatenated (skip_connect at stride 2)."""

    def __init__(self, c_in: int, c_out: int, affine: bool, dim: int = 2):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = _conv(dim)(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = _conv(dim)(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = _bn(dim)(c_out, affine=affine)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # DARTS shifts by one pixel with x[:, :, 1:, 1:]; padding by one first keeps both halves
        # the same size on odd sides (7x7 -> 4x4) and is identical to DARTS on even sides.
        one = (slice(1, None),) * self.dim
        shifted = F.pad(x, (0, 1) * self.dim)[(slice(None), slice(None), *one)]
        out = torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)  # (B, c_out, H/2, W/2)
        return self.bn(out)


OPS: dict[str, Callable[[int, int, bool, int], nn.Module]] = {
    "none": lambda c, stride, affine, dim: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine, dim: {1: nn.AvgPool1d, 2: nn.AvgPool2d}[dim](
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda c, stride, affine, dim: {1: nn.MaxPool1d, 2: nn.MaxPool2d}[dim](
        3, stride=stride, padding=1
    ),
    "skip_connect": lambda c, stride, affine, dim: (
        Identity() if stride == 1 else FactorizedReduce(c, c, affine, dim)
    ),
    "sep_conv_3x3": lambda c, stride, affine, dim: SepConv(c, c, 3, stride, 1, affine, dim),
    "sep_conv_5x5": lambda c, stride, affine, dim: SepConv(c, c, 5, stride, 2, affine, dim),
    "dil_conv_3x3": lambda c, stride, affine, dim: DilConv(c, c, 3, stride, 2, 2, affine, dim),
    "dil_conv_5x5": lambda c, stride, affine, dim: DilConv(c, c, 5, stride, 4, 2, affine, dim),
}


def make_op(name: str, c: int, stride: int, affine: bool, dim: int = 2) -> nn.Module:
    """The op `name` on `c` channels at `stride`, over `dim` spatial axes (1: sequences, 2:
    images). A KeyError for the name is a programming error; a bad `dim` is refused.

    Example
    -------
    >>> make_op("dil_conv_3x3", 8, 1, affine=False, dim=1)(torch.randn(2, 8, 40)).shape
    torch.Size([2, 8, 40])
    """
    if dim not in DIMS:
        raise ValueError(f"operations exist for dim in {DIMS}, got {dim}")
    return OPS[name](c, stride, affine, dim)
