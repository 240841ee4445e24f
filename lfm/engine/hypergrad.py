"""Hypergradient backends: the mixed second derivatives of a one-step unroll, for every upper
variable of both applications.

Every hypergradient term of the one-step unroll W' = step(W, grad_W f(W, beta)) has the form

    grad_beta < grad_W f(W, beta), v >          (v = J^T dL/dW', see `virtual.py`)

where beta is what the level's loss depends on besides W. Two shapes of it occur:

- `directional`: beta = per-example weights w, f = mean_i w_i l_i(W) (LFM-DR's b, a, any
  per-example or per-class weighting), so the term is (1/n) [v . grad l_i(W)]_i: the derivative
  of the *vector* of per-example losses along v, with no Python loop over examples;
- `mixed`: beta = a tuple of tensors that enter the network itself (NAS's alpha), or a mix of
  both (alpha and the stage-2 weights a, in one pass).

Each shape has the same two interchangeable backends, registered in `BACKENDS` under one option
name (`backend`) for `lfm dr`, `lfm search` and the API:

- `exact`: forward-mode `torch.func.jvp` (of the loss vector; of grad_beta f for `mixed`,
  forward over reverse, whose reverse pass reaches beta only);
- `fd`: central differences at W + eps v and W - eps v with eps = 0.01 / ||v|| (DARTS), the
  norm in fp32; the per-example form always evaluates in fp32 (autocast off, half-precision
  parameters and inputs promoted).

Neither builds a double-backward graph, so neither needs create_graph through a compiled module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jvp

from lfm.engine.functional import Params, losses, norm
from lfm.errors import LFMError
from lfm.registry import Registry

Directional = Callable[[nn.Module, Params, Params, Tensor, Tensor, Params], Tensor]
Mixed = Callable[..., tuple[Tensor, ...]]
FD_SCALE = 0.01  # DARTS: eps = 0.01 / ||v||


@dataclass(frozen=True)
class Backend:
    """One way of computing both shapes of the mixed second derivative."""

    directional: Directional
    mixed: Mixed


BACKENDS: Registry[Backend] = Registry("hypergradient backend")


def flat_norm(v: Sequence[Tensor]) -> Tensor:
    """||v|| over all tensors, computed in fp32 (DARTS's eps = 0.01 / ||v||)."""
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in v))


def loss_jvp(
    module: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, g: Params
) -> Tensor:
    """[g . grad l_i(params)]_i, (B,), by one `torch.func.jvp`."""
    primals = {k: v.detach() for k, v in params.items()}
    tangents = {k: g[k].detach().to(v.dtype) for k, v in primals.items()}

    def f(p: Params) -> Tensor:
        return losses(module, p, buffers, x, y)

    return jvp(f, (primals,), (tangents,))[1]


def _fp32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def loss_fd(
    module: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, g: Params
) -> Tensor:
    """[g . grad l_i(params)]_i, (B,), by two forward passes at params +- eps g."""
    gn = float(norm(g))
    if gn == 0.0:
        return torch.zeros(len(y), device=y.device)
    eps = FD_SCALE / gn
    p = {k: _fp32(v.detach()) for k, v in params.items()}
    d = {k: _fp32(g[k].detach()).to(p[k].dtype) for k in p}
    xx = _fp32(x)
    dev = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type=dev, enabled=False):
        lp = losses(module, {k: p[k] + eps * d[k] for k in p}, buffers, xx, y)
        lm = losses(module, {k: p[k] - eps * d[k] for k in p}, buffers, xx, y)
    # mutant fd-difference-sign: `(lp - lm)` -> `(lm - lp)` | hypergradients:fd
    return (lp - lm) / (2 * eps)


def mixed_jvp(
    fn: Callable[[Params, tuple[Tensor, ...]], Tensor],
    w: Params,
    b: tuple[Tensor, ...],
    v: Params,
    fd_scale: float = FD_SCALE,
) -> tuple[Tensor, ...]:
    """grad_b <grad_w fn(w, b), v> exactly: the derivative along v of (w -> grad_b fn(w, b))."""

    # forward over reverse: its reverse pass reaches b only (no weight gradients), which beats
    # the vjp of grad_w fn by a quarter to a third on the supernet (measured on CPU)
    def grad_b(ww: Params) -> tuple[Tensor, ...]:
        return torch.func.grad(lambda bb: fn(ww, bb))(b)

    tangents = {k: v[k].to(t.dtype) for k, t in w.items()}  # autocast may hand bf16 vectors
    # forward over reverse does not run under autocast (functorch's duals meet bf16 casts):
    # this pass is fp32, as the per-example fd passes are
    dev = next(iter(w.values())).device.type if w else "cpu"
    with torch.autocast(device_type=dev if dev in ("cuda", "cpu") else "cpu", enabled=False):
        return tuple(jvp(grad_b, (w,), (tangents,))[1])


def mixed_fd(
    fn: Callable[[Params, tuple[Tensor, ...]], Tensor],
    w: Params,
    b: tuple[Tensor, ...],
    v: Params,
    fd_scale: float = FD_SCALE,
) -> tuple[Tensor, ...]:
    """grad_b <grad_w fn(w, b), v> by (grad_b fn(w + eps v, b) - grad_b fn(w - eps v, b)) / 2eps."""
    eps = fd_scale / flat_norm(list(v.values())).clamp_min(1e-12).item()
    grads = []
    for sign in (1.0, -1.0):
        wp = {k: w[k] + sign * eps * v[k] for k in w}
        bb = tuple(t.detach().requires_grad_(True) for t in b)
        grads.append(torch.autograd.grad(fn(wp, bb), bb, allow_unused=True))
    out = []
    for gp, gm, t in zip(grads[0], grads[1], b, strict=True):
        if gp is None:
            out.append(torch.zeros_like(t))
        else:
            # mutant mixed-fd-difference-sign: `(gp - gm)` -> `(gm - gp)` | hypergradients:fd
            out.append((gp - gm) / (2 * eps))
    return tuple(out)


BACKENDS.register("exact", "forward-mode jvp (exact)")(Backend(loss_jvp, mixed_jvp))
BACKENDS.register("fd", "central finite difference along v, eps = 0.01/||v||, fp32")(
    Backend(loss_fd, mixed_fd)
)


def _backend(name: str) -> Backend:
    if name not in BACKENDS.names():
        raise LFMError(
            f"hypergradient backend {name!r} is unknown",
            f"use one of {', '.join(BACKENDS.names())}",
        )
    return BACKENDS.get(name)


def directional(backend: str) -> Directional:
    """The per-example form of backend `backend` (exact | fd): [v . grad l_i(params)]_i."""
    return _backend(backend).directional


def mixed_grad(
    fn: Callable[[Params, tuple[Tensor, ...]], Tensor],
    w: Params,
    b: tuple[Tensor, ...],
    v: Params,
    backend: str = "exact",
    fd_scale: float = FD_SCALE,
) -> tuple[Tensor, ...]:
    """grad_b <grad_w fn(w, b), v>: the mixed second derivative of scalar `fn` along v.

    w, v: dicts of the same keys; b: a tuple of tensors. Returns one tensor per entry of b
    (zeros where fn does not depend on it). fd_scale: the finite-difference step is
    eps = fd_scale / ||v|| (DARTS: 0.01), i.e. the weights move by fd_scale in norm; across
    ReLU / max-pool kinks a step that size can be far from the derivative on small networks.

    Example
    -------
    >>> f = lambda w, b: (b[0] * (w["p"] ** 2)).sum()
    >>> mixed_grad(f, {"p": torch.ones(3)}, (torch.ones(3),), {"p": torch.ones(3)})
    (tensor([2., 2., 2.]),)
    """
    b = tuple(t.detach() for t in b)
    w = {k: t.detach() for k, t in w.items()}
    v = {k: t.detach() for k, t in v.items()}
    return _backend(backend).mixed(fn, w, b, v, fd_scale)
