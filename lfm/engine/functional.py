"""Functional views of a module: parameter dicts in, logits and per-example losses out.

Every level of LFM is a plain function of parameter dicts (`torch.func.functional_call`), so
that a virtual step is a new dict, and a hypergradient is a jvp / vjp of one of these functions.

BatchNorm. Only the two *real* forward passes of an iteration (W1 on the training batch in
stage 1, W2 on the training batch in stage 2) update running statistics, exactly once each, as
a plain training step would. Every *virtual* pass (u at W1', the validation loss at W2', the jvp
and finite-difference passes) runs on fresh clones of the buffers made inside the function, so
running stats are never corrupted or double-updated, and `torch.func.jvp` sees no mutation of a
captured tensor. In train mode BatchNorm normalises with batch statistics, so the clones change
no value, only where the (discarded) running-stat update lands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def params_of(module: nn.Module) -> Params:
    """The module's trainable parameters as a dict of detached tensors (shared storage)."""
    return {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}


def buffers_of(module: nn.Module) -> Params:
    """The module's buffers (BatchNorm running stats), shared storage."""
    return dict(module.named_buffers())


def forward(
    module: nn.Module, params: Params, buffers: Params, x: Tensor, *, update_stats: bool = False
) -> Tensor:
    """`module(x)` with `params` and `buffers` swapped in.

    update_stats: True only for a real training pass; otherwise buffers are cloned first, so
    running statistics are left as they are (see the module docstring).
    """
    if not update_stats:
        buffers = {k: v.clone() for k, v in buffers.items()}
    return functional_call(module, (params, buffers), (x,), strict=False)


def at_least_fp32(t: Tensor) -> Tensor:
    """`t` in fp32 when it is fp16 / bf16 (autocast output); fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_example_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each example, (B,), computed in at least fp32."""
    return F.cross_entropy(at_least_fp32(logits), y, reduction="none")


PerExampleLoss = Callable[[Tensor, Tensor], Tensor]  # (logits (B, C), labels (B,)) -> (B,)
# The per-example loss l of every level (cross-entropy unless a user gave their own to
# lfm.Reweighter): one switch, so each stage, hypergradient backend and method reads the same l.
_LOSS: ContextVar[PerExampleLoss] = ContextVar("per_example_loss", default=per_example_ce)


@contextmanager
def per_example_loss(fn: PerExampleLoss | None) -> Iterator[None]:
    """Within the block, `example_losses` and `losses` use `fn` (None: cross-entropy)."""
    token = _LOSS.set(per_example_ce if fn is None else fn)
    try:
        yield
    finally:
        _LOSS.reset(token)


def example_losses(logits: Tensor, y: Tensor) -> Tensor:
    """The per-example loss in force (cross-entropy by default), (B,), in at least fp32."""
    return _LOSS.get()(at_least_fp32(logits), y)


def losses(
    module: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, **kw
) -> Tensor:
    """Per-example losses l_i(params), (B,) (cross-entropy unless `per_example_loss` says)."""
    return example_losses(forward(module, params, buffers, x, **kw), y)


def leaves(params: Params) -> Params:
    """Detached copies of `params` that require grad: the inputs of a stage's autograd graph."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def dot(a: Params, b: Params) -> Tensor:
    """Sum over entries of a . b, a 0-d tensor."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: Params) -> Tensor:
    """Euclidean norm of a parameter dict seen as one vector (half precision promoted to fp32)."""
    half = (torch.float16, torch.bfloat16)
    sq = [((v.float() if v.dtype in half else v) ** 2).sum() for v in a.values()]
    return torch.sqrt(torch.stack(sq).sum())
