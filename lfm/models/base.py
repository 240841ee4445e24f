"""The one shape every model in the zoo has: a `body` that makes features and a linear `head`.

LFM needs the split: learners W1 and W2 may share a body with separate heads, and the
encoder V is a body on its own. So every factory returns a `Classifier` whose
`forward(x) = head(body(x))` and whose `features(x) = body(x)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lfm.errors import LFMError


class Classifier(nn.Module):
    """`body`: (B, *input_shape) -> (B, feature_dim); `head`: Linear(feature_dim, num_classes)."""

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        input_shape: Sequence[int] = (),
    ):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's features, (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.head(self.body(x))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running stats are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_weights(module: nn.Module) -> None:
    """Standard init: kaiming-normal convs (fan_out, ReLU), BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            # fan_out as in torchvision and He et al. 2015; keeps backward signal variance at 1
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        # nn.Linear keeps PyTorch's default (uniform, fan_in), as torchvision does


@contextmanager
def batchnorm_batch_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, BatchNorm layers in train mode use batch statistics but update nothing.

    torch.func.grad/jvp/vjp refuse a function that mutates a captured tensor, and a train-mode
    BatchNorm does exactly that (num_batches_tracked += 1, running mean/var updates). Switching
    off `track_running_stats` for the duration keeps the train-mode maths (normalise by the
    batch's statistics) and leaves the buffers untouched. Eval-mode layers are unaffected.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, s in zip(norms, saved, strict=True):
            m.track_running_stats = s


def image_shape(
    input_shape: Sequence[int],
    model: str,
    fix: str = "use 'mlp' for flat vectors or 'cnn1d' for 1-D signals, "
    "or reshape the data to (channels, height, width)",
) -> tuple[int, int, int]:
    """Check that `input_shape` is (C, H, W) and return it; otherwise an LFMError naming the fix."""
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise LFMError(f"{model} needs images shaped (C, H, W) but input_shape is {shape}", fix)
    return shape  # type: ignore[return-value]
