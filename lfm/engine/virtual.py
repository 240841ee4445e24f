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
"""

from __future__ import annotations

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
    def from_config(cls, cfg: OptimConfig, who: str = "learner") -> VirtualSGD:
        """The virtual twin of `make_optimizer(cfg)`; LFM's one-step unroll needs SGD."""
        if cfg.optimizer != "sgd":
            raise LFMError(
                f"LFM unrolls the {who}'s optimizer step, and only SGD (with momentum, weight "
                f"decay, nesterov) is implemented, but optim.optimizer is {cfg.optimizer!r}",
                "use --optimizer sgd (e.g. the 'cpu-sgd' or 'dr-paper' optim preset)",
            )
        return cls(cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.grad_clip)

    def clip_coef(self, grads: Params) -> float:
        """c = min(1, clip / (||g|| + 1e-6)), as `nn.utils.clip_grad_norm_` computes it."""
        if not self.grad_clip:
            return 1.0
        return min(1.0, self.grad_clip / (float(norm(grads)) + 1e-6))

    def xi(self, lr: float, clip_coef: float = 1.0) -> float:
        """-d p' / d g: the scalar the hypergradient of an unrolled step is multiplied by."""
        # mutant xi-ignores-nesterov: `((1.0 + self.momentum) if self.nesterov else 1.0)` -> `1.0`
        #   | engine_virtual
        return lr * clip_coef * ((1.0 + self.momentum) if self.nesterov else 1.0)

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
