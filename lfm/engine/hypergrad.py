"""Hypergradient backends: the directional derivative of the vector of per-example losses.

Every hypergradient term of the one-step unroll is a mixed second derivative of the form

    d/dw_i  [ g . grad_W (mean_k w_k l_k(W)) ]  =  (1/n) * g . grad_W l_i(W)      for each i,

i.e. the derivative of the *vector* (l_1(W), ..., l_n(W)) along one direction g. Two
interchangeable backends compute it with no Python loop over examples:

- `exact`: one forward-mode `torch.func.jvp` of the per-example loss vector along g;
- `fd`: two forward passes at W + eps g and W - eps g, central difference
  (l(W + eps g) - l(W - eps g)) / (2 eps) with eps = 0.01 / ||g|| (DARTS), always in fp32
  (autocast off, half-precision parameters and inputs promoted).

Neither builds a double-backward graph, so neither needs create_graph through a compiled module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jvp

from lfm.engine.functional import Params, losses, norm
from lfm.registry import Registry

Backend = Callable[[nn.Module, Params, Params, Tensor, Tensor, Params], Tensor]
BACKENDS: Registry[Tensor] = Registry("hypergradient backend")
FD_SCALE = 0.01  # DARTS: eps = 0.01 / ||g||


@BACKENDS.register("exact", "forward-mode jvp of the per-example losses (exact)")
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


@BACKENDS.register("fd", "central finite difference along g, eps = 0.01/||g||, fp32")
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
    # mutant fd-difference-sign: `(lp - lm)` -> `(lm - lp)` | engine_hypergrad
    return (lp - lm) / (2 * eps)


def directional(backend: str) -> Backend:
    """The backend function named `backend` (exact | fd)."""
    return BACKENDS.get(backend)  # type: ignore[return-value]
