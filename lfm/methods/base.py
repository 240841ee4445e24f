"""What every training method provides, so one trainer loop runs them all.

A method owns its learners and their optimizers; the trainer owns the data order, the
schedule, evaluation, checkpoints and the results file. Methods get their learners, their
optimizers and learning rates from the `Context`: built from the run's config by the trainer,
or taken from the user's own module and `torch.optim` optimizer (`lfm.Reweighter`), so both
paths run the same method code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lfm.data.types import Batch, DataBundle, Stream
from lfm.engine.virtual import VirtualOptimizer, virtual_from_config
from lfm.errors import LFMError
from lfm.registry import Registry
from lfm.train.optim import OptimConfig, make_optimizer


class LearnerSource(Protocol):
    """Where learners and their optimizers come from when the user brings their own."""

    def module(self, role: str) -> nn.Module: ...  # "W1" (the model), "W2", "V"

    def virtual(self, role: str, module: nn.Module, who: str) -> VirtualOptimizer: ...

    def torch_optimizer(self, role: str, module: nn.Module) -> torch.optim.Optimizer: ...

    def lr(self, role: str) -> float: ...


@dataclass
class Context:
    """Everything a method may read while it trains; built once per run by the trainer."""

    bundle: DataBundle
    device: torch.device
    new_model: Callable[[], nn.Module]  # a fresh, initialised classifier on `device`
    val_stream: Stream  # endless batches of the clean validation set
    steps_per_epoch: int
    total_steps: int
    lr_factor: Callable[[int], float]  # schedule multiplier at a global step
    optim: OptimConfig  # the learners' optimizer settings
    seed: int = 0
    step: int = 0  # global step of the batch being processed
    epoch: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings
    precision: str = "fp32"  # fp32 | bf16: the trainer runs `step` under bf16 autocast
    compile: bool = False  # plain methods: torch.compile the model's forward
    source: LearnerSource | None = None  # the user's own learners and optimizers (lfm.Reweighter)

    def __post_init__(self) -> None:
        # A module here would be *called* as the factory, failing with `forward() missing 'x'`.
        if isinstance(self.new_model, nn.Module):
            name = type(self.new_model).__name__
            raise LFMError(
                f"Context.new_model is a {name} instance, but a function that builds a fresh "
                "model is expected (each learner needs its own)",
                f"pass new_model=lambda: {name}(...).to(device) instead of the instance",
            )

    def lr_at(self, base_lr: float) -> float:
        """`base_lr` under the run's schedule at the current step."""
        return base_lr * self.lr_factor(self.step)

    def learner(self, role: str = "W1") -> nn.Module:
        """The module playing `role`: "W1" (or a method's only learner), "W2", or "V" (a fresh
        network of the learner's architecture for the encoder)."""
        return self.new_model() if self.source is None else self.source.module(role)

    def virtual_optimizer(
        self, role: str, module: nn.Module, who: str = "learner"
    ) -> VirtualOptimizer:
        """The pure-function optimizer whose step is `module`'s real update."""
        if self.source is None:
            return virtual_from_config(self.optim, who)
        return self.source.virtual(role, module, who)

    def torch_optimizer(self, role: str, module: nn.Module) -> torch.optim.Optimizer:
        """A `torch.optim` optimizer over `module` (plain methods step it themselves)."""
        if self.source is None:
            return make_optimizer(module.parameters(), self.optim)
        return self.source.torch_optimizer(role, module)

    def learner_lr(self, role: str = "W1") -> float:
        """The learning rate of `role`'s step now: the run's schedule, or the user's optimizer
        (so a user's `torch.optim.lr_scheduler` is followed)."""
        return self.lr_at(self.optim.lr) if self.source is None else self.source.lr(role)


class Method:
    """One way of training a classifier (plain CE, focal, LFM-DR, ...)."""

    name: str = "method"
    train_on: str = (
        "train"  # which data the trainer feeds: train, val (clean set alone) or train+val
    )
    compiles: bool = False  # honours ctx.compile (meta-methods call the model via torch.func)
    command: str = "an lfm run"  # what its checkpoints are called in error messages
    checkpoint_folder: str = "checkpoints"  # under --out (searches keep theirs apart)
    # An epoch is one pass over the TRAINING set (so ce-clean gets as many steps as ce);
    # True: one pass over the method's own split (an evaluation network on train + val).
    epoch_is_a_pass: bool = False

    @property
    def label(self) -> str:
        """The name results and tables show (a variant, where the method has one)."""
        return self.name

    def setup(self, ctx: Context) -> None:
        """Create learners, optimizers and per-example state."""
        raise NotImplementedError

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One training iteration on `batch`; returns scalars worth logging (e.g. loss)."""
        raise NotImplementedError

    def models(self) -> dict[str, nn.Module]:
        """The learners to evaluate, by the name the results use (e.g. {"W1": .., "W2": ..})."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, numbers, nested dicts only)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        raise NotImplementedError

    def per_example(self) -> dict[str, np.ndarray]:
        """Per-training-example arrays worth saving (e.g. learned weights `b`, last `a`)."""
        return {}

    def on_epoch_end(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called after each epoch (e.g. to snapshot weights)."""

    def identity(self) -> dict[str, dict[str, Any]]:
        """Settings a checkpoint must have been made with to be continued, by section (a
        difference is refused naming the field); {} checks only the run's own settings."""
        return {}

    def results(self) -> dict[str, Any]:
        """What the method adds to results.json under its own key (e.g. a searched genotype)."""
        return {}


METHODS: Registry[Method] = Registry("method")
