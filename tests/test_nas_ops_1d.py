"""The DARTS operations in 1-D (sequences such as MNIST-1D): shapes, receptive fields, kernels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfm.nas.ops import PRIMITIVES, make_op

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride,length", [(1, 40), (1, 7), (2, 40), (2, 7)])
def test_every_op_maps_a_sequence_to_its_strided_length(name, stride, length):
    op = make_op(name, 6, stride, affine=False, dim=1)
    x = torch.randn(3, 6, length, requires_grad=True)
    y = op(x)
    assert y.shape == (3, 6, math.ceil(length / stride)), name
    y.sum().backward()  # every op is differentiable (none gives zeros)
    assert x.grad is not None and x.grad.shape == x.shape


# The span of outputs an impulse reaches: the receptive field along the one axis, as the 2-D
# ops have along each (two stacked 3-convs: 5; a 3-conv dilated by 2: 5; a 5-conv by 2: 9).
FIELD = {
    "none": 0,
    "max_pool_3x3": 3,
    "avg_pool_3x3": 3,
    "skip_connect": 1,
    "sep_conv_3x3": 5,
    "sep_conv_5x5": 9,
    "dil_conv_3x3": 5,
    "dil_conv_5x5": 9,
}


@pytest.mark.parametrize("name", PRIMITIVES)
def test_receptive_fields_are_the_2d_ones_along_one_axis(name):
    op = make_op(name, 2, 1, affine=False, dim=1).eval()  # BN: identity with fresh stats
    for p in op.parameters():
        nn.init.constant_(p, 1.0)  # positive weights: no cancellation hides a tap
    x = torch.zeros(1, 2, 31)
    x[0, :, 15] = 1.0
    with torch.no_grad():
        reached = (op(x)[0].abs().sum(0) > 0).nonzero().flatten()
    span = 0 if len(reached) == 0 else int(reached.max() - reached.min()) + 1
    assert span == FIELD[name], (name, span)
    if span:
        assert int(reached.min() + reached.max()) == 30  # centred on the impulse


def test_1d_kernels_have_one_axis():
    """A 1-D separable conv holds k weights per channel per depthwise conv, not k^2."""
    c = 4
    one = sum(p.numel() for p in make_op("sep_conv_5x5", c, 1, False, dim=1).parameters())
    two = sum(p.numel() for p in make_op("sep_conv_5x5", c, 1, False, dim=2).parameters())
    assert one == 2 * (c * 5 + c * c) and two == 2 * (c * 25 + c * c)
    with pytest.raises(ValueError, match="dim"):
        make_op("sep_conv_3x3", c, 1, False, dim=3)
