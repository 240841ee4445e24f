"""Per-example classification losses: cross-entropy, focal, class-balanced.

- Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
- Class-balanced loss: Cui et al., "Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019 (weight of class c = (1 - beta) / (1 - beta ** n_c), normalised to
  sum to the number of classes).

Every loss returns a vector (B,) so that methods can weight examples before reducing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lfm.errors import LFMError
from lfm.registry import Registry

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: Registry[PerExampleLoss] = Registry("loss")


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """(B,) focal loss -(1 - p_y)^gamma log p_y."""
    logp = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (B,)
    return -((1 - logp.exp()) ** gamma) * logp


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """(C,) weights from the effective number of samples, summing to C."""
    if not 0 <= beta < 1:
        raise LFMError(f"class-balanced beta must be in [0, 1), got {beta}", "use e.g. 0.9999")
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1 - beta) / (1 - beta**n)
    return (w / w.sum() * len(counts)).float()


@LOSSES.register("ce", "plain cross-entropy")
def make_ce(counts: Sequence[int]) -> PerExampleLoss:
    """Cross-entropy per example."""
    from lfm.engine.functional import example_losses

    return example_losses  # cross-entropy, or the per-example loss given to lfm.Reweighter


@LOSSES.register("focal", "focal loss (gamma, default 2)")
def make_focal(counts: Sequence[int], gamma: float = 2.0) -> PerExampleLoss:
    """Focal loss per example."""
    return lambda logits, y: focal_loss(logits, y, gamma)


@LOSSES.register("cb", "class-balanced cross-entropy (beta, default 0.9999)")
def make_cb(
    counts: Sequence[int], beta: float = 0.9999, base: str = "ce", gamma: float = 2.0
) -> PerExampleLoss:
    """Class-balanced CE (or focal, base='focal') with effective-number class weights."""
    w = class_balanced_weights(counts, beta)
    if base not in ("ce", "focal"):
        raise LFMError(f"class-balanced base loss {base!r} is unknown", "use ce or focal")

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per = (
            focal_loss(logits, y, gamma)
            if base == "focal"
            else F.cross_entropy(logits, y, reduction="none")
        )
        return w.to(logits.device, logits.dtype)[y] * per

    return loss
