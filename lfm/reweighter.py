"""`lfm.Reweighter`: learning-from-mistakes data reweighting inside your own training loop.

You keep your `nn.Module`, your `torch.optim` optimizer, your `DataLoader` and your loop; each
call of `step(x, y, idx)` runs one iteration of the chosen method on that batch (for LFM-DR:
W1 learns, W2 relearns on examples weighted by W1's validation mistakes, b, V and r learn from
W2's validation loss) and updates your model and optimizer as their own step would. The
meta-reweighting baselines run through the same object: change `method="lfm"` to `"mwnet"`,
`"l2rw"`, `"small-loss"` or `"ce"` to compare.

The command line is a client of this object: `lfm.train.Trainer` builds one from its config and
calls the same `step` (see `Reweighter.from_context`).

What the virtual (unrolled) step mirrors: `torch.optim.SGD` (momentum, Nesterov, weight decay),
`torch.optim.Adam` and `torch.optim.AdamW`, one parameter group each; anything else is an error
that names these. Your optimizer's state is read before each step and written back after it, so
its `state_dict()` and a `torch.optim.lr_scheduler` on it work as usual.

Data parallel (torchrun): each process passes its own part of the global batch (e.g. from a
`DistributedSampler`); the parts are the global batch in rank order, the gradients and
hypergradients are summed over processes and every per-batch normalisation is over the global
batch, so N processes learn what one process does on the concatenated batch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm.data.types import DataBundle, Split, Stream
from lfm.engine.functional import PerExampleLoss, per_example_loss
from lfm.engine.virtual import VirtualOptimizer, read_state, virtual_from_torch, write_back
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.train import distributed
from lfm.train.optim import OptimConfig

API_METHODS = ("lfm", "l2rw", "mwnet", "small-loss", "ce")


def _reset(module: nn.Module) -> nn.Module:
    """`module` with freshly initialised parameters (every submodule's reset_parameters)."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class _UserLearners:
    """The user's modules and optimizers, handed to a method through its Context."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        w2: nn.Module | None,
        w2_optimizer: torch.optim.Optimizer | None,
        encoder: nn.Module | None,
        grad_clip: float | None,
    ):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self._w2, self._w2_opt, self.encoder = w2, w2_optimizer, encoder
        self.pairs: list[tuple[VirtualOptimizer, torch.optim.Optimizer, nn.Module]] = []

    def _w2_pair(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self._w2 is None:  # W2: a deep copy of W1 with an optimizer of the same kind
            self._w2 = copy.deepcopy(self.model)
        if self._w2_opt is None:
            group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            self._w2_opt = type(self.optimizer)(self._w2.parameters(), **group)
        return self._w2, self._w2_opt

    def module(self, role: str) -> nn.Module:
        if role == "W1":
            return self.model
        if role == "W2":
            return self._w2_pair()[0]
        if self.encoder is not None:
            return self.encoder
        return _reset(copy.deepcopy(self.model))  # V: the learner's architecture, fresh

    def optimizer_of(self, role: str) -> torch.optim.Optimizer:
        return self.optimizer if role == "W1" else self._w2_pair()[1]

    def virtual(self, role: str, module: nn.Module, who: str) -> VirtualOptimizer:
        opt = self.optimizer_of(role)
        v = virtual_from_torch(opt, module, who, self.grad_clip)
        self.pairs.append((v, opt, module))
        return v

    def torch_optimizer(self, role: str, module: nn.Module) -> torch.optim.Optimizer:
        return self.optimizer_of(role)

    def lr(self, role: str) -> float:
        return float(self.optimizer_of(role).param_groups[0]["lr"])

    def read(self) -> None:
        """The user's optimizers are the truth: take their state before a step."""
        for v, opt, module in self.pairs:
            read_state(v, opt, module)

    def write(self) -> None:
        """Leave in the user's optimizers the state their own step would have left."""
        for v, opt, module in self.pairs:
            write_back(v, opt, module)


def _validation_tensors(val_data: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """(x, y) of the whole validation set, from a DataLoader / iterable of batches or tensors."""
    if isinstance(val_data, tuple | list) and len(val_data) == 2 and torch.is_tensor(val_data[0]):
        x, y = val_data
    elif isinstance(val_data, Iterable):
        xs, ys = [], []
        for item in val_data:
            if not (isinstance(item, tuple | list) and len(item) >= 2):
                raise LFMError(
                    "val_data yields something other than (x, y) batches",
                    "pass a DataLoader over (x, y) pairs, or a tuple of tensors (x, y)",
                )
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        if not xs:
            raise LFMError("val_data is empty", "give the clean validation examples")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise LFMError(
            f"val_data is a {type(val_data).__name__}",
            "pass a DataLoader over (x, y) pairs, or a tuple of tensors (x, y)",
        )
    if len(x) != len(y) or len(x) == 0:
        raise LFMError(
            f"val_data has {len(x)} inputs and {len(y)} labels", "give one label per example"
        )
    if y.dtype != torch.int64 or y.ndim != 1:
        raise LFMError(
            f"validation labels are {y.dtype} of shape {tuple(y.shape)}",
            "give class indices as a 1-D int64 tensor",
        )
    return x.to(device), y.to(device)


def _index_split(n: int) -> Split:
    """A training split of n examples that holds only positions (the user holds the data)."""
    idx = torch.arange(n)
    return Split(torch.zeros(n, 0), torch.zeros(n, dtype=torch.int64), idx)


class Reweighter:
    """Per-example reweighting of your own model's training, one batch at a time.

    Parameters
    ----------
    model : nn.Module
        Your classifier (W1 for LFM-DR; the learner for the other methods). It returns logits
        (B, C). Any module: no `body` / `head` needed.
    optimizer : torch.optim.Optimizer
        Your optimizer over `model.parameters()`: SGD (momentum, Nesterov, weight decay), Adam
        or AdamW, one parameter group. Its learning rate is read at every step (schedulers work).
    num_train : int
        Examples in your training set; `idx` in `step` are positions in 0..num_train-1.
    val_data : DataLoader | tuple[Tensor, Tensor]
        The small clean validation set (meta set) that the meta-methods learn from, as batches
        of (x, y) or as two tensors; it is held in memory on the model's device.
    method : str
        "lfm" (LFM-DR), "mwnet", "l2rw", "small-loss" or "ce" (no reweighting, for comparison).
    loss : callable, optional
        Your per-example loss, (logits (B, C), labels (B,)) -> (B,), written with torch
        operations (it is differentiated twice, and forward-mode by the exact backend); every
        level uses it, training and validation. Default: cross-entropy.
    w2, w2_optimizer : optional
        LFM-DR's second learner W2 and its optimizer (default: a deep copy of `model` with an
        optimizer of the same kind and settings).
    encoder : nn.Module, optional
        LFM-DR's encoder V, any module mapping inputs to (B, K) embeddings; it is trained from
        W2's validation loss (default: a freshly initialised copy of `model`).
    val_batch_size : int
        Validation examples per step (default 100, or the whole set if smaller).
    grad_clip : float, optional
        Clip the learners' gradient norm to this before each step (the unrolled step includes it).
    seed : int
        Seeds the validation batch order.
    **options
        The method's options: for "lfm" the `LFMConfig` fields and `preset` (default the
        recommended variant, `lfm.methods.lfm_dr.RECOMMENDED`); for "mwnet", "l2rw",
        "small-loss" those of `lfm train --opt` (e.g. `rho=0.3`).

    Attributes
    ----------
    weights : Tensor
        (num_train,) each example's learned weight (LFM-DR's b; the other methods' last weight).
    a : Tensor
        (num_train,) LFM-DR's last stage-2 weight a_i of each example (NaN if never seen).

    Example
    -------
    >>> rw = lfm.Reweighter(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    ...                     num_train=len(train_set), val_data=(x_val, y_val))
    >>> for x, y, idx in loader:             # lfm.data.IndexedDataset adds idx to any Dataset
    ...     logs = rw.step(x, y, idx)        # {'L_val': ..., 'a_mean': ..., ...}
    >>> rw.suspects(20)                      # the 20 most suspect training examples
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_train: int,
        val_data: Any,
        method: str = "lfm",
        *,
        loss: PerExampleLoss | None = None,
        w2: nn.Module | None = None,
        w2_optimizer: torch.optim.Optimizer | None = None,
        encoder: nn.Module | None = None,
        val_batch_size: int = 100,
        grad_clip: float | None = None,
        seed: int = 0,
        **options: Any,
    ):
        if callable(model) and not isinstance(model, nn.Module):
            raise LFMError("model is not an nn.Module", "pass the module itself, not a factory")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise LFMError(
                f"optimizer is a {type(optimizer).__name__}",
                "pass a torch.optim optimizer built over model.parameters()",
            )
        if method not in API_METHODS:
            raise LFMError(f"method {method!r} is not offered here", f"use one of {API_METHODS}")
        if int(num_train) < 1:
            raise LFMError(f"num_train is {num_train}", "pass the size of your training set")
        device = next(model.parameters()).device
        x_val, y_val = _validation_tensors(val_data, device)
        with torch.no_grad():
            was = model.training
            out = model.eval()(x_val[:2])
            model.train(was)
        if out.ndim != 2:
            raise LFMError(
                f"the model returns shape {tuple(out.shape)} for a batch of 2",
                "return logits of shape (batch, classes)",
            )
        num_classes = int(out.shape[1])
        if int(y_val.max()) >= num_classes:
            raise LFMError(
                f"validation labels reach {int(y_val.max())} but the model has {num_classes} "
                "outputs",
                "give the model one output per class",
            )
        if method == "lfm" and options.get("encoder") in ("head", "shared"):
            raise LFMError(
                f"encoder {options['encoder']!r} is not offered by Reweighter yet",
                "use encoder='full' (the default)",
            )
        if method == "lfm" and "variant" not in options:  # a variant brings its own preset
            options.setdefault("preset", _recommended())
        source = _UserLearners(model, optimizer, w2, w2_optimizer, encoder, grad_clip)
        val = Split(x_val, y_val, torch.arange(len(y_val)))
        bundle = DataBundle(
            "user",
            num_classes,
            tuple(x_val.shape[1:]),
            _index_split(int(num_train)),
            val,
            val.subset(torch.arange(0)),
            prepare=lambda x, train: x,  # the user's loader prepares the inputs
        )
        ctx = Context(
            bundle=bundle,
            device=device,
            new_model=lambda: _reset(copy.deepcopy(model)),
            val_stream=Stream(val, min(val_batch_size, len(val)), device=device, seed=seed + 1),
            steps_per_epoch=1,
            total_steps=0,
            lr_factor=lambda step: 1.0,
            optim=OptimConfig(grad_clip=grad_clip),
            seed=seed,
            options=options,
            source=source,
        )
        m = METHODS.create(method)
        m.setup(ctx)
        self._init(m, ctx, loss)
        self.sync()

    def _init(self, method: Method, ctx: Context, loss: PerExampleLoss | None = None) -> None:
        # the user's learners and optimizers, when they brought them (None: the Trainer's)
        self.method, self.ctx, self.loss, self.source = method, ctx, loss, ctx.source

    @classmethod
    def from_context(cls, method: Method, ctx: Context) -> Reweighter:
        """A Reweighter over a method already set up on `ctx` (what `lfm.train.Trainer` uses)."""
        self = cls.__new__(cls)
        self._init(method, ctx)
        return self

    def sync(self) -> None:
        """Under torchrun, every process takes rank 0's state (initial W2, V, b, r, optimizer
        states), so all start from the same point; nothing happens in a plain run."""
        if not distributed.active():
            return
        state = self.method.state_dict()
        distributed.broadcast_tensors(distributed.tensors_in(state))
        if not distributed.is_main():
            self.method.load_state_dict(state)
        if self.source is not None:
            self.source.write()

    # -- the step ------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> dict[str, float]:
        """One iteration of the method on a training batch; updates your model and optimizer.

        Parameters
        ----------
        x : Tensor
            (B, ...) inputs, as your model takes them.
        y : Tensor
            (B,) int64 labels (possibly noisy).
        idx : Tensor
            (B,) each example's position in the training set (0..num_train-1), so that its
            learned weight persists across epochs.

        Returns
        -------
        dict[str, float]
            Scalars worth logging (losses, mean weights, hypergradient norms).
        """
        n = len(self.ctx.bundle.train)
        if len(x) != len(y) or len(y) != len(idx):
            raise LFMError(
                f"batch sizes differ: x {len(x)}, y {len(y)}, idx {len(idx)}",
                "pass one label and one index per example",
            )
        if self.source is not None and len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise LFMError(
                f"idx holds {int(idx.min())}..{int(idx.max())}, outside 0..{n - 1}",
                "pass positions in the training set (lfm.data.IndexedDataset adds them)",
            )
        dev = self.ctx.device
        batch = distributed.assemble(x.to(dev), y.to(dev), idx.to(dev))
        if self.source is not None:
            # mutant reweighter-read-skipped: drop | api
            self.source.read()
        with per_example_loss(self.loss):
            logs = self.method.step(batch, self.ctx)
        if self.source is not None:
            # mutant reweighter-write-back-skipped: drop | api
            self.source.write()
        self.ctx.step += 1
        return logs

    # -- what it learned -----------------------------------------------------------------------
    def per_example(self) -> dict[str, np.ndarray]:
        """Every per-example array the method keeps (e.g. LFM-DR's `b` and `a`)."""
        return self.method.per_example()

    @property
    def signal(self) -> str:
        """The per-example array that ranks suspects for this method and variant (low =
        suspect)."""
        if self.method.name == "lfm":  # by variant: the faithful b ranks mislabelled ones *up*
            from lfm.methods.lfm_dr import SIGNAL_KEY

            return SIGNAL_KEY[self.method.cfg.variant]
        return "weight"  # l2rw, mwnet, small-loss

    @property
    def weights(self) -> Tensor:
        """(num_train,) learned weight of each example (LFM-DR: b)."""
        pe = self.per_example()
        key = "b" if "b" in pe else "weight"
        if key not in pe:
            return torch.ones(len(self.ctx.bundle.train))
        return torch.as_tensor(pe[key])

    @property
    def a(self) -> Tensor:
        """(num_train,) LFM-DR's last stage-2 weight of each example (NaN where never seen)."""
        pe = self.per_example()
        if "a" not in pe:
            raise LFMError(f"method {self.method.name!r} has no stage-2 weights a", "use lfm")
        return torch.as_tensor(pe["a"])

    def suspects(self, k: int = 10) -> Tensor:
        """Positions of the k training examples the method weights lowest (unseen ones last).

        Example
        -------
        >>> rw.suspects(5)
        tensor([412,  87, 903,  15, 230])
        """
        pe = self.per_example()
        if self.signal not in pe:
            raise LFMError(f"method {self.method.name!r} keeps no per-example weights", "use lfm")
        w = torch.as_tensor(np.asarray(pe[self.signal], dtype=np.float64))
        w = torch.where(torch.isnan(w), torch.inf, w)
        return torch.argsort(w, stable=True)[:k]

    def models(self) -> dict[str, nn.Module]:
        """The learners by name ({"W1": .., "W2": ..} for LFM-DR; {"model": ..} otherwise)."""
        return self.method.models()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: the method (b, r, V and their optimizers, W2, ...), the step,
        and the validation order. Your model and optimizer are saved by you, as usual."""
        return {
            "method": self.method.state_dict(),
            "step": self.ctx.step,
            "val_stream": self.ctx.val_stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output (after constructing with the same arguments)."""
        self.method.load_state_dict(state["method"])
        self.ctx.step = int(state["step"])
        self.ctx.val_stream.load_state_dict(state["val_stream"])
        if self.source is not None:
            self.source.write()  # the restored virtual state is the optimizers' state


def _recommended() -> str:
    from lfm.methods.lfm_dr import RECOMMENDED

    return RECOMMENDED
