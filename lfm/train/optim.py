"""Optimizers and learning-rate schedules, with the paper's settings as named presets."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lfm.errors import LFMError, shown

SCHEDULES = ("constant", "step", "cosine")


@dataclass
class OptimConfig:
    """How the learners' weights are optimised."""

    optimizer: str = "sgd"  # sgd (every paper protocol) or adam (the MNIST-1D reference)
    lr: float = 0.05  # safe for the small built-in nets; the paper's presets set their own
    momentum: float = 0.9  # all SGD protocols in the paper use 0.9
    nesterov: bool = False  # the DR protocols use plain momentum
    weight_decay: float = 5e-4  # the Tables VI-VIII protocol
    schedule: str = "cosine"  # needs no milestones, so it fits any number of epochs
    milestones: tuple[float, ...] = ()  # epochs at which a `step` schedule multiplies lr by gamma
    gamma: float = 0.1  # lr /10 at each milestone
    warmup_epochs: float = 0.0  # linear warm-up, useful for large batches
    grad_clip: float | None = None  # DARTS clips weight gradients at 5

    def validate(self) -> None:
        """Raise LFMError naming the first bad field."""
        if self.optimizer not in ("sgd", "adam"):
            raise LFMError(f"optim.optimizer {shown(self.optimizer)} is unknown", "use sgd or adam")
        if not self.lr > 0:
            raise LFMError(f"optim.lr must be > 0, got {self.lr}", "pass a positive learning rate")
        if not 0 <= self.momentum < 1:
            raise LFMError(f"optim.momentum must be in [0, 1), got {self.momentum}", "use e.g. 0.9")
        if self.weight_decay < 0:
            raise LFMError(
                f"optim.weight_decay must be >= 0, got {self.weight_decay}", "use e.g. 5e-4"
            )
        if self.schedule not in SCHEDULES:
            raise LFMError(
                f"optim.schedule {shown(self.schedule)} is unknown", f"use one of {SCHEDULES}"
            )
        if not 0 < self.gamma <= 1:
            raise LFMError(f"optim.gamma must be in (0, 1], got {self.gamma}", "use e.g. 0.1")
        if self.warmup_epochs < 0:
            raise LFMError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}", "use 0")
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise LFMError(
                f"optim.milestones must be increasing epochs >= 0, got {self.milestones}",
                "write them in order, e.g. 80,90",
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise LFMError(f"optim.grad_clip must be > 0, got {self.grad_clip}", "omit it or use 5")


PRESETS: dict[str, OptimConfig] = {
    # Tables VI-VIII (ResNet-32 / WRN-28-10, 100 epochs): SGD 0.1, momentum 0.9, wd 5e-4,
    # lr /10 at epochs 80 and 90.
    "dr-paper": OptimConfig("sgd", 0.1, 0.9, False, 5e-4, "step", (80, 90), 0.1),
    # DARTS weights: SGD 0.025 cosine, momentum 0.9, wd 3e-4, clip 5.
    "darts": OptimConfig("sgd", 0.025, 0.9, False, 3e-4, "cosine", (), 0.1, 0.0, 5.0),
    # SPEC.md section 4 CPU protocol for MNIST-1D: SGD momentum 0.9, lr 0.05, cosine.
    "cpu-sgd": OptimConfig("sgd", 0.05, 0.9, False, 5e-4, "cosine", (), 0.1),
    # The MNIST-1D reference recipe: Adam 1e-2 with cosine decay.
    "adam": OptimConfig("adam", 1e-2, 0.9, False, 0.0, "cosine", (), 0.1),
}


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The torch optimizer `cfg` names, over `params`."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def lr_factor_fn(
    cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> Callable[[int], float]:
    """A pure function step -> lr multiplier, so that a resumed run sees the same schedule."""
    warm = cfg.warmup_epochs * steps_per_epoch
    bounds = sorted(m * steps_per_epoch for m in cfg.milestones)

    def factor(step: int) -> float:
        f = 1.0
        if cfg.schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        elif cfg.schedule == "step":
            f = cfg.gamma ** sum(step >= b for b in bounds)
        if warm > 0 and step < warm:
            f *= (step + 1) / warm
        return f

    return factor


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr
