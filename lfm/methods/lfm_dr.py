"""LFM data reweighting (LFM-DR): Algorithm 1 of Zhang et al. (IEEE Trans. AI, 2025) as a Method.

Two learners W1 and W2 (same architecture), an encoder V, a coefficient r_j per validation
example and a weight b_i per training example. Each `step` is one iteration of Algorithm 1
(`lfm.engine.trilevel`): W1 *learns* on mean_i w(b_i) l_i, W2 *relearns* on mean_i a_i l_i with
a_i = sigmoid(sum_j x_ij z_ij u_j r_j), and W2's validation loss after its step *validates*
b, V and r through one-step-unrolled hypergradients (exact jvp or finite differences).

Variants (`LFMConfig.variant`; they differ only in how b is driven, see SPEC.md section 1):

- `paper`        the faithful form: dL_val(W2')/db through u(W1'). Known perverse incentive:
                 W2's validation loss falls when W1 makes *more* validation mistakes
                 (larger u -> larger a -> larger W2 step), so b is pushed to make W1 worse.
- `authors-code` what the authors' public code runs (GitHub importZL/LFM,
                 `DR/lfm-dr-class_imbalance/dr-lfm-imbalance.py` at commit 0baf131): after
                 stage 1, W1's `.grad` holds its own clipped training gradient g1 (lines
                 302-305); `_hessian_vector_product1` (lines 391-416) gives (1/n) g1 . grad l_i
                 by a central difference at the old W1 (eps = 0.01/||g1||); it is *added* to b's
                 zeroed gradient (lines 353-365), clipped to norm 5 (line 367), and b is
                 *descended* by `optimizer_b` (lines 182-184: SGD lr 1e-2, momentum 0.9,
                 Nesterov, weight decay 5e-4 on all of b every step; cosine over the epochs to
                 1e-5, lines 188-189, 229). So b_i moves by -lr_b (1/n) g1 . grad l_i: examples
                 that agree with the batch gradient go *down* (b descends 1/2 ||g1(b)||^2), and
                 b never sees validation data. b is not clamped. Their b is per batch
                 *position* (`weight_b[:, i]`, i = the batch's index in the epoch, line 301)
                 while their loader reshuffles: `b_index=position` does that; the preset keeps
                 one b per example. W1's own optimizer is the run's (theirs, optimizer_a: SGD
                 0.1, Nesterov 0.9, wd 5e-4, W1's gradient clipped at 5 before its step).
- `own-grad-chain-rule` this project's first `authors-code`: the same product along W1's own
                 clipped gradient but through the chain-rule factor of the unrolled step
                 (-xi1/n for SGD), with the lazy per-entry Adam and the clamp b >= 0: the
                 opposite sign, so examples that agree with the batch gradient go *up*.
- `a-normalised` a_i / mean_batch(a): u changes the mix of examples in W2's step, not its size,
                 which removes the "bigger mistakes, bigger step" incentive.
- `a-only`       b frozen at its initial value: only the stage-2 weights a act (W1 = plain CE).
- `w1-val`       paper + W1's own validation loss in b's upper objective:
                 b minimises L_val(W2') + w1_val_weight * L_val(W1'). The added term is the
                 L2RW meta-gradient; it directly opposes "make W1 worse" and costs nothing extra
                 (it is a constant added to the cotangent of u in the same backward pass).
- `w1-val-only`  a control for `w1-val`: b answers to L_val(W1') alone (W2, V and r as in the
                 paper). If it matches `w1-val`, the gain comes from this L2RW-like term and not
                 from learning from W2's relearning.
- `w1-val-a-norm` `w1-val`'s b path with `a-normalised`'s stage 2 (issue 13): a in (0, 1)
                 scales W2's step by its batch mean; a / mean(a) keeps W2's step at the
                 learning rate and lets W1's mistakes u change only the mix of W2's batch.
- `w1-val-a-norm-b-norm` the same, and (its preset) b_mode batch-normalised: b changes the mix
                 of W1's batch, not the size of W1's step, so switching off much of a batch
                 cannot stall W1.
- `w1-val-a-norm-b-norm-warm` the same, and (its preset) b_warmup 0.2: b does not move in the
                 first fifth of the run, while W1 fits the easy, mostly clean examples and its
                 validation meta-gradient says little about which examples are wrong.
- `w1-val-a-norm-slow-b` `w1-val-a-norm` with (its preset) b_lr 0.02 instead of 0.05: b moves
                 at most about 0.02 each time an example is seen, so where the meta-gradient
                 has little to find (uniform noise, where CE is near its clean accuracy) b cannot
                 pull W1 toward the small meta set, at the price of a smaller gain elsewhere.
The measurements that chose among them are docs/RESULTS.md section 8.

Which per-example array flags wrong labels (`SIGNAL_KEY`, the default of `lfm suspects`): `b` for
`w1-val` and `w1-val-only` (AUROC 0.92 on MNIST-1D, docs/RESULTS.md); `a` for the others, whose
`b` ranks noisy examples *up* (`paper` 0.32, `own-grad-chain-rule` 0.40, measured when it was
called `authors-code`) or is frozen (`a-only`),
while the last `a` is a label-consistency filter (AUROC 0.79-0.85).

Encoders (`LFMConfig.encoder`): `full` (a network trained in stage 3: a fresh body of the
learner's architecture, or `encoder_model` from the model registry, optionally loaded from a
local `encoder_weights` file), `head` (that network frozen, features cached per example, a
learnable linear projection on top), `shared` (paper Table X, parameter sharing: W1 and W2 share
one body with separate heads, and V is that body's features).

Shared mode, exactly: the body belongs to W1 and is updated only by stage 1 (W1 learns, body
and head together). W2 is a linear head on the shared body's features at W1' (after stage 1's
step, detached: stage 2 and the hypergradients treat the features as constants, so the only
path from b to L_val is u(W1'), as in the unshared form). V(d) = the same features, with no
parameters of its own: stage 3 learns b and r only. Memory and cost are close to a single
network's (Table X).

Single network (`lfm-sn`, paper Table IV): one network W trains with plain CE for the first
`sn_warmup` fraction of the run, is frozen as W1 (its validation mistakes u are then fixed
functions of a snapshot), and then keeps training as W2 on a-weighted examples, with V and r
learned from its validation loss. No b, not end to end.

Shared mode's b path leaves out how b moves W2's input features (through W1'), and that path
dominates: on blobs (float64, step 10) one b step raised L_val(W2') by 8.1e-4, where in the
unshared form the same check shows b lowering it by 3.0e-6 (tests/test_behaviour.py checks r in
shared mode, not b).

Python API: `lfm.Reweighter` runs this method on your own module, `torch.optim` optimizer and
DataLoader (README, "Python API"):

    rw = lfm.Reweighter(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        num_train=len(train_set), val_data=(x_val, y_val))  # preset w1-val
    for x, y, idx in loader:
        rw.step(x, y, idx)
    b = rw.weights  # learned weight of each training example

Data parallel (torchrun): each rank holds its part of the global batch and the same full
validation batch; the engine reduces gradients and hypergradients (`lfm.engine.trilevel`), and
b's update and the record of a cover the whole global batch, so b, r, V, W1, W2 stay identical
on every rank. BatchNorm running statistics are each rank's own.

Precision: under `--precision bf16` the learners' and encoder's passes run in bf16 autocast;
a, losses and hypergradients are fp32. The `fd` backend always evaluates in fp32 (its
differences in bf16 would be wrong by hundreds of percent), so bf16 speeds up the exact backend.

Batches: `batch.x` is raw stored data; like every method, this one calls
`ctx.bundle.inputs(x, train=True)` on training batches and `train=False` on validation batches.
Stages 1 and 2 use the same training batch (documented in `lfm.engine.trilevel`).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm.data.types import Batch
from lfm.engine.functional import Params, forward
from lfm.engine.hypergrad import BACKENDS
from lfm.engine.trilevel import (
    IterOptions,
    Learner,
    Upper,
    check_finite,
    commit,
    iteration,
    learn,
    per_example_upper,
    relearn,
    validate,
)
from lfm.engine.virtual import EntryOptimizer, VirtualSGD
from lfm.errors import LFMError, shown
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import METHOD_CHECKS, Opt, check_options
from lfm.reweight.encoder import ENCODER_MODES, FullEncoder, HeadEncoder
from lfm.reweight.function import B_MODES, SIMILARITIES
from lfm.train import distributed

# variant -> (b path of the engine, a normalised per batch)
VARIANTS: dict[str, tuple[str, bool]] = {
    "paper": ("w2", False),
    "authors-code": ("authors", False),
    "own-grad-chain-rule": ("own-grad", False),
    "a-normalised": ("w2", True),
    "a-only": ("frozen", False),
    "w1-val": ("w2+w1val", False),
    "w1-val-only": ("w1val", False),
    # issue 13: w1-val's b path with a / mean(a); the presets of the same names add b's mode
    # and warm-up (as `authors-code`'s brings its b optimizer)
    # mutant w1-val-a-norm-unnormalised: `("w2+w1val", True)` -> `("w2+w1val", False)`
    #   | lfm_dr_issue13
    "w1-val-a-norm": ("w2+w1val", True),
    "w1-val-a-norm-b-norm": ("w2+w1val", True),
    "w1-val-a-norm-b-norm-warm": ("w2+w1val", True),
    "w1-val-a-norm-slow-b": ("w2+w1val", True),
}
OPTIMS = ("adam", "sgd")
# b's optimizer may also be the authors' `optimizer_b` (`AuthorsSGD`)
B_OPTIMS = (*OPTIMS, "authors-sgd")
B_INDEX = ("example", "position")
# The variant run wherever none is named (API, `lfm dr`, `lfm train --method lfm`, `lfm bench`,
# configs), reporting W1. Chosen in docs/RESULTS.md section 8 on held-out clean data only
# (--select-per-class, which no method trains on) over five noise / imbalance settings: the
# one LFM-DR learner whose worst setting is least below plain CE (-0.002 held out; on test
# never more than 0.4 points below CE). `w1-val-a-norm` gains more where labels are flipped
# but is 1.3 points below CE under uniform noise; `preset=paper` runs the paper's form.
RECOMMENDED = "w1-val-a-norm-slow-b"
# variant -> the per-example array that ranks noisy labels low (module docstring, RESULTS.md)
SIGNAL_KEY: dict[str, str] = {
    "paper": "a",
    "authors-code": "a",
    "own-grad-chain-rule": "a",
    "a-normalised": "a",
    "a-only": "a",
    "w1-val": "b",
    "w1-val-only": "b",
    "w1-val-a-norm": "b",
    "w1-val-a-norm-b-norm": "b",
    "w1-val-a-norm-b-norm-warm": "b",
    "w1-val-a-norm-slow-b": "b",
}


@dataclass
class LFMConfig:
    """Everything LFM-DR adds to a plain training run. Presets: `PRESETS`."""

    variant: str = (
        RECOMMENDED  # paper | authors-code | own-grad-chain-rule | a-normalised | a-only | w1-val
        # | w1-val-only | w1-val-a-norm | w1-val-a-norm-b-norm | w1-val-a-norm-b-norm-warm (their
        # presets, of the same names, bring b_mode and b_warmup)
    )
    backend: str = "exact"  # exact (jvp) | fd (finite differences, DARTS eps, fp32)
    b_mode: str = (
        "raw"  # how b enters stage 1: raw (w=b, clamped >= 0) | sigmoid | batch-normalised
    )
    b_init: float | None = (
        None  # None: 1.0 (raw, batch-normalised; W1 starts as plain CE), 0.0 (sigmoid)
    )
    b_optim: str = "adam"  # lazy per-entry Adam (scale-free: b's hypergradient is ~1e-6) | sgd
    # | authors-sgd (their optimizer_b: dense SGD, Nesterov 0.9, wd 5e-4, cosine per epoch)
    b_clip: float | None = None  # norm clip of b's gradient before its step (authors: 5)
    b_index: str = "example"  # example: one b per training example | position: one per batch
    # position (slot = index of the batch in the epoch x its size + row), as the authors' code
    b_lr: float = 0.05  # with Adam, about how far b_i moves each time example i is seen
    r_init: float = 1.0  # r=0 would make a constant and silence the V and b gradients at start
    r_optim: str = "adam"  # lazy per-entry Adam over the validation set
    r_lr: float = 0.01  # r is seen every validation epoch, far more often than b
    v_optim: str = "adam"  # encoder optimizer (full: the network; head: the projection)
    v_lr: float = 1e-3  # Meta-Weight-Net's meta-net setting
    similarity: str = "dot"  # dot (paper eq. 2) | cosine | l2 (negative distance), Fig. 5
    temperature: float = 1.0  # x = softmax(sim / temperature); 1 is the paper's
    use_x: bool = True  # False: uniform attention 1/m (ablation, Fig. 4)
    use_u: bool = True  # False: u_j = 1 (ablation); b then gets no gradient
    use_z: bool = True  # False: z_ij = 1 (ablation)
    encoder: str = "full"  # full | head | shared
    encoder_model: str | None = None  # registry name; None: the learner's own architecture
    encoder_weights: str | None = None  # local state-dict file for the encoder (no downloads)
    encoder_dim: int | None = None  # head mode: projection output size (None: feature size)
    val_bank: int = 0  # >0: x's softmax also spans this many earlier validation embeddings
    w1_val_weight: float = 1.0  # w1-val: weight of L_val(W1') in b's objective
    own_grad_clip: float = 5.0  # authors-code, own-grad-chain-rule: norm clip of W1's own
    # gradient (the authors clip W1's gradient at 5 before their product)
    sn_warmup: float = 0.5  # lfm-sn: fraction of the run trained with plain CE before reweighting
    b_warmup: float = 0.0  # lfm: fraction of the run before b moves (0: from the first step);
    # early meta-gradients come from a W1 that fits nothing yet, and switch off clean examples

    def validate(self) -> None:
        """Raise LFMError naming the first bad field."""

        def bad(name: str, allowed) -> LFMError:
            return LFMError(
                f"lfm.{name} is {shown(getattr(self, name))}", f"use one of {', '.join(allowed)}"
            )

        for name, allowed in _choice_fields().items():
            if getattr(self, name) not in allowed:
                raise bad(name, allowed)
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise LFMError(
                    f"lfm.{name} must be > 0, got {getattr(self, name)}", "pass a positive number"
                )
        if self.val_bank < 0:
            raise LFMError(f"lfm.val_bank must be >= 0, got {self.val_bank}", "use 0 or e.g. 500")
        if self.w1_val_weight < 0:
            raise LFMError(f"lfm.w1_val_weight must be >= 0, got {self.w1_val_weight}", "use 1.0")
        if not 0 <= self.sn_warmup < 1:
            raise LFMError(f"lfm.sn_warmup must be in [0, 1), got {self.sn_warmup}", "use 0.5")
        if not 0 <= self.b_warmup < 1:
            raise LFMError(f"lfm.b_warmup must be in [0, 1), got {self.b_warmup}", "use 0 or 0.2")
        if self.b_clip is not None and not self.b_clip > 0:
            raise LFMError(f"lfm.b_clip must be > 0 or none, got {self.b_clip}", "use 5 or none")
        if self.encoder_dim is not None and self.encoder_dim < 1:
            raise LFMError(f"lfm.encoder_dim must be >= 1, got {self.encoder_dim}", "omit it")
        if self.b_mode == "sigmoid" and self.b_init is not None and self.b_init < -50:
            raise LFMError("lfm.b_init is so low that sigmoid(b) is 0", "use b_init near 0")
        if self.b_mode != "sigmoid" and self.b_init is not None and self.b_init <= 0:
            raise LFMError(
                f"lfm.b_init must be > 0 for b_mode {self.b_mode}, got {self.b_init}", "use 1.0"
            )

    @property
    def initial_b(self) -> float:
        """b's starting value."""
        if self.b_init is not None:
            return self.b_init
        return 0.0 if self.b_mode == "sigmoid" else 1.0

    def iter_options(self) -> IterOptions:
        """What the engine needs to know for one iteration."""
        b_path, a_norm = VARIANTS[self.variant]
        return IterOptions(
            backend=self.backend,
            b_mode=self.b_mode,
            similarity=self.similarity,
            temperature=self.temperature,
            use_x=self.use_x,
            use_u=self.use_u,
            use_z=self.use_z,
            a_norm=a_norm,
            b_path=b_path,
            w1_val_weight=self.w1_val_weight,
            own_grad_clip=self.own_grad_clip,
        )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LFMConfig:
        """A preset (`preset`; if only `variant` is given, the preset of that name; else
        `RECOMMENDED`) with fields overridden by `options`. So `variant=authors-code` brings
        the authors' b optimizer with it, as `preset=authors-code` does.

        Values may be strings (from the command line); they are parsed by the field's type.
        """
        parsed = check_options("lfm", dict(options), lfm_option_specs(), fill=False)
        named = parsed.get("variant")
        name = parsed.pop("preset", named if named in PRESETS else RECOMMENDED)
        cfg = replace(PRESETS[name], **parsed)
        cfg.validate()
        return cfg


def _choice_fields() -> dict[str, tuple[str, ...]]:
    """The `LFMConfig` fields that name one of a few choices, with those choices."""
    return {
        "variant": tuple(VARIANTS),
        "backend": tuple(BACKENDS.names()),
        "b_mode": tuple(B_MODES),
        "b_optim": B_OPTIMS,
        "b_index": B_INDEX,
        "r_optim": OPTIMS,
        "v_optim": OPTIMS,
        "similarity": tuple(SIMILARITIES),
        "encoder": tuple(ENCODER_MODES),
    }


# Ranges the fields' formulas need, shared by `--opt` parsing and `LFMConfig.validate`.
_POSITIVE = ("b_lr", "r_lr", "v_lr", "temperature", "own_grad_clip")


def lfm_option_specs() -> dict[str, Opt]:
    """Every `--opt` key of `lfm` / `lfm-sn`: `preset`, then one per `LFMConfig` field.

    Example
    -------
    >>> lfm_option_specs()["b_lr"].wants()
    'a number > 0'
    """
    paper = PRESETS["paper"]  # the fields' defaults are the faithful form's but for `variant`
    choices = _choice_fields()
    specs: dict[str, Opt] = {"preset": Opt("choice", RECOMMENDED, choices=tuple(PRESETS))}
    for f in fields(LFMConfig):
        default = getattr(paper, f.name)
        if f.name in choices:
            spec = Opt("choice", default, choices=tuple(choices[f.name]))
        elif f.name in _POSITIVE:
            spec = Opt("float", default, lo=0.0, lo_open=True)
        elif f.name == "val_bank":
            spec = Opt("int", default, lo=0)
        elif f.name == "w1_val_weight":
            spec = Opt("float", default, lo=0.0)
        elif f.name in ("sn_warmup", "b_warmup"):
            spec = Opt("float", default, lo=0.0, hi=1.0, hi_open=True)
        elif f.name == "b_clip":
            spec = Opt("float", default, lo=0.0, lo_open=True, none_ok=True)
        elif f.name == "encoder_dim":
            spec = Opt("int", default, lo=1, none_ok=True)
        elif f.name in ("b_init", "r_init"):
            spec = Opt("float", default, none_ok=f.name == "b_init")
        elif isinstance(default, bool):
            spec = Opt("bool", default)
        else:  # encoder_model, encoder_weights: a registry name or a path, or none
            spec = Opt("str", default, none_ok=True)
        specs[f.name] = spec
    return specs


PRESETS: dict[str, LFMConfig] = {
    "paper": LFMConfig(variant="paper"),  # faithful: dot attention, full encoder, b via u(W1')
    # the authors' code: b descends (1/n) g1 . grad l_i with their optimizer_b and clip 5
    "authors-code": LFMConfig(variant="authors-code", b_optim="authors-sgd", b_lr=1e-2, b_clip=5.0),
    # this project's first `authors-code`: the chain-rule factor -xi1/n, lazy Adam (opposite sign)
    "own-grad-chain-rule": LFMConfig(variant="own-grad-chain-rule"),
    "a-normalised": LFMConfig(variant="a-normalised"),  # a / mean(a) per batch
    "a-only": LFMConfig(variant="a-only"),  # b frozen: stage-2 weights only
    "w1-val": LFMConfig(variant="w1-val"),  # + W1's own validation loss in b's objective
    "w1-val-only": LFMConfig(variant="w1-val-only"),  # control: only W1's validation loss drives b
    # issue-13 candidates: w1-val with a / mean(a) (W2's step keeps its size under imbalance) ...
    "w1-val-a-norm": LFMConfig(variant="w1-val-a-norm"),
    # ... and b / mean(b) per batch (b changes the mix of W1's batch, not its step size) ...
    "w1-val-a-norm-b-norm": LFMConfig(variant="w1-val-a-norm-b-norm", b_mode="batch-normalised"),
    # ... and b held for the first fifth of the run (W1 first fits the easy, mostly clean ones)
    "w1-val-a-norm-b-norm-warm": LFMConfig(
        variant="w1-val-a-norm-b-norm-warm", b_mode="batch-normalised", b_warmup=0.2
    ),
    # ... or w1-val-a-norm with b moving 0.02 a visit instead of 0.05 (issue 13's second stage)
    "w1-val-a-norm-slow-b": LFMConfig(variant="w1-val-a-norm-slow-b", b_lr=0.02),
    "ps": LFMConfig(variant="paper", encoder="shared"),  # paper + parameter sharing (Table X)
    "fast": LFMConfig(
        variant="paper", encoder="head", backend="fd"
    ),  # frozen cached encoder, DARTS differences
}


class AuthorsSGD:
    """The authors' `optimizer_b` and `scheduler_b` (dr-lfm-imbalance.py lines 182-189, 229).

    torch.optim.SGD over ALL of b (lr b_lr, momentum 0.9, Nesterov, weight decay 5e-4): every
    step, entries outside the batch decay and keep moving with their momentum, as theirs do.
    The lr follows CosineAnnealingLR(T_max = epochs, eta_min = 1e-5) stepped once per epoch.
    """

    MOMENTUM, WEIGHT_DECAY, ETA_MIN = 0.9, 5e-4, 1e-5

    def __init__(self, b: Tensor, lr: float, epochs: int):
        self.lr0, self.epochs = lr, max(1, epochs)
        self.opt = torch.optim.SGD(
            [b], lr, momentum=self.MOMENTUM, nesterov=True, weight_decay=self.WEIGHT_DECAY
        )

    def lr_at(self, epoch: int) -> float:
        """scheduler_b's lr in `epoch` (0-based)."""
        e = self.ETA_MIN
        return (
            e + (self.lr0 - e) * (1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)) / 2
        )

    @torch.no_grad()
    def step(self, b: Tensor, idx: Tensor, grad: Tensor, epoch: int) -> None:
        """b's gradient is `grad` at `idx` and zero elsewhere; one SGD step on all of b."""
        full = torch.zeros_like(b).index_add_(0, idx, grad.to(b.dtype))
        b.grad = full
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(epoch)
        self.opt.step()
        b.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


class SharedPair(nn.Module):
    """W2 in shared mode, as evaluation sees it: W1's body with W2's own head."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _body_and_dim(model: nn.Module, num_classes: int) -> tuple[nn.Module, int]:
    if hasattr(model, "body") and hasattr(model, "head"):
        return model.body, int(getattr(model, "feature_dim", model.head.in_features))
    return model, num_classes  # no body: the logits are the features


class _LFMBase(Method):
    """What LFM-DR and its single-network variant share: V, r, a, the validation bank."""

    def __init__(self, config: LFMConfig | None = None, **overrides: Any):
        # overrides without a config apply to the recommended preset, as `lfm dr` runs it
        base = config or PRESETS[RECOMMENDED]
        self.cfg_given = config if not overrides else replace(base, **overrides)

    # -- setup ---------------------------------------------------------------------------
    def _refuse_fd_with_dropout(self, model: nn.Module) -> None:
        """fd differences two forward passes; active dropout would draw a new mask in each."""
        if self.cfg.backend != "fd":
            return
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
            raise LFMError(
                "the fd hypergradient backend subtracts two forward passes, and the model's "
                "dropout draws a new mask in each, so the difference would be mask noise "
                "divided by eps",
                "use backend=exact (--backend exact or --opt backend=exact), or dropout=0 in "
                "the model options",
            )

    def _setup_common(self, ctx: Context) -> None:
        self.cfg = self.cfg_given or LFMConfig.from_options(ctx.options)
        self.cfg.validate()
        if ctx.precision == "bf16" and self.cfg.backend == "fd" and distributed.is_main():
            import sys

            print(
                "lfm: info: the fd hypergradient backend evaluates in fp32 under --precision "
                "bf16 (bf16 differences are off by hundreds of percent); the learners' passes "
                "run in bf16",
                file=sys.stderr,
            )
        self.opts = self.cfg.iter_options()
        self.device = ctx.device
        n_tr, n_val = len(ctx.bundle.train), len(ctx.bundle.val)
        self.r = torch.full((n_val,), float(self.cfg.r_init), device=ctx.device)
        self.a_last = torch.full((n_tr,), float("nan"), device=ctx.device)
        self.r_opt = EntryOptimizer(n_val, self.cfg.r_optim, self.cfg.r_lr, device=ctx.device)
        self.V: nn.Module | None = None
        if self.cfg.encoder in ("full", "head"):
            net, dim = self._encoder_net(ctx)
            if self.cfg.encoder == "full":
                self.V = FullEncoder(net)
            else:
                bundle, dev = ctx.bundle, ctx.device

                def source(which: str, idx: Tensor) -> Tensor:
                    split = bundle.train if which == "train" else bundle.val
                    return bundle.inputs(split.x[idx.cpu()].to(dev), False)

                self.V = HeadEncoder(net, dim, n_tr, n_val, self.cfg.encoder_dim, source)
            self.V.to(ctx.device)
            params = [p for p in self.V.parameters() if p.requires_grad]
            cls = torch.optim.Adam if self.cfg.v_optim == "adam" else torch.optim.SGD
            self.v_opt = cls(params, lr=self.cfg.v_lr)
        self.bank: dict[str, Tensor] | None = None

    def _encoder_net(self, ctx: Context) -> tuple[nn.Module, int]:
        cfg, C = self.cfg, ctx.bundle.num_classes
        loaded = False
        if cfg.encoder_model:
            from lfm.models.registry import MODELS, create_model

            kw = {}
            accepts = inspect.signature(MODELS.get(cfg.encoder_model)).parameters
            if cfg.encoder_weights and "weights" in accepts:
                kw, loaded = {"weights": cfg.encoder_weights}, True
            model = create_model(cfg.encoder_model, C, ctx.bundle.input_shape, **kw)
        else:
            model = ctx.learner("V")
        if cfg.encoder_weights and not loaded:
            from lfm.models.weights import read_state_dict

            sd = read_state_dict(cfg.encoder_weights)
            res = model.load_state_dict(sd, strict=False)
            if len(res.missing_keys) == len(model.state_dict()):
                raise LFMError(
                    f"no tensor of {cfg.encoder_weights!r} matches the encoder's parameters",
                    "save the weights with model.state_dict() of the same architecture, "
                    "or name the architecture with encoder_model",
                )
        model = model.to(ctx.device)
        return _body_and_dim(model, C)

    # -- pieces of a step ----------------------------------------------------------------
    def _batches(self, batch: Batch, ctx: Context):
        x_tr = ctx.bundle.inputs(batch.x, train=True)
        vb = next(ctx.val_stream)
        x_val = ctx.bundle.inputs(vb.x, train=False)
        return x_tr, batch.y, batch.idx, x_val, vb.y, vb.idx

    def _encoder(self, x_tr, x_val, idx, vidx, shared_body=None):
        """(embed(W1') -> (e_tr, e_val), V's trainable params, W2's inputs (shared mode) or
        None, a dict that keeps this step's validation embeddings for the bank)."""
        last: dict[str, Tensor] = {}
        if self.V is not None:
            V = self.V

            def embed(p1n: Params):
                e_tr, e_val = V.embed(x_tr, x_val, idx, vidx)
                last["e_val"] = e_val.detach()
                return e_tr, e_val

            return embed, [p for p in V.parameters() if p.requires_grad], None, last
        body_mod = shared_body

        def feats(p1n: Params):
            if "f_tr" not in last:
                body = {k[5:]: v.detach() for k, v in p1n.items() if k.startswith("body.")}
                bufs = dict(body_mod.named_buffers())
                with torch.no_grad():
                    last["f_tr"] = forward(body_mod, body, bufs, x_tr)
                    last["e_val"] = forward(body_mod, body, bufs, x_val)
            return last["f_tr"], last["e_val"]

        return feats, [], feats, last

    def _bank(self) -> tuple[tuple[Tensor, Tensor, Tensor] | None, Tensor | None]:
        if self.bank is None or self.cfg.val_bank == 0:
            return None, None
        bk = self.bank
        return (bk["e"], bk["y"], bk["u"]), bk["idx"]

    @torch.no_grad()
    def _push_bank(self, e_val: Tensor, y: Tensor, u: Tensor, vidx: Tensor) -> None:
        k = self.cfg.val_bank
        if k == 0:
            return
        new = {"e": e_val.detach(), "y": y, "u": u.detach(), "idx": vidx}
        if self.bank is not None:
            new = {key: torch.cat([self.bank[key], new[key]])[-k:] for key in new}
        else:
            new = {key: v[-k:] for key, v in new.items()}
        self.bank = new

    def _stage3_updates(self, res, idx: Tensor | None, r_idx: Tensor, v_params) -> None:
        # mutant r-step-sign: `res.grad_r.detach()` -> `-res.grad_r.detach()` | behaviour:b_r_and_v
        # mutant r-step-dropped: drop | behaviour:b_r_and_v
        self.r_opt.step(self.r, r_idx, res.grad_r.detach())
        if self.V is not None:
            for p, g in zip(v_params, res.grad_v, strict=True):
                # mutant v-grad-sign: `else g.detach()` -> `else -g.detach()` | behaviour:b_r_and_v
                p.grad = None if g is None else g.detach()
            # mutant v-step-dropped: drop | behaviour:b_r_and_v
            self.v_opt.step()
            self.v_opt.zero_grad(set_to_none=True)

    def _common_state(self) -> dict[str, Any]:
        return {
            "cfg": asdict(self.cfg),
            "r": self.r,
            "a": self.a_last,
            "r_opt": self.r_opt.state_dict(),
            "V": None if self.V is None else self.V.state_dict(),
            "v_opt": None if self.V is None else self.v_opt.state_dict(),
            "bank": self.bank,
        }

    def _load_common(self, state: dict[str, Any]) -> None:
        self.r.copy_(state["r"])
        self.a_last.copy_(state["a"])
        self.r_opt.load_state_dict(state["r_opt"])
        if self.V is not None:
            self.V.load_state_dict(state["V"])
            self.v_opt.load_state_dict(state["v_opt"])
        self.bank = state["bank"]

    # Logged entries that are this rank's part under torchrun (distributed.global_logs): a and
    # w are per-example over the part; dL/da is the part's rows. The losses L1 / L2, L_val,
    # u (clean batch), b_mean (global batch) and the other hypergradients (summed over ranks)
    # are the same on every rank already.
    LOG_KINDS = {
        "a_mean": distributed.LOG_MEAN,
        "w_mean": distributed.LOG_MEAN,
        "hg_a": distributed.LOG_NORM,
    }

    @classmethod
    def _floats(cls, logs: dict[str, Tensor], part: distributed.Part) -> dict[str, float]:
        """The step's logs as floats of the global batch (one all_reduce under torchrun)."""
        return distributed.global_logs(logs, part, cls.LOG_KINDS)


class LFMDR(_LFMBase):
    """LFM data reweighting with two learners (TN), registered as `lfm`."""

    name = "lfm"

    @property
    def label(self) -> str:
        """`lfm[variant]`, so every table names the variant it ran."""
        return f"{self.name}[{self.cfg.variant}]"

    def setup(self, ctx: Context) -> None:
        """W1, W2 (from the context), V, r (one per validation example), b (one per training
        example), and their optimizers."""
        self._setup_common(ctx)
        w1 = ctx.learner("W1")
        self.w1 = Learner(w1, ctx.virtual_optimizer("W1", w1, "W1"))
        self._refuse_fd_with_dropout(self.w1.module)
        w2_model = ctx.learner("W2")
        self.shared = self.cfg.encoder == "shared"
        if self.shared:
            if not (hasattr(self.w1.module, "body") and hasattr(self.w1.module, "head")):
                raise LFMError(
                    "encoder 'shared' needs a model with `body` and `head` submodules",
                    "use encoder full or head, or give the model body/head",
                )
            self.w2 = Learner(w2_model.head, ctx.virtual_optimizer("W2", w2_model.head, "W2"))
            self.w2_eval = SharedPair(self.w1.module.body, self.w2.module)
        else:
            self.w2 = Learner(w2_model, ctx.virtual_optimizer("W2", w2_model, "W2"))
            self.w2_eval = w2_model
        n_tr = len(ctx.bundle.train)
        self.b = torch.full((n_tr,), float(self.cfg.initial_b), device=ctx.device)
        self.b_warmup_steps = int(self.cfg.b_warmup * ctx.total_steps)
        # one row per epoch of b and of a (float16: records for plots, not state to train on)
        self.b_history: list[Tensor] = []
        self.a_history: list[Tensor] = []
        self.b_opt: EntryOptimizer | AuthorsSGD
        if self.cfg.b_optim == "authors-sgd":
            epochs = round(ctx.total_steps / max(1, ctx.steps_per_epoch))
            self.b_opt = AuthorsSGD(self.b, self.cfg.b_lr, epochs)
        else:
            self.b_opt = EntryOptimizer(n_tr, self.cfg.b_optim, self.cfg.b_lr, device=ctx.device)

    def _slots(self, whole: Tensor, ctx: Context) -> Tensor:
        """Which entries of b the global batch uses: its examples, or (b_index=position) its
        positions, batch k of the epoch taking entries k*n .. k*n+n-1 (the last batch the last
        entries), as the authors' `weight_b[:, i]` whatever examples the loader put there."""
        if self.cfg.b_index == "example":
            return whole
        k, spe, n, total = (
            ctx.step % ctx.steps_per_epoch,
            ctx.steps_per_epoch,
            len(whole),
            len(self.b),
        )
        start = total - n if k == spe - 1 else k * n
        if start < 0 or start + n > total:
            raise LFMError(
                f"b_index=position: batch {k} of {spe} with {n} examples does not fit the "
                f"{total} entries of b",
                "use b_index=example, or full batches of one size",
            )
        return torch.arange(start, start + n, device=self.b.device)

    def _b_step(self, slots: Tensor, grad: Tensor, ctx: Context) -> None:
        """Clip b's gradient (b_clip, as clip_grad_norm_), then its optimizer's step."""
        if self.cfg.b_clip:
            c = self.cfg.b_clip / (float(grad.norm()) + 1e-6)
            grad = grad * min(1.0, c)
        if isinstance(self.b_opt, AuthorsSGD):  # their b is not clamped
            self.b_opt.step(self.b, slots, grad, ctx.epoch)
            return
        self.b_opt.step(self.b, slots, grad)
        if self.cfg.b_mode != "sigmoid":
            self.b[slots] = self.b[slots].clamp_min(0.0)

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One iteration of Algorithm 1: learn, relearn, validate; then update W1, W2, b, r, V."""
        for m in (self.w1.module, self.w2.module, self.V):
            if m is not None:
                m.train()
        lr1, lr2 = ctx.learner_lr("W1"), ctx.learner_lr("W2")
        x_tr, y_tr, idx, x_val, y_val, vidx = self._batches(batch, ctx)
        part = distributed.part_of(batch)
        whole = idx if batch.whole is None else batch.whole  # the global batch's positions
        slots = self._slots(whole, ctx)  # b's entries for this batch
        bank, bank_idx = self._bank()
        r_idx = vidx if bank_idx is None else torch.cat([vidx, bank_idx])
        r = self.r[r_idx].clone().requires_grad_(True)
        embed, v_params, w2_inputs, last = self._encoder(
            x_tr, x_val, idx, vidx, self.w1.module.body if self.shared else None
        )
        opts = self.opts
        # b waits during its warm-up. V and r learn as usual: u.mean() and the b path do not
        # reach them, so freezing b's path changes only b.
        # mutant b-warmup-ignored: `< self.b_warmup_steps` -> `< 0` | lfm_dr_issue13
        if ctx.step < self.b_warmup_steps:
            opts = replace(self.opts, b_path="frozen")
        res = iteration(
            self.w1,
            self.w2,
            x_tr,
            y_tr,
            x_val,
            y_val,
            self._upper(slots, whole),
            r,
            embed,
            v_params,
            opts,
            lr1,
            lr2,
            w2_inputs=w2_inputs,
            bank=bank,
            part=part,
        )
        check_finite(res, ctx.step)
        commit(self.w1, self.w2, res)
        logs = dict(res.logs)
        if res.grad_b is not None:  # the global batch's gradient, the same on every rank
            logs |= self._step_upper(slots, whole, res.grad_b.detach(), ctx)
        self._stage3_updates(res, idx, r_idx, v_params)
        self.a_last[whole] = part.gather(res.s2.a.detach().to(self.a_last.dtype))
        self._push_bank(last["e_val"], y_val, res.s2.u, vidx)
        logs["b_mean"] = self._upper(slots, whole).value.mean()
        return self._floats(logs, part)

    def _upper(self, slots: Tensor, whole: Tensor) -> Upper:
        """The upper variable of stage 1 for this batch: b's entries `slots`."""
        return per_example_upper(self.b[slots], self.cfg.b_mode)

    def _step_upper(
        self, slots: Tensor, whole: Tensor, grad: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        """Step b's batch entries on their hypergradient; logs how many of them fell."""
        before = self.b[slots].clone()
        # mutant b-step-sign: `slots, grad, ctx)` -> `slots, -grad, ctx)` | behaviour:b_r_and_v
        # mutant b-step-dropped: drop | behaviour:b_r_and_v
        self._b_step(slots, grad, ctx)
        return {
            "b_fell": (self.b[slots] < before).float().mean(),  # the batch's b that fell
            "b_pushed_down": (grad > 0).float().mean(),  # ... that its gradient alone lowers
        }

    def models(self) -> dict[str, nn.Module]:
        """{"W1": .., "W2": ..}; in shared mode W2 is the shared body with W2's head."""
        return {"W1": self.w1.module, "W2": self.w2_eval}

    def on_epoch_end(self, ctx: Context) -> None:
        """Snapshot b and a, so a report can show when examples were switched off."""
        self.b_history.append(self.b.detach().to("cpu", torch.float16))
        self.a_history.append(self.a_last.detach().to("cpu", torch.float16))

    def per_example(self) -> dict[str, np.ndarray]:
        """b (learned weight of each training example; with b_index=position, of each batch
        position), a (its last stage-2 weight; NaN if never seen), `b_history` and `a_history`
        (one float16 row per finished epoch), and `r` (one entry per validation example)."""
        out = {
            "b": self.b.detach().cpu().numpy(),
            "a": self.a_last.detach().cpu().numpy(),
            "r": self.r.detach().cpu().numpy(),
        }
        if self.b_history:
            out["b_history"] = torch.stack(self.b_history).numpy()
            out["a_history"] = torch.stack(self.a_history).numpy()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Learners, momentum buffers, V and its optimizer, b, r, a, their optimizers, bank."""
        st = self._common_state()
        st.update(
            {
                "W1": self.w1.module.state_dict(),
                "W2": self.w2.module.state_dict(),
                "sgd1": self.w1.opt.state_dict(),
                "sgd2": self.w2.opt.state_dict(),
                "b": self.b,
                "b_opt": self.b_opt.state_dict(),
                "b_history": torch.stack(self.b_history) if self.b_history else None,
                "a_history": torch.stack(self.a_history) if self.a_history else None,
            }
        )
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `setup` with the same config)."""
        self.w1.module.load_state_dict(state["W1"])
        self.w2.module.load_state_dict(state["W2"])
        self.w1.opt.load_state_dict(state["sgd1"])
        self.w2.opt.load_state_dict(state["sgd2"])
        self.b.copy_(state["b"])
        # mutant lfm-resume-loses-b-moments: drop
        #   | lfm_dr:round_trip behaviour:resumed lfm_dr_authors:resumes
        self.b_opt.load_state_dict(state["b_opt"])
        for key in ("b_history", "a_history"):  # absent from checkpoints written before them
            hist = state.get(key)
            setattr(self, key, [] if hist is None else list(hist.unbind(0)))
        self._load_common(state)


class LFMSN(_LFMBase):
    """Single network (paper Table IV): train, reweight, retrain; registered as `lfm-sn`."""

    name = "lfm-sn"

    def setup(self, ctx: Context) -> None:
        """One network W, V, r; the frozen copy W1 is taken when reweighting starts."""
        self._setup_common(ctx)
        if self.cfg.encoder == "shared":
            raise LFMError(
                "lfm-sn has one network; encoder 'shared' would be W itself",
                "use encoder full or head",
            )
        w = ctx.learner("W1")
        self.w = Learner(w, ctx.virtual_optimizer("W1", w, "W"))
        self._refuse_fd_with_dropout(self.w.module)
        self.frozen: Learner | None = None
        self.warmup_steps = int(self.cfg.sn_warmup * ctx.total_steps)

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """Plain CE before `sn_warmup`; after it, relearn on a from the frozen snapshot's u."""
        lr = ctx.learner_lr("W1")
        self.w.module.train()
        part = distributed.part_of(batch)
        if ctx.step < self.warmup_steps:
            x = ctx.bundle.inputs(batch.x, train=True)
            ones = torch.ones(part.total, device=x.device)  # plain CE: w = 1
            s1 = learn(self.w, x, batch.y, ones, replace(self.opts, b_mode="raw"), lr, part)
            if not torch.isfinite(s1.L1):
                raise LFMError(
                    f"stage 1 (learn) loss became NaN or inf at step {ctx.step}", "lower --lr"
                )
            self.w.opt.commit(self.w.module, s1.p1_new, s1.m1_new)
            return {"L1": float(s1.L1)}
        if self.frozen is None:
            self.frozen = Learner(copy.deepcopy(self.w.module), VirtualSGD())
        if self.V is not None:
            self.V.train()
        x_tr, y_tr, idx, x_val, y_val, vidx = self._batches(batch, ctx)
        bank, bank_idx = self._bank()
        r_idx = vidx if bank_idx is None else torch.cat([vidx, bank_idx])
        r = self.r[r_idx].clone().requires_grad_(True)
        embed, v_params, _, last = self._encoder(x_tr, x_val, idx, vidx)
        s2 = relearn(
            self.frozen,
            self.w,
            self.frozen.params(),
            x_tr,
            y_tr,
            x_val,
            y_val,
            r,
            embed,
            self.opts,
            lr,
            bank=bank,
            u_grad=False,
            part=part,
        )
        res = validate(
            self.frozen, self.w, None, s2, x_tr, y_tr, y_val, None, r, v_params, self.opts, part
        )
        check_finite(res, ctx.step)
        commit(None, self.w, res)
        self._stage3_updates(res, idx, r_idx, v_params)
        whole = idx if batch.whole is None else batch.whole
        self.a_last[whole] = part.gather(s2.a.detach().to(self.a_last.dtype))
        self._push_bank(last["e_val"], y_val, s2.u, vidx)
        return self._floats(res.logs, part)

    def models(self) -> dict[str, nn.Module]:
        """The single network, {"W": ..}."""
        return {"W": self.w.module}

    def per_example(self) -> dict[str, np.ndarray]:
        """a: the last stage-2 weight of each training example (NaN if never reweighted)."""
        return {"a": self.a_last.detach().cpu().numpy()}

    def state_dict(self) -> dict[str, Any]:
        """W, its momentum, the frozen snapshot (once taken), V, r, a and their optimizers."""
        st = self._common_state()
        st.update(
            {
                "W": self.w.module.state_dict(),
                "sgd": self.w.opt.state_dict(),
                "frozen": None if self.frozen is None else self.frozen.module.state_dict(),
            }
        )
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `setup` with the same config)."""
        self.w.module.load_state_dict(state["W"])
        self.w.opt.load_state_dict(state["sgd"])
        if state["frozen"] is not None:
            self.frozen = Learner(copy.deepcopy(self.w.module), VirtualSGD())
            self.frozen.module.load_state_dict(state["frozen"])
        self._load_common(state)


METHODS.register("lfm", "Learning From Mistakes data reweighting (two learners, Algorithm 1)")(
    LFMDR
)
METHODS.register("lfm-sn", "LFM single network: train, reweight, retrain (paper Table IV)")(LFMSN)

# `lfm` and `lfm-sn` read the same options: a preset, then fields (checked before any training)
METHOD_CHECKS["lfm"] = LFMConfig.from_options
METHOD_CHECKS["lfm-sn"] = LFMConfig.from_options
