"""Layers that see the whole batch when the batch is split over processes.

Under torchrun each process runs the network on its rows of a global batch (`Part`). Two kinds
of layer would then compute something other than one process computes on the whole batch:

- BatchNorm in training mode normalises with the batch's statistics. `global_batch_norm`
  makes every BatchNorm of a network take them over the global batch: the per-channel sums go
  through `differentiable_sum`, so gradients, Hessian-vector products and forward-mode
  derivatives through the statistics are those of the whole batch (SyncBatchNorm's idea, in a
  form `torch.func` can transform). Running statistics are updated with the global values.
- Per-example random masks (P-DARTS's skip dropout, DARTS's drop-path): `bernoulli_rows`
  draws the mask of the whole batch from the RNG (identical on every process) and keeps this
  process's rows, so the masks are the ones a single process draws.

Both act only inside `rows(part)` with a split part; everywhere else (a plain run, a
replicated pass over the validation batch, evaluation) they are the ordinary layers, at the
ordinary cost.

Example
-------
>>> net = global_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
>>> with rows(Part.whole(8)):  # a plain run: the usual BatchNorm
...     net(torch.randn(8, 3, 6, 6)).shape
torch.Size([8, 4, 4, 4])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lfm.train.distributed import Part, differentiable_sum

_CURRENT: list[Part] = []


@contextmanager
def rows(part: Part) -> Iterator[None]:
    """Run the block's forward passes on `part`'s rows of the global batch."""
    _CURRENT.append(part)
    try:
        yield
    finally:
        _CURRENT.pop()


def current_part() -> Part | None:
    """The split part the forward pass runs on, or None (a whole batch)."""
    if _CURRENT and _CURRENT[-1].split:
        return _CURRENT[-1]
    return None


def bernoulli_rows(like: Tensor, keep: float, shape: tuple[int, ...] | None = None) -> Tensor:
    """A 0/1 mask of `shape` (default like's) with P(1) = keep, dtype and device of `like`;
    inside `rows(part)` the rows are this process's of the whole batch's mask."""
    shape = tuple(like.shape) if shape is None else shape
    part = current_part()
    # mutant split-masks-drawn-per-part: `if part is None:` -> `if True:`
    #   | distributed_search:pieces
    if part is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(keep)
    whole = torch.empty((part.total, *shape[1:]), device=like.device, dtype=like.dtype)
    return part.local(whole.bernoulli_(keep))


def dropout(x: Tensor, p: float) -> Tensor:
    """Element-wise dropout (inverted scaling) whose mask is drawn for the whole batch."""
    if p <= 0.0:
        return x
    return x * bernoulli_rows(x, 1.0 - p) / (1.0 - p)


class _GlobalBatchNorm:
    """BatchNorm over the global batch inside `rows(part)`; the usual one elsewhere."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        part = current_part()
        batch_stats = self.training or self.running_mean is None
        # mutant split-bn-local-statistics: `part is None or` -> `True or`
        #   | distributed_search:pieces
        if part is None or not batch_stats:
            return super().forward(x)
        return _global_batch_norm(self, x, part)


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, part: Part) -> Tensor:
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    n = part.total * math.prod(x.shape[2:])  # values per channel in the global batch
    xf = x.float()  # statistics in fp32, as BatchNorm keeps them under autocast
    # one all-reduce per layer (forward and backward alike) for both moments: a layer-by-layer
    # collective is what a split pass pays for, and the supernet has hundreds of BatchNorms
    moments = differentiable_sum(torch.stack([xf.sum(dims), (xf * xf).sum(dims)])) / n
    mean = moments[0]
    var = (moments[1] - mean * mean).clamp_min(0.0)  # biased, as normalisation uses
    out = (xf - mean.view(view)) * torch.rsqrt(var + bn.eps).view(view)
    if bn.affine:
        out = out * bn.weight.view(view) + bn.bias.view(view)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(f * mean.detach())
            bn.running_var.mul_(1 - f).add_(f * var.detach() * (n / max(n - 1, 1)))
    return out.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d whose statistics are the global batch's inside `rows(part)`."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d whose statistics are the global batch's inside `rows(part)`."""


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d}


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm1d / BatchNorm2d in `module` a global-batch one, in place.

    The layers keep their parameters, buffers and state_dict keys (only their class changes to
    a subclass that adds no state), so checkpoints load either way. Returns `module`.
    """
    for m in module.modules():
        cls = _GLOBAL.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return module
