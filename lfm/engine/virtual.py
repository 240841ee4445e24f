"""The virtual optimizer step W' = step(W, g), identical to the real `torch.optim.SGD` update.

LFM approximates each inner argmin by one unrolled step (DARTS). Here that step is the learner's
real optimizer update written as a pure function of (params, grads): the real update of W1 and
W2 *is* the virtual step (its output dict is copied into the module and its momentum buffers
kept), so the unrolled graph and the trajectory of training never disagree.

torch.optim.SGD (dampening 0), per parameter p with gradient g:

    d = g * c + wd * p                c = min(1, clip / (||g|| + 1e-6)) when clipping, else 1
    m = d                             (first step)  |  m = mu * m_old + d   (later steps)
    p' = p - lr * (d + mu * m)        (nesterov)    |  p' = p - lr * m      (plain momentum)

so dp'/dg = -xi * I with xi = lr * c * (1 + mu) (nesterov) or lr * c (otherwise, including the
first momentum step). `xi` is what the hypergradient formulas call xi1 / xi2. The clip
coefficient c is treated as a constant in hypergradients (as DARTS treats it).

torch.optim.Adam / AdamW (amsgrad off), per parameter, at step t:

    d = g * c (+ wd * p for Adam)     m = b1 m_old + (1 - b1) d     v = b2 v_old + (1 - b2) d^2
    p' = p (1 - lr wd for AdamW) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Here dp'/dg is diagonal but not a multiple of I, so every virtual optimizer offers `pullback`:
(dp'/dg)^T v, which the hypergradients use in place of -xi * v (for SGD it is exactly that).
`virtual_from_torch` reads a user's real `torch.optim` optimizer (settings and state) into the
matching virtual one; `write_back` puts the committed state back into it, so the user's
optimizer and `state_dict` stay the truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lfm.engine.functional import Params, norm
from lfm.errors import LFMError
from lfm.train.optim import OptimConfig


class VirtualSGD:
    """SGD with momentum / weight decay / nesterov / grad-norm clipping as a function of dicts."""

    def __init__(
        self,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        grad_clip: float | None = None,
    ):
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov and momentum > 0)
        self.grad_clip = grad_clip
        self.buffers: Params | None = None  # momentum buffers, None before the first step

    @classmethod
    def from_config(cls, cfg: OptimConfig, who: str = "learner") -> VirtualSGD | VirtualAdam:
        """The virtual twin of `make_optimizer(cfg)`: SGD, or Adam (see `virtual_from_config`)."""
        return virtual_from_config(cfg, who)

    def clip_coef(self, grads: Params) -> float:
        """c = min(1, clip / (||g|| + 1e-6)), as `nn.utils.clip_grad_norm_` computes it."""
        if not self.grad_clip:
            return 1.0
        return min(
            1.0, self.grad_clip / (float(norm({k: g.detach() for k, g in grads.items()})) + 1e-6)
        )

    def xi(self, lr: float, clip_coef: float = 1.0) -> float:
        """-d p' / d g: the scalar the hypergradient of an unrolled step is multiplied by."""
        # mutant xi-ignores-nesterov: `((1.0 + self.momentum) if self.nesterov else 1.0)` -> `1.0`
        #   | engine_virtual
        return lr * clip_coef * ((1.0 + self.momentum) if self.nesterov else 1.0)

    def pullback(
        self, params: Params, grads: Params, lr: float, clip_coef: float, v: Params
    ) -> Params:
        """(d p' / d g)^T v = -xi * v (SGD's step is affine in g)."""
        xi = self.xi(lr, clip_coef)
        return {k: -xi * v[k] for k in params}

    def step(
        self, params: Params, grads: Params, lr: float, clip_coef: float = 1.0
    ) -> tuple[Params, Params | None]:
        """(p', new momentum buffers); differentiable in `grads` (and `params`)."""
        new_p: Params = {}
        new_m: Params | None = {} if self.momentum > 0 else None
        for k, p in params.items():
            d = grads[k] * clip_coef if clip_coef != 1.0 else grads[k]
            if self.weight_decay:
                # mutant sgd-wd-sign: `d + self.weight_decay` -> `d - self.weight_decay`
                #   | engine_virtual
                d = d + self.weight_decay * p
            if self.momentum > 0:
                old = None if self.buffers is None else self.buffers.get(k)
                # mutant sgd-momentum-dropped: `self.momentum * old + d` -> `d` | engine_virtual
                m = d if old is None else self.momentum * old + d
                new_m[k] = m  # type: ignore[index]
                d = d + self.momentum * m if self.nesterov else m
            new_p[k] = p - lr * d
        return new_p, new_m

    @torch.no_grad()
    def commit(self, module: nn.Module, new_params: Params, new_buffers: Params | None) -> None:
        """Make the virtual step real: write p' into `module`, keep the momentum buffers."""
        named = dict(module.named_parameters())
        for k, v in new_params.items():
            named[k].copy_(v.detach())
        if new_buffers is not None:
            self.buffers = {k: v.detach().clone() for k, v in new_buffers.items()}

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers (the only state)."""
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore momentum buffers."""
        self.buffers = state["buffers"]


class VirtualAdam:
    """torch.optim.Adam / AdamW (amsgrad off) as a function of dicts, with grad-norm clipping.

    State: the step count t and the moments m (exp_avg), v (exp_avg_sq), None before the first
    step. `decoupled=True` is AdamW (weight decay applied to p, not added to g).

    Example
    -------
    >>> opt = VirtualAdam(betas=(0.9, 0.999), weight_decay=1e-2, decoupled=True)
    >>> p_new, state = opt.step(params, grads, lr=1e-3)   # what torch.optim.AdamW would do
    >>> opt.commit(model, p_new, state)
    """

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        grad_clip: float | None = None,
    ):
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decoupled, self.grad_clip = bool(decoupled), grad_clip
        self.t = 0
        self.exp_avg: Params | None = None
        self.exp_avg_sq: Params | None = None

    def clip_coef(self, grads: Params) -> float:
        """c = min(1, clip / (||g|| + 1e-6)), as `nn.utils.clip_grad_norm_` computes it."""
        if not self.grad_clip:
            return 1.0
        return min(
            1.0, self.grad_clip / (float(norm({k: g.detach() for k, g in grads.items()})) + 1e-6)
        )

    def step(
        self, params: Params, grads: Params, lr: float, clip_coef: float = 1.0
    ) -> tuple[Params, dict[str, Any]]:
        """(p', new state); differentiable in `grads` (and `params`)."""
        b1, b2 = self.betas
        t = self.t + 1
        bc1, bc2_sqrt = 1.0 - b1**t, math.sqrt(1.0 - b2**t)
        new_p: Params = {}
        m_new: Params = {}
        v_new: Params = {}
        for k, p in params.items():
            d = grads[k] * clip_coef if clip_coef != 1.0 else grads[k]
            if self.weight_decay and not self.decoupled:
                d = d + self.weight_decay * p
            m_old = None if self.exp_avg is None else self.exp_avg.get(k)
            v_old = None if self.exp_avg_sq is None else self.exp_avg_sq.get(k)
            m = (1 - b1) * d if m_old is None else b1 * m_old + (1 - b1) * d
            v = (1 - b2) * d * d if v_old is None else b2 * v_old + (1 - b2) * d * d
            m_new[k], v_new[k] = m, v
            # sqrt with a finite derivative where v = 0 (a parameter with no gradient yet)
            root = torch.where(v > 0, torch.where(v > 0, v, torch.ones_like(v)).sqrt(), 0.0)
            base = p * (1 - lr * self.weight_decay) if self.decoupled and self.weight_decay else p
            # mutant adam-no-bias-correction: `(lr / bc1)` -> `lr` | engine_virtual
            new_p[k] = base - (lr / bc1) * m / (root / bc2_sqrt + self.eps)
        return new_p, {"t": t, "exp_avg": m_new, "exp_avg_sq": v_new}

    def pullback(
        self, params: Params, grads: Params, lr: float, clip_coef: float, v: Params
    ) -> Params:
        """(d p' / d g)^T v at the step's point: one elementwise vjp of `step` (diagonal)."""
        p0 = {k: t.detach() for k, t in params.items()}
        _, vjp = torch.func.vjp(
            lambda g: self.step(p0, g, lr, clip_coef)[0], {k: grads[k].detach() for k in p0}
        )
        # mutant adam-pullback-sign: `v[k].detach()` -> `-v[k].detach()` | engine_virtual
        return vjp({k: v[k].detach() for k in p0})[0]

    @torch.no_grad()
    def commit(self, module: nn.Module, new_params: Params, state: dict[str, Any]) -> None:
        """Make the virtual step real: write p' into `module`, keep t and the moments."""
        named = dict(module.named_parameters())
        for k, val in new_params.items():
            named[k].copy_(val.detach())
        self.t = int(state["t"])
        self.exp_avg = {k: x.detach().clone() for k, x in state["exp_avg"].items()}
        self.exp_avg_sq = {k: x.detach().clone() for k, x in state["exp_avg_sq"].items()}

    def state_dict(self) -> dict[str, Any]:
        """Step count and moments."""
        return {"t": self.t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step count and moments."""
        self.t = int(state["t"])
        self.exp_avg, self.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]


VirtualOptimizer = VirtualSGD | VirtualAdam


@dataclass
class Unrolled:
    """One virtual step: p' = step(p, g), the optimizer state after it, and its pull-back."""

    params: Params  # p'
    state: Any  # momentum buffers (SGD) or step and moments (Adam); `commit` makes it real
    pull: Callable[[Params], Params]  # v -> (dp'/dg)^T v at this step's point (clip held fixed)


def merged(*steps: Unrolled) -> Unrolled:
    """Steps of disjoint parts of one module as one step, to commit together (no pull-back)."""

    def union(dicts: list[Any]) -> Any:
        return (
            None
            if all(d is None for d in dicts)
            else {k: v for d in dicts for k, v in (d or {}).items()}
        )

    params = union([u.params for u in steps])
    states = [u.state for u in steps]
    if states and isinstance(states[0], dict) and "exp_avg" in states[0]:  # Adam
        state: Any = {
            "t": states[0]["t"],
            "exp_avg": union([s["exp_avg"] for s in states]),
            "exp_avg_sq": union([s["exp_avg_sq"] for s in states]),
        }
    else:  # SGD: momentum buffers by name, or None without momentum
        state = union(states)

    def no_pull(v: Params) -> Params:
        raise LFMError("a merged step has no pull-back", "pull back through each part's step")

    return Unrolled(params, state, no_pull)


@dataclass
class StepRule:
    """A learner's real update as a pure function: its virtual optimizer and the lr now.

    Both applications unroll through this one object, so the virtual step *is* the real one,
    clipping included (the clip coefficient is a constant of the hypergradient, as in DARTS).

    Example
    -------
    >>> rule = StepRule.of(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, 5.0)
    >>> u = rule(params_of(net), grads)        # u.params is what the real step would give
    >>> rule.commit(net, u)                    # ... and now is the real step
    """

    opt: VirtualOptimizer
    lr: float

    @classmethod
    def of(
        cls,
        optimizer: torch.optim.Optimizer,
        module: nn.Module,
        grad_clip: float | None = None,
        who: str = "learner",
    ) -> StepRule:
        """The rule of `optimizer` over `module` now (settings, state and lr read from it)."""
        return cls(
            virtual_from_torch(optimizer, module, who, grad_clip), optimizer.param_groups[0]["lr"]
        )

    def __call__(self, params: Params, grads: Params, clip_coef: float | None = None) -> Unrolled:
        """Unroll one step from `params` with gradient `grads` (clip coefficient from `grads`
        unless given: a step over part of the parameters uses the whole step's)."""
        c = self.opt.clip_coef(grads) if clip_coef is None else clip_coef
        p_new, state = self.opt.step(params, grads, self.lr, c)
        p0 = {k: t.detach() for k, t in params.items()}
        g0 = {k: grads[k].detach() for k in p0}
        return Unrolled(p_new, state, lambda v: self.opt.pullback(p0, g0, self.lr, c, v))

    def commit(
        self, module: nn.Module, u: Unrolled, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Make `u` the real step: write p' into `module`, keep the state, and put it back into
        the real `optimizer` (so its `state_dict` stays the truth)."""
        self.opt.commit(module, u.params, u.state)
        if optimizer is not None:
            write_back(self.opt, optimizer, module)


def virtual_from_config(cfg: OptimConfig, who: str = "learner") -> VirtualOptimizer:
    """The virtual twin of `lfm.train.optim.make_optimizer(cfg)` (SGD or Adam)."""
    if cfg.optimizer == "sgd":
        return VirtualSGD(cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.grad_clip)
    if cfg.optimizer == "adam":
        return VirtualAdam(weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    raise LFMError(
        f"the {who}'s optimizer {cfg.optimizer!r} has no virtual step", "use sgd or adam"
    )


_SUPPORTED = (
    "torch.optim.SGD (momentum, nesterov, weight decay; dampening 0), torch.optim.Adam and "
    "torch.optim.AdamW (amsgrad off), each with one parameter group"
)


def _refuse(who: str, what: str) -> LFMError:
    return LFMError(
        f"the {who}'s optimizer cannot be unrolled: {what}", f"use one of: {_SUPPORTED}"
    )


def virtual_from_torch(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    who: str = "learner",
    grad_clip: float | None = None,
) -> VirtualOptimizer:
    """The virtual optimizer that mirrors a user's real one, with its current state.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer the user built over `module`'s parameters.
    module : nn.Module
        The module it optimizes; its parameter names key the virtual state.
    who : str
        Names the learner in error messages.
    grad_clip : float, optional
        Gradient-norm clipping applied before the step (what `clip_grad_norm_` would do).

    Returns
    -------
    VirtualSGD or VirtualAdam
        Settings and state (momentum buffers; step count and moments) read from `optimizer`.
        Read it again before each step (`read_state`) to follow a user who changes it.

    Example
    -------
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    >>> virtual = virtual_from_torch(opt, model)
    """
    if len(optimizer.param_groups) != 1:
        raise _refuse(who, f"it has {len(optimizer.param_groups)} parameter groups")
    g = optimizer.param_groups[0]
    ours = {id(p) for p in module.parameters() if p.requires_grad}
    theirs = {id(p) for p in g["params"]}
    if ours != theirs:
        raise LFMError(
            f"the {who}'s optimizer does not hold exactly the module's trainable parameters",
            "build it as torch.optim.SGD(model.parameters(), ...) over the same model",
        )
    kind = type(optimizer)
    if g.get("maximize") or g.get("differentiable"):
        raise _refuse(who, "maximize / differentiable are set")
    if kind is torch.optim.SGD:
        if g.get("dampening", 0.0):
            raise _refuse(who, f"dampening={g['dampening']}")
        v: VirtualOptimizer = VirtualSGD(g["momentum"], g["weight_decay"], g["nesterov"], grad_clip)
    elif kind in (torch.optim.Adam, torch.optim.AdamW):
        if g.get("amsgrad"):
            raise _refuse(who, "amsgrad=True")
        decoupled = kind is torch.optim.AdamW or bool(g.get("decoupled_weight_decay"))
        v = VirtualAdam(tuple(g["betas"]), g["eps"], g["weight_decay"], decoupled, grad_clip)
    else:
        raise _refuse(who, f"{kind.__module__}.{kind.__qualname__} is not supported")
    read_state(v, optimizer, module)
    return v


def _named_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def read_state(virtual: VirtualOptimizer, optimizer: torch.optim.Optimizer, module: nn.Module):
    """Copy the real optimizer's state (momentum buffers, or step and moments) into `virtual`."""
    named = _named_params(module)
    st = {k: optimizer.state.get(p, {}) for k, p in named.items()}
    if isinstance(virtual, VirtualSGD):
        bufs = {
            k: s["momentum_buffer"] for k, s in st.items() if s.get("momentum_buffer") is not None
        }
        virtual.buffers = bufs or None
        return
    have = {k: s for k, s in st.items() if "exp_avg" in s}
    if not have:
        virtual.t, virtual.exp_avg, virtual.exp_avg_sq = 0, None, None
        return
    steps = {int(float(s["step"])) for s in have.values()}
    if len(steps) != 1:
        raise _refuse("learner", f"its parameters are at different step counts {sorted(steps)}")
    virtual.t = steps.pop()
    virtual.exp_avg = {k: s["exp_avg"] for k, s in have.items()}
    virtual.exp_avg_sq = {k: s["exp_avg_sq"] for k, s in have.items()}


@torch.no_grad()
def write_back(virtual: VirtualOptimizer, optimizer: torch.optim.Optimizer, module: nn.Module):
    """Put `virtual`'s committed state into the real optimizer, as its own step would leave it."""
    named = _named_params(module)
    if isinstance(virtual, VirtualSGD):
        if virtual.buffers is not None:
            for k, buf in virtual.buffers.items():
                optimizer.state[named[k]]["momentum_buffer"] = buf.clone()
        return
    if virtual.exp_avg is None:
        return
    g = optimizer.param_groups[0]
    on_device = bool(g.get("fused") or g.get("capturable"))  # torch keeps `step` there then
    for k, p in named.items():
        s = optimizer.state[p]
        s["step"] = torch.tensor(float(virtual.t), device=p.device if on_device else "cpu")
        s["exp_avg"] = virtual.exp_avg[k].clone()
        s["exp_avg_sq"] = virtual.exp_avg_sq[k].clone()


class EntryOptimizer:
    """Updates only the entries of a long vector that a batch touched (b over the training set,
    r over the validation set): `sgd` (v -= lr * g) or `adam` (lazy Adam, as torch.optim.SparseAdam:
    moments and bias-correction counts per entry, moved only when the entry is in a batch).

    Adam is scale-free, which matters here: the b hypergradient is a product of two one-step
    unrolls and is typically 1e-6 in size (SPEC.md section 1).
    """

    def __init__(
        self,
        n: int,
        kind: str = "adam",
        lr: float = 1e-2,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        device: torch.device | str = "cpu",
    ):
        if kind not in ("sgd", "adam"):
            raise LFMError(f"unknown entry optimizer {kind!r}", "use sgd or adam")
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.m = torch.zeros(n, device=device) if kind == "adam" else None
        self.v = torch.zeros(n, device=device) if kind == "adam" else None
        self.t = torch.zeros(n, device=device) if kind == "adam" else None

    @torch.no_grad()
    def step(self, vec: Tensor, idx: Tensor, grad: Tensor) -> None:
        """vec[idx] -= update(grad); repeated indices have their gradients summed first."""
        idx, inv = torch.unique(idx, return_inverse=True)
        g = torch.zeros(len(idx), device=grad.device, dtype=grad.dtype).index_add_(0, inv, grad)
        if self.kind == "sgd":
            vec[idx] -= self.lr * g.to(vec.dtype)
            return
        b1, b2 = self.betas
        g = g.float()
        m = self.m[idx].mul_(b1).add_(g, alpha=1 - b1)  # type: ignore[index]
        v = self.v[idx].mul_(b2).addcmul_(g, g, value=1 - b2)  # type: ignore[index]
        t = self.t[idx] + 1  # type: ignore[index]
        self.m[idx], self.v[idx], self.t[idx] = m, v, t  # type: ignore[index]
        # mutant entry-adam-no-bias-correction: `m / (1 - b1**t)` -> `m`
        #   | engine_virtual behaviour:b_r_and_v
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        # mutant entry-adam-sign: `vec[idx] -=` -> `vec[idx] +=`
        #   | engine_virtual behaviour:b_r_and_v
        vec[idx] -= (self.lr * mhat / (vhat.sqrt() + self.eps)).to(vec.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Per-entry moments and counts."""
        return {"m": self.m, "v": self.v, "t": self.t, "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore per-entry moments and counts."""
        self.m, self.v, self.t, self.lr = state["m"], state["v"], state["t"], state["lr"]
