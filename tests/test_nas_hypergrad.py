"""The NAS hypergradients agree with autograd through the explicitly unrolled graph.

Every comparison runs in float64 on one fixed batch. The supernet's BatchNorm always uses
batch statistics (no running stats), so the reference and the method under test normalise
with exactly the same statistics.

Finite differences and kinks: with DARTS's step eps = 0.01 / ||v|| the weights move by 0.01
in norm, which on a tiny ReLU / max-pool supernet crosses enough kinks that the central
difference is off by O(1) (measured: relative error 1-9). So the fd backend is checked (a) at
DARTS's step on a smooth supernet (Softplus, no max-pool), to 1e-3, and (b) on the real
supernet with a small step (1e-6), which checks the implementation, not the approximation.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfm.engine.virtual import StepRule, VirtualSGD
from lfm.nas.hypergrad import (
    SameMasks,
    ce_loss,
    darts_alpha_grad,
    head_keys,
    lfm_nas_grad,
    lfm_nas_grad_shared,
)
from lfm.nas.ops import PRIMITIVES
from lfm.nas.supernet import Supernet, batch_stats_only

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(net: nn.Module) -> nn.Module:
    """Swap every ReLU for a Softplus, so that finite differences converge at DARTS's step."""
    for m in net.modules():
        for name, c in list(m.named_children()):
            if isinstance(c, nn.ReLU):
                setattr(m, name, nn.Softplus(beta=5.0))
    return net


def _on(masks: SameMasks | None, batch: str):
    """The reference draws each batch's dropout masks as the method does (or none at all)."""
    return masks.on(batch) if masks is not None else nullcontext()


def _sgd(lr, momentum, wd, buf, nesterov=False, clip=None) -> StepRule:
    """The learner's step: torch SGD as a pure function, clipped at norm `clip` when given."""
    opt = VirtualSGD(momentum, wd, nesterov, clip)
    opt.buffers = buf
    return StepRule(opt, lr)


def _step(rule: StepRule, w, g):
    """w' with the graph to w and g kept (the clip coefficient is a constant, as in DARTS)."""
    return rule(w, g).params


def _setup(seed: int = 0, heads: int = 1, smooth: bool = False, dropout: float = 0.0, clip=None):
    torch.manual_seed(seed)
    ops = [[p for p in PRIMITIVES if p != "max_pool_3x3"]] * 14 if smooth else None
    # 3 cells: reduction cells at 1 and 2, so both alpha_normal and alpha_reduce are used
    net = Supernet(4, 3, 3, (1, 8, 8), heads=heads, normal_ops=ops, reduce_ops=ops).double()
    if smooth:
        _smooth(net)
    net.set_skip_dropout(dropout)  # P-DARTS's dropout after skip-connect (train mode)
    # larger alphas than DARTS's 1e-3 init so the softmax is far from uniform (a stronger test)
    an, ar = (0.5 * t.double() for t in net.new_alphas(scale=1.0))
    w = {k: p.detach().clone() for k, p in net.named_parameters()}
    buf = {k: 0.1 * torch.randn_like(p) for k, p in w.items()}
    sgd = _sgd(0.05, 0.9, 3e-4, buf, clip=clip)
    xt, yt = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    xv, yv = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 0, 1, 2])
    return net, w, (an, ar), sgd, (xt, yt), (xv, yv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------- DARTS


def _darts_reference(net, w, alphas, sgd, train, val, masks=None):
    """Autograd through w' = step(w, grad) (torch SGD's update) built with create_graph=True."""
    a = tuple(t.clone().requires_grad_(True) for t in alphas)
    w0 = {k: t.clone().requires_grad_(True) for k, t in w.items()}
    with _on(masks, "train"):
        lt = ce_loss(net, w0, a, *train)
    g = torch.autograd.grad(lt, list(w0.values()), create_graph=True)
    w1 = _step(sgd, w0, dict(zip(w0, g, strict=True)))
    with _on(masks, "val"):
        lv = ce_loss(net, w1, a, *val)
    return torch.autograd.grad(lv, a)


@pytest.mark.parametrize(
    "backend,smooth,fd_scale,tol,dropout,clip",
    [
        ("exact", False, 0.01, 1e-6, 0.0, None),
        ("fd", True, 0.01, 1e-3, 0.0, None),
        ("fd", False, 1e-6, 1e-4, 0.0, None),
        # skip dropout: every pass over a batch must draw the same masks, or the central
        # difference divides mask noise by eps
        ("exact", False, 0.01, 1e-6, 0.5, None),
        ("fd", False, 1e-6, 1e-4, 0.5, None),
        # a clipped step (the gradient norm here is about 1): the real step's clip is in the unroll
        ("exact", False, 0.01, 1e-6, 0.0, 0.05),
    ],
)
def test_darts_second_order_matches_unrolled_graph(backend, smooth, fd_scale, tol, dropout, clip):
    net, w, alphas, sgd, train, val = _setup(smooth=smooth, dropout=dropout, clip=clip)
    masks = SameMasks(7)
    ref = _darts_reference(net, w, alphas, sgd, train, val, masks)
    got = darts_alpha_grad(net, w, alphas, train, val, sgd, 2, backend, fd_scale, masks).alphas
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) < tol, (_rel(g, r), backend)


def test_darts_second_order_with_nesterov_uses_its_step_size():
    """With Nesterov, dw'/dg = -lr (1 + momentum); the unrolled reference sees that by itself."""
    net, w, alphas, sgd, train, val = _setup()
    sgd = _sgd(sgd.lr, sgd.opt.momentum, sgd.opt.weight_decay, sgd.opt.buffers, nesterov=True)
    ref = _darts_reference(net, w, alphas, sgd, train, val)
    got = darts_alpha_grad(net, w, alphas, train, val, sgd, 2, "exact").alphas
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) < 1e-6, _rel(g, r)


def test_darts_first_order_is_direct_gradient():
    net, w, alphas, _, _, val = _setup()
    a = tuple(t.clone().requires_grad_(True) for t in alphas)
    ref = torch.autograd.grad(ce_loss(net, w, a, *val), a)
    got = darts_alpha_grad(net, w, alphas, None, val, order=1).alphas
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(g, r)


# ------------------------------------------------------------------------------------ LFM-DARTS


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    enc = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 5),
    )  # fmt: skip
    return batch_stats_only(enc).double()


# both LFM-DARTS forms' cases: exact, fd at DARTS's step on a smooth net, skip dropout, a clip
LFM_CASES = [
    ("exact", False, 0.01, 1e-6, 0.0, None),
    ("fd", True, 0.01, 1e-3, 0.0, None),
    ("exact", False, 0.01, 1e-6, 0.5, None),
    ("exact", False, 0.01, 1e-6, 0.0, 0.05),
]


def _lfm_reference(
    net, w1, w2, alphas, r, enc, encp, sgd1, sgd2, train, val, masks=None, u_alpha=True
):
    """Autograd through W1' -> u -> a -> W2' -> L_val, every step built with create_graph.

    u_alpha=False: u's forward pass reads a detached copy of alpha (the authors' code)."""
    (xt, yt), (xv, yv) = train, val
    a_ = tuple(t.clone().requires_grad_(True) for t in alphas)
    rl = r.clone().requires_grad_(True)
    e = {k: t.clone().requires_grad_(True) for k, t in encp.items()}
    w1l = {k: t.clone().requires_grad_(True) for k, t in w1.items()}
    w2l = {k: t.clone().requires_grad_(True) for k, t in w2.items()}
    with _on(masks, "train"):
        l1 = ce_loss(net, w1l, a_, xt, yt)
    g1 = torch.autograd.grad(l1, list(w1l.values()), create_graph=True)
    w1p = _step(sgd1, w1l, dict(zip(w1l, g1, strict=True)))
    a_u = a_ if u_alpha else tuple(t.detach() for t in a_)
    with _on(masks, "val"):
        u = ce_loss(net, w1p, a_u, xv, yv, reduction="none")
    emb = torch.func.functional_call(enc, e, (torch.cat([xt, xv]),))
    x = torch.softmax(emb[:4] @ emb[4:].T, dim=1)
    z = (yt[:, None] == yv[None]).double()
    a = torch.sigmoid((x * z * u[None] * rl[None]).sum(1))
    with _on(masks, "train"):
        l2 = (a * ce_loss(net, w2l, a_, xt, yt, reduction="none")).mean()
    g2 = torch.autograd.grad(l2, list(w2l.values()), create_graph=True)
    w2p = _step(sgd2, w2l, dict(zip(w2l, g2, strict=True)))
    with _on(masks, "val"):
        lv = ce_loss(net, w2p, a_, xv, yv)
    keys = list(e)
    gr = torch.autograd.grad(lv, [*a_, rl, *[e[k] for k in keys]])
    return gr[:2], gr[2], dict(zip(keys, gr[3:], strict=True))


@pytest.mark.parametrize("backend,smooth,fd_scale,tol,dropout,clip", LFM_CASES)
def test_lfm_darts_matches_unrolled_graph(backend, smooth, fd_scale, tol, dropout, clip):
    net, w1, alphas, sgd1, train, val = _setup(smooth=smooth, dropout=dropout, clip=clip)
    masks = SameMasks(7)
    w2 = {k: t + 0.05 * torch.randn_like(t) for k, t in w1.items()}
    sgd2 = _sgd(0.03, 0.9, 3e-4, {k: 0.1 * torch.randn_like(t) for k, t in w2.items()}, clip=clip)
    r = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    enc = _encoder()
    encp = {k: p.detach().clone() for k, p in enc.named_parameters()}
    ref_a, ref_r, ref_e = _lfm_reference(
        net, w1, w2, alphas, r, enc, encp, sgd1, sgd2, train, val, masks
    )
    got = lfm_nas_grad(
        net, w1, w2, alphas, r, train, val, sgd1, sgd2, enc, encp, backend,
        fd_scale=fd_scale, masks=masks,
    )  # fmt: skip
    for g, ref in zip(got.alphas, ref_a, strict=True):
        assert _rel(g, ref) < tol, ("alpha", _rel(g, ref))
    assert _rel(got.r, ref_r) < tol, ("r", _rel(got.r, ref_r))
    ge = torch.cat([got.encoder[k].flatten() for k in ref_e])
    re = torch.cat([ref_e[k].flatten() for k in ref_e])
    assert _rel(ge, re) < tol, ("V", _rel(ge, re))


def _lfm_shared_reference(net, w, alphas, r, sgd, train, val, masks=None, u_alpha=True):
    """Autograd through the parameter-sharing unroll (see lfm_nas_grad_shared) with create_graph.

    a is a data weight in stage 2: it depends on alpha (through u) but W2's step does not
    differentiate a w.r.t. the shared body, so the u-path reads a constant copy of the weights.
    """
    (xt, yt), (xv, yv) = train, val
    k1, k2 = head_keys(w, 0), head_keys(w, 1)
    ks = [k for k in w if k not in k1 + k2]
    a_ = tuple(t.clone().requires_grad_(True) for t in alphas)
    rl = r.clone().requires_grad_(True)
    fc = torch.func.functional_call
    # stage 1 and u, on constant weights (graph to alpha only)
    wc = {k: t.clone().requires_grad_(True) for k, t in w.items()}
    with _on(masks, "train"):
        f_tr, (o1, _) = fc(net, wc, (xt, a_), {"all_heads": True})
    gh1 = torch.autograd.grad(F.cross_entropy(o1, yt), [wc[k] for k in k1], create_graph=True)
    h1p = _step(sgd, {k: wc[k] for k in k1}, dict(zip(k1, gh1, strict=True)))
    a_u = a_ if u_alpha else tuple(t.detach() for t in a_)  # the authors' form: a copy in u
    with _on(masks, "val"):
        f_val = fc(net, wc, (xv, a_u), {"all_heads": True})[0]
    u = F.cross_entropy(F.linear(f_val, h1p["heads.0.weight"], h1p["heads.0.bias"]), yv,
                        reduction="none")  # fmt: skip
    x = torch.softmax(f_tr.detach() @ f_val.detach().T, dim=1)
    z = (yt[:, None] == yv[None]).double()
    a = torch.sigmoid((x * z * u[None] * rl[None]).sum(1))
    # stage 2 on the body's loss L1 + L2, unrolled with create_graph
    wl = {k: t.clone().requires_grad_(True) for k, t in w.items()}
    with _on(masks, "train"):
        _, (o1, o2) = fc(net, wl, (xt, a_), {"all_heads": True})
    l2 = (a * F.cross_entropy(o2, yt, reduction="none")).mean()
    g = torch.autograd.grad(F.cross_entropy(o1, yt) + l2, [wl[k] for k in ks + k2],
                            create_graph=True)  # fmt: skip
    w2p = _step(sgd, {k: wl[k] for k in ks + k2}, dict(zip(ks + k2, g, strict=True)))
    with _on(masks, "val"):
        lv = F.cross_entropy(fc(net, w2p | {k: wl[k] for k in k1}, (xv, a_), {"head": 1}), yv)
    gr = torch.autograd.grad(lv, [*a_, rl])
    return gr[:2], gr[2]


@pytest.mark.parametrize("backend,smooth,fd_scale,tol,dropout,clip", LFM_CASES)
def test_lfm_darts_shared_matches_unrolled_graph(backend, smooth, fd_scale, tol, dropout, clip):
    net, w, alphas, sgd, train, val = _setup(heads=2, smooth=smooth, dropout=dropout, clip=clip)
    r = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    masks = SameMasks(7)
    ref_a, ref_r = _lfm_shared_reference(net, w, alphas, r, sgd, train, val, masks)
    got = lfm_nas_grad_shared(
        net, w, alphas, r, train, val, sgd, backend, fd_scale=fd_scale, masks=masks
    )
    for g, ref in zip(got.alphas, ref_a, strict=True):
        assert _rel(g, ref) < tol, ("alpha", _rel(g, ref))
    assert _rel(got.r, ref_r) < tol, ("r", _rel(got.r, ref_r))


# ------------------------------------------------------------- the authors' form (issue 12)


@pytest.mark.parametrize("backend,smooth,fd_scale,tol", [("exact", False, 0.01, 1e-6),
                                                         ("fd", True, 0.01, 1e-3)])  # fmt: skip
def test_lfm_darts_authors_form_matches_unrolled_graph_with_u_on_a_copy_of_alpha(
    backend, smooth, fd_scale, tol
):
    """u_alpha=False is autograd through the unroll whose u reads a detached alpha, and it is
    a different gradient from the paper's (the du/dalpha term is not zero here)."""
    net, w1, alphas, sgd1, train, val = _setup(smooth=smooth)
    w2 = {k: t + 0.05 * torch.randn_like(t) for k, t in w1.items()}
    sgd2 = _sgd(0.03, 0.9, 3e-4, {k: 0.1 * torch.randn_like(t) for k, t in w2.items()})
    r = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    enc = _encoder()
    encp = {k: p.detach().clone() for k, p in enc.named_parameters()}
    args = (net, w1, w2, alphas, r, train, val, sgd1, sgd2, enc, encp, backend)
    ref_a, ref_r, _ = _lfm_reference(
        net, w1, w2, alphas, r, enc, encp, sgd1, sgd2, train, val, u_alpha=False
    )
    got = lfm_nas_grad(*args, fd_scale=fd_scale, u_alpha=False)
    paper = lfm_nas_grad(*args, fd_scale=fd_scale)
    for g, ref, p in zip(got.alphas, ref_a, paper.alphas, strict=True):
        assert _rel(g, ref) < tol, ("alpha", _rel(g, ref))
        if backend == "exact":  # the du/dalpha term is small (relative 1e-4 here): beyond fd's tol
            assert _rel(g, p) > 10 * tol, "the switch changed nothing"
    assert _rel(got.r, ref_r) < tol  # r's gradient is the same in both forms


def test_lfm_darts_shared_authors_form_matches_unrolled_graph():
    net, w, alphas, sgd, train, val = _setup(heads=2)
    r = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    ref_a, ref_r = _lfm_shared_reference(net, w, alphas, r, sgd, train, val, u_alpha=False)
    got = lfm_nas_grad_shared(net, w, alphas, r, train, val, sgd, "exact", u_alpha=False)
    paper = lfm_nas_grad_shared(net, w, alphas, r, train, val, sgd, "exact")
    for g, ref, p in zip(got.alphas, ref_a, paper.alphas, strict=True):
        assert _rel(g, ref) < 1e-6, ("alpha", _rel(g, ref))
        assert _rel(g, p) > 1e-5, "the switch changed nothing"
    assert _rel(got.r, ref_r) < 1e-6
