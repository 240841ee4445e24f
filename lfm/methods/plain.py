"""Plain training baselines: one learner, one per-example loss, mean over the batch.

`ce`, `focal` and `cb` train on the (noisy, imbalanced) training set. The two honest
controls the paper leaves out, since every meta-method also sees the clean validation set:
`ce-clean` trains on the clean validation set alone, `ce-all` on train + clean set.

Under torchrun each rank's loss is its part's sum over the GLOBAL batch size, and the summed
gradients (one all-reduce) are the global batch mean's, so N processes step as one does.
`ctx.compile` compiles the forward only (`self.forward`); `self.model` stays the plain module,
so checkpoints, evaluation and the optimizer see the same parameters and state-dict keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lfm.data.types import Batch
from lfm.engine.functional import at_least_fp32
from lfm.errors import LFMError
from lfm.losses import LOSSES
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import OPTIONS, Opt, check_options, register_options
from lfm.train import distributed
from lfm.train.optim import set_lr


def descend(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    step: int,
    clip: float | None,
    reduce: bool,
) -> float:
    """One optimizer step on `loss` (this rank's share when `reduce`); returns the global loss.

    A non-finite loss stops the run with the step named. With `reduce`, the ranks' gradient
    shares are summed, which is the gradient of the global batch's loss.
    """
    if not torch.isfinite(loss):
        raise LFMError(
            f"the training loss became {loss.item()} at step {step}",
            "lower --lr, or check the data for NaN values",
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if reduce:
        params = [p for p in model.parameters() if p.grad is not None]
        *grads, loss = distributed.all_reduce_sum([p.grad for p in params] + [loss.detach()])
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


class PlainMethod(Method):
    """Minimise the mean of a per-example loss with the run's optimizer."""

    compiles = True

    def __init__(self, loss: str = "ce", train_on: str = "train", name: str = "ce"):
        self.loss_name, self.train_on, self.name = loss, train_on, name

    def setup(self, ctx: Context) -> None:
        """One model, its optimizer, and the loss built from the training class counts."""
        opts = check_options(self.name, dict(ctx.options), OPTIONS[self.name])
        counts = ctx.bundle.train.class_counts(ctx.bundle.num_classes)
        self.loss_fn = LOSSES.create(self.loss_name, counts, **opts)
        self.model = ctx.learner("W1")
        self.forward = torch.compile(self.model) if ctx.compile else self.model
        self.opt = ctx.torch_optimizer("W1", self.model)
        self.clip = ctx.optim.grad_clip

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One gradient step on the batch's mean loss."""
        set_lr(self.opt, ctx.learner_lr("W1"))
        logits = self.forward(ctx.bundle.inputs(batch.x, train=True))
        loss = distributed.part_of(batch).mean(self.loss_fn(at_least_fp32(logits), batch.y))
        return {
            "loss": descend(self.model, self.opt, loss, ctx.step, self.clip, distributed.active())
        }

    def models(self) -> dict[str, nn.Module]:
        """The single learner, named `model`."""
        return {"model": self.model}

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore model and optimizer state."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


METHODS.register("ce", "cross-entropy on the training set")(
    lambda: PlainMethod("ce", "train", "ce")
)
METHODS.register("focal", "focal loss on the training set")(
    lambda: PlainMethod("focal", "train", "focal")
)
METHODS.register("cb", "class-balanced loss on the training set")(
    lambda: PlainMethod("cb", "train", "cb")
)
METHODS.register("ce-clean", "cross-entropy on the clean validation set alone")(
    lambda: PlainMethod("ce", "val", "ce-clean")
)
METHODS.register("ce-all", "cross-entropy on train + clean validation set")(
    lambda: PlainMethod("ce", "train+val", "ce-all")
)

# The loss options (lfm.losses), each with the range its formula allows: a negative focal
# gamma up-weights the easy examples, and cb's beta = 1 divides by zero.
_GAMMA = Opt("float", 2.0, lo=0.0)
register_options("ce", {})
register_options("ce-clean", {})
register_options("ce-all", {})
register_options("focal", {"gamma": _GAMMA})
register_options(
    "cb",
    {
        "beta": Opt("float", 0.9999, lo=0.0, hi=1.0, hi_open=True),
        "base": Opt("choice", "ce", choices=("ce", "focal")),
        "gamma": _GAMMA,
    },
)
