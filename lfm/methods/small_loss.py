"""Small-loss selection: train on the (1 - rho) fraction of each batch with the lowest loss.

The natural control for any method that wins by filtering high-loss examples (SPEC.md
section 4): co-teaching's selection rule (Han et al., NeurIPS 2018) with one network, so it costs
one forward and one backward per step, like plain cross-entropy.

Options
-------
rho : float in [0, 1) or "auto" (default "auto")
    The fraction of each batch dropped. With a number, rho rises linearly from 0 over the first
    ``ramp`` fraction of training (co-teaching's schedule; its T_k = 10 of 200 epochs is 0.05),
    because an untrained network's losses say nothing yet.
ramp : float (default 0.1)
    The fraction of total steps over which a given rho ramps up.
warmup : int (default 1)
    With ``rho=auto``: epochs of plain CE (nothing dropped) before rho is estimated.
quantile : float (default 0.95)
    With ``rho=auto``: at the end of the warm-up, rho = the fraction of training examples whose
    loss exceeds this quantile of the clean validation set's losses under the current model.
    A clean example should rarely lose more than nearly every clean validation example, a
    mislabelled one usually does; with clean data the estimate is close to 0 (the training
    losses are lower than the validation ones) and little is dropped.
max_rho : float (default 0.8)
    The estimate is capped here, so a bad warm-up cannot discard almost all data.

Data parallel (torchrun): the kept set is chosen over the GLOBAL batch's losses (gathered), and
each rank's loss is its kept part's sum over the global number kept, gradients summed over ranks.

``per_example()['weight']`` is the fraction of the example's visits on which it was kept (NaN if
never seen); ``rho`` (a 0-d array) is the final drop rate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from lfm.data.types import Batch, iterate_batches
from lfm.engine.functional import example_losses
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import Opt, check_method_options, register_options
from lfm.methods.plain import descend
from lfm.train import distributed
from lfm.train.optim import set_lr


def keep_smallest(loss: torch.Tensor, rho: float) -> torch.Tensor:
    """(B,) bool mask of the ceil((1 - rho) * B) smallest losses (at least one).

    Example
    -------
    >>> keep_smallest(torch.tensor([3.0, 1.0, 2.0, 0.5]), rho=0.5)
    tensor([False,  True, False,  True])
    """
    k = max(1, math.ceil((1.0 - rho) * len(loss) - 1e-9))
    mask = torch.zeros_like(loss, dtype=torch.bool)
    # mutant small-loss-keeps-largest: `largest=False` -> `largest=True`
    #   | meta_methods:small_loss behaviour:mislabelled
    mask[torch.topk(loss, k, largest=False).indices] = True
    return mask


def estimate_noise_rate(
    train_losses: torch.Tensor, val_losses: torch.Tensor, quantile: float
) -> float:
    """Fraction of training losses above the `quantile` of the clean validation losses.

    Example
    -------
    >>> estimate_noise_rate(torch.tensor([0.1, 0.2, 5.0, 6.0]), torch.tensor([0.1, 0.3, 0.5]), 1.0)
    0.5
    """
    threshold = torch.quantile(val_losses.double(), quantile)
    return float((train_losses.double() > threshold).double().mean())


@torch.no_grad()
def _split_losses(model: nn.Module, ctx: Context, split) -> torch.Tensor:
    """Per-example CE of `model` on a whole split, in eval mode (no augmentation)."""
    was = model.training
    model.eval()
    out = [
        example_losses(model(ctx.bundle.inputs(b.x, train=False)), b.y).cpu()
        for b in iterate_batches(split, 500, device=ctx.device, shuffle=False)
    ]
    model.train(was)
    return torch.cat(out)


class SmallLoss(Method):
    """Cross-entropy on the lowest-loss (1 - rho) fraction of each batch."""

    name = "small-loss"

    def setup(self, ctx: Context) -> None:
        """One model, its optimizer, and the keep counters."""
        self.opts = check_method_options(self.name, ctx.options)
        rho = self.opts["rho"]
        self.auto = rho == "auto"
        self.rho_target = None if self.auto else float(rho)
        self.model = ctx.learner("W1")
        self.opt = ctx.torch_optimizer("W1", self.model)
        self.clip = ctx.optim.grad_clip
        n = len(ctx.bundle.train)
        # float32 whatever the default dtype: counters are records, saved in one dtype
        self.kept = torch.zeros(n, dtype=torch.float32)
        self.seen = torch.zeros(n, dtype=torch.float32)

    def rho_at(self, ctx: Context) -> float:
        """The drop rate of the current step."""
        if self.rho_target is None:  # auto, still warming up
            return 0.0
        if self.auto:
            return self.rho_target
        ramp = float(self.opts["ramp"]) * ctx.total_steps
        return self.rho_target * (min(1.0, ctx.step / ramp) if ramp > 0 else 1.0)

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One step on the mean loss of the kept examples."""
        set_lr(self.opt, ctx.learner_lr("W1"))
        rho = self.rho_at(ctx)
        loss_i = example_losses(self.model(ctx.bundle.inputs(batch.x, train=True)), batch.y)
        part = distributed.part_of(batch)
        keep_all = keep_smallest(part.gather(loss_i.detach()), rho)  # over the global batch
        keep = part.local(keep_all)
        loss = loss_i[keep].sum() / keep_all.sum() if part.split else loss_i[keep].mean()
        # the ranks' shares add up to the global kept mean's gradient
        loss_value = descend(self.model, self.opt, loss, ctx.step, self.clip, part.split)
        idx = (batch.idx if batch.whole is None else batch.whole).cpu()
        self.seen.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float32))
        self.kept.index_add_(0, idx, keep_all.float().cpu())
        return {"loss": loss_value, "rho": rho}

    def on_epoch_end(self, ctx: Context) -> None:
        """With rho=auto, estimate the noise rate once the warm-up is over."""
        if self.auto and self.rho_target is None and ctx.epoch >= int(self.opts["warmup"]):
            est = estimate_noise_rate(
                _split_losses(self.model, ctx, ctx.bundle.train),
                _split_losses(self.model, ctx, ctx.bundle.val),
                float(self.opts["quantile"]),
            )
            self.rho_target = min(est, float(self.opts["max_rho"]))

    def models(self) -> dict[str, nn.Module]:
        """The single learner, named `model`."""
        return {"model": self.model}

    def per_example(self) -> dict[str, np.ndarray]:
        """`weight` = fraction of visits kept; `seen` = visits; `rho` = the final drop rate."""
        frac = torch.where(self.seen > 0, self.kept / self.seen.clamp(min=1), float("nan"))
        rho = float("nan") if self.rho_target is None else self.rho_target
        return {"weight": frac.numpy(), "seen": self.seen.numpy(), "rho": np.asarray(rho)}

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, counters and the estimated rho."""
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "kept": self.kept,
            "seen": self.seen,
            "rho_target": self.rho_target,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.kept, self.seen = state["kept"], state["seen"]
        self.rho_target = state["rho_target"]


register_options(
    "small-loss",
    {
        "rho": Opt("float", "auto", lo=0.0, hi=1.0, hi_open=True, words=("auto",)),
        "ramp": Opt("float", 0.1, lo=0.0, hi=1.0),
        "warmup": Opt("int", 1, lo=0),
        "quantile": Opt("float", 0.95, lo=0.0, hi=1.0, lo_open=True),
        "max_rho": Opt("float", 0.8, lo=0.0, hi=1.0),
    },
)
METHODS.register(
    "small-loss", "keep the (1 - rho) lowest-loss fraction of each batch (rho=auto: estimated)"
)(SmallLoss)
