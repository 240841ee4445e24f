"""Small models for small data: an MLP, a two-layer 2-D CNN, and the MNIST-1D 1-D CNN.

- `mlp`: a plain multilayer perceptron on the flattened input.
- `cnn`: conv 32 -> conv 64 -> adaptive pool -> Linear(256, 128); sized for 8x8 digits up to
  CIFAR-size images.
- `cnn1d`: the 1-D CNN of Greydanus, "Scaling down deep learning" (MNIST-1D), 2020:
  three Conv1d layers with 25 channels, kernels 5/3/3, stride 2, padding 1, ReLU, flatten.
  With input length 40 the flat size is 25 * 5 = 125 and the model has 5,210 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lfm.errors import LFMError
from lfm.models.base import Classifier, image_shape, init_weights
from lfm.models.registry import MODELS


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@MODELS.register("mlp", "multilayer perceptron on the flattened input; option hidden_sizes")
def mlp(
    num_classes: int, input_shape: tuple[int, ...], *, hidden_sizes: Sequence[int] = (256, 256)
) -> Classifier:
    """MLP: flatten -> [Linear -> ReLU] per hidden size -> head."""
    layers: list[nn.Module] = [nn.Flatten()]  # (B, *input_shape) -> (B, D)
    width = _prod(input_shape)
    sizes = [hidden_sizes] if isinstance(hidden_sizes, int) else hidden_sizes
    if isinstance(sizes, str) or not all(isinstance(h, int) and h >= 1 for h in sizes):
        raise LFMError(
            f"mlp hidden_sizes must be positive whole numbers, got {hidden_sizes!r}",
            "pass e.g. --model-opt hidden_sizes=[256,256]",
        )
    for h in sizes:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]  # (B, width) -> (B, h)
        width = h
    model = Classifier(nn.Sequential(*layers), width, num_classes, input_shape)
    init_weights(model)
    return model


@MODELS.register("cnn", "small 2-D CNN: conv 32 -> conv 64 -> adaptive pool, 128 features")
def cnn(num_classes: int, input_shape: tuple[int, ...]) -> Classifier:
    """Small 2-D CNN for (C, H, W) inputs of any size, 8x8 upwards."""
    c, _, _ = image_shape(input_shape, "model 'cnn'")
    body = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1),  # (B, C, H, W) -> (B, 32, H, W)
        nn.ReLU(inplace=False),
        # ceil_mode so a side of 1 stays 1 instead of vanishing on tiny inputs
        nn.MaxPool2d(2, ceil_mode=True),  # -> (B, 32, H/2, W/2)
        nn.Conv2d(32, 64, 3, padding=1),  # -> (B, 64, H/2, W/2)
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2, ceil_mode=True),  # -> (B, 64, H/4, W/4)
        # 2x2 keeps coarse layout (top/bottom, left/right), which matters for digits
        nn.AdaptiveAvgPool2d(2),  # -> (B, 64, 2, 2)
        nn.Flatten(),  # -> (B, 256)
        nn.Linear(256, 128),  # -> (B, 128)
        nn.ReLU(inplace=False),
    )
    model = Classifier(body, 128, num_classes, input_shape)
    init_weights(model)
    return model


class _AddChannel(nn.Module):
    """(B, L) -> (B, 1, L), so a 1-D model also accepts signals stored without a channel axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _conv1d_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


@MODELS.register("cnn1d", "MNIST-1D CNN (Greydanus 2020): 3 x Conv1d(25), kernels 5/3/3, stride 2")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], *, channels: int = 25) -> Classifier:
    """The MNIST-1D 1-D CNN for inputs (C, L) or (L,); ~5.2k parameters at length 40."""
    if len(input_shape) == 1:
        in_ch, length = 1, input_shape[0]
        layers: list[nn.Module] = [_AddChannel()]  # (B, L) -> (B, 1, L)
    elif len(input_shape) == 2:
        (in_ch, length), layers = input_shape, []
    else:
        raise LFMError(
            f"model 'cnn1d' needs signals shaped (C, L) or (L,) but input_shape is {input_shape}",
            "use 'cnn' or a ResNet for images, or 'mlp' for anything",
        )
    width = length
    for i, kernel in enumerate((5, 3, 3)):
        layers += [
            nn.Conv1d(in_ch if i == 0 else channels, channels, kernel, stride=2, padding=1),
            nn.ReLU(inplace=False),
        ]
        width = _conv1d_out(width, kernel, 2, 1)  # 40 -> 19 -> 10 -> 5
    if width < 1:
        raise LFMError(f"cnn1d needs signals of length 3 or more, got length {length}", "use 'mlp'")
    layers.append(nn.Flatten())  # (B, channels, width) -> (B, channels * width) = (B, 125)
    model = Classifier(nn.Sequential(*layers), channels * width, num_classes, input_shape)
    init_weights(model)
    return model
