"""Every hypergradient of both applications equals autograd through the explicitly unrolled
graph (each step built with create_graph=True), in float64 on one fixed batch: LFM-DR's b, V
and r (both backends, several optimizers, BatchNorm, every similarity, the ablation switches,
the b modes and the variants' b paths) and NAS's alpha, r and V (DARTS second order, LFM-DARTS
full and shared, the authors' forms). One case table, one test; each case returns its
comparisons. The supernet's BatchNorm always uses batch statistics, so the reference and the
method under test normalise with exactly the same statistics.

Finite differences and kinks: with DARTS's step eps = 0.01 / ||v|| the weights move by 0.01
in norm, which on a tiny ReLU / max-pool supernet crosses enough kinks that the central
difference is off by O(1) (measured: relative error 1-9). So the fd backend is checked (a) at
DARTS's step on a smooth supernet (Softplus, no max-pool), to 1e-3, and (b) on the real
supernet with a small step (1e-6), which checks the implementation, not the approximation.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lfm.engine.functional import example_losses, params_of, per_example_loss
from lfm.engine.trilevel import IterOptions, Learner, iteration
from lfm.engine.virtual import StepRule, VirtualAdam, VirtualSGD
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
from lfm.reweight.encoder import FullEncoder, HeadEncoder
from lfm.reweight.function import attention, b_weights, label_match, reweight

# ------------------------------------------------------------------------------------ harness


@pytest.fixture(autouse=True)
def float64():
    """Float64 for these tests only (restored afterwards, other modules keep float32)."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny nets: avoid OpenMP spin-waits on a shared 2-core machine
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def unrolled(opt, params, grads, lr):
    """p' of one step of the virtual optimizer `opt`, with the graph to params and grads kept
    (the clip coefficient is a constant computed from `grads`, as in DARTS and the method)."""
    return opt.step(params, grads, lr, opt.clip_coef(grads))[0]


class Cmp(NamedTuple):
    """One comparison of a case: rel(got, want) < tol, or > tol where `differ` (a switch that
    must change the gradient); `nonzero`: the reference must not be zero either."""

    label: str
    got: torch.Tensor
    want: torch.Tensor
    tol: float
    nonzero: bool = False
    differ: bool = False


def alpha_cmps(got, want, tol, label="alpha"):
    """Alpha is (alpha_normal, alpha_reduce): one comparison each."""
    return [
        Cmp(f"{label}_{part}", g, w, tol)
        for part, g, w in zip(("normal", "reduce"), got, want, strict=True)
    ]


# ----------------------------------------------------------------------------- LFM-DR (engine)


D, C, K, N, M = 6, 3, 5, 12, 9  # input dim, classes, feature dim, train batch, val batch


class Net(nn.Module):
    """Contract-conforming classifier: body -> (B, K), head = Linear(K, C)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        layers = [nn.Linear(D, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(8, K), nn.Tanh())
        self.head = nn.Linear(K, C)
        self.feature_dim = K

    def forward(self, x):
        return self.head(self.body(x))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_tr, x_val = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    y_tr, y_val = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (M,), generator=g)
    b = 0.5 + torch.rand(N, generator=g)
    r = torch.randn(M, generator=g)
    return x_tr, y_tr, x_val, y_val, b, r


def make_sgd(kind, model, seed):
    if kind == "sgd":
        s = VirtualSGD()
    elif kind == "momentum-wd":
        s = VirtualSGD(0.9, 5e-2)
    elif kind == "nesterov-wd":
        s = VirtualSGD(0.9, 5e-2, nesterov=True)
    elif kind == "clip":
        s = VirtualSGD(0.9, 0.0, grad_clip=0.05)
    elif kind in ("adam", "adamw-clip"):
        s = VirtualAdam((0.8, 0.99), 1e-8, 5e-2, decoupled=kind != "adam")
        s.grad_clip = 0.05 if kind == "adamw-clip" else None
        if seed % 2 == 0:  # a later step: moments and a step count already exist
            g = torch.Generator().manual_seed(seed + 7)
            ps = params_of(model)
            s.t = 4
            s.exp_avg = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in ps.items()}
            s.exp_avg_sq = {k: 0.01 * torch.rand(v.shape, generator=g) for k, v in ps.items()}
        return s
    else:
        raise ValueError(kind)
    if s.momentum > 0 and seed % 2 == 0:  # a later step: momentum buffers already exist
        g = torch.Generator().manual_seed(seed + 7)
        s.buffers = {
            k: 0.1 * torch.randn(v.shape, generator=g) for k, v in params_of(model).items()
        }
    return s


def ce(module, params, buffers, x, y):
    """The per-example loss in force (cross-entropy, or a case's own loss)."""
    bufs = {k: v.clone() for k, v in buffers.items()}
    return example_losses(functional_call(module, (params, bufs), (x,)), y)


def smoothed(logits, y):
    """A user's own per-example loss: label-smoothed cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=0.2)


def reference(w1, w2, s1, s2, d, vnet, opts, lr1, lr2, shared=False, bank=None, weigh=None):
    """Autograd through the explicitly unrolled graph: returns dL/db, dL/dr, dL/dV.

    weigh: b -> stage 1's per-example weights (default b_weights(b, opts.b_mode))."""
    x_tr, y_tr, x_val, y_val, b, r = d
    bl, rl = b.clone().requires_grad_(), r.clone().requires_grad_()
    vp = {k: v.detach().clone().requires_grad_() for k, v in vnet.named_parameters()}
    vb = {k: v.clone() for k, v in vnet.named_buffers()}
    P1 = {k: v.detach().clone().requires_grad_() for k, v in w1.named_parameters()}
    l1 = ce(w1, P1, dict(w1.named_buffers()), x_tr, y_tr)
    w = b_weights(bl, opts.b_mode) if weigh is None else weigh(bl)
    L1 = (w * l1).mean()
    g1 = dict(zip(P1, torch.autograd.grad(L1, list(P1.values()), create_graph=True), strict=True))
    P1n = unrolled(s1, P1, g1, lr1)
    u = ce(w1, P1n, dict(w1.named_buffers()), x_val, y_val)
    if shared:  # W2 = head over W1''s body at W1' (constant features); V = those features
        body = {k[5:]: v.detach() for k, v in P1n.items() if k.startswith("body.")}
        f_tr = functional_call(w1.body, body, (x_tr,)).detach()
        f_val = functional_call(w1.body, body, (x_val,)).detach()
        e_tr, e_val = f_tr, f_val
        in_tr, in_val = f_tr, f_val
    else:
        e = functional_call(vnet, (vp, vb), (torch.cat([x_tr, x_val]),))
        e_tr, e_val = e[:N], e[N:]
        in_tr, in_val = x_tr, x_val
    yv, uu = y_val, u
    if bank is not None:
        e_val, yv, uu = (
            torch.cat([e_val, bank[0]]),
            torch.cat([y_val, bank[1]]),
            torch.cat([u, bank[2]]),
        )
    x = attention(e_tr, e_val, opts.similarity, opts.temperature) if opts.use_x else None
    z = label_match(y_tr, yv) if opts.use_z else None
    a = reweight(x, z, uu if opts.use_u else None, rl, normalise=opts.a_norm)
    P2 = {k: v.detach().clone().requires_grad_() for k, v in w2.named_parameters()}
    l2 = ce(w2, P2, dict(w2.named_buffers()), in_tr, y_tr)
    L2 = (a * l2).mean()
    g2 = dict(zip(P2, torch.autograd.grad(L2, list(P2.values()), create_graph=True), strict=True))
    P2n = unrolled(s2, P2, g2, lr2)
    L = ce(w2, P2n, dict(w2.named_buffers()), in_val, y_val).mean()
    if opts.b_path == "w2+w1val":
        L = L + opts.w1_val_weight * u.mean()
    if opts.b_path == "w1val":  # b from L_val(W1') alone; V and r from L_val(W2')
        (gb,) = torch.autograd.grad(opts.w1_val_weight * u.mean(), [bl], retain_graph=True)
        gs = torch.autograd.grad(L, [rl, *vp.values()], allow_unused=True)
        gv = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(gs[1:], vp.values(), strict=True)
        ]
        return gb, gs[0], gv
    wrt = [bl, rl, *vp.values()]
    gs = torch.autograd.grad(L, wrt, allow_unused=True)
    gv = [torch.zeros_like(p) if g is None else g for g, p in zip(gs[2:], vp.values(), strict=True)]
    return gs[0], gs[1], gv


CASES = {
    "sgd": dict(),
    "momentum-wd": dict(sgd="momentum-wd"),
    "momentum-wd-first-step": dict(sgd="momentum-wd", seed=1),
    "nesterov-wd": dict(sgd="nesterov-wd"),
    "clip": dict(sgd="clip"),
    "adam": dict(sgd="adam"),
    "adam-first-step": dict(sgd="adam", seed=1),
    "adamw-clip": dict(sgd="adamw-clip"),
    "adam-w1-val": dict(sgd="adam", opts=dict(b_path="w2+w1val", w1_val_weight=0.7)),
    "batchnorm": dict(sgd="momentum-wd", bn=True),
    "batchnorm-encoder": dict(bn=True, vbn=True),
    "cosine": dict(opts=dict(similarity="cosine")),
    "l2": dict(opts=dict(similarity="l2", temperature=0.5)),
    "no-x": dict(opts=dict(use_x=False)),
    "no-u": dict(opts=dict(use_u=False)),
    "no-z": dict(opts=dict(use_z=False)),
    "b-sigmoid": dict(opts=dict(b_mode="sigmoid")),
    "b-batch-normalised": dict(opts=dict(b_mode="batch-normalised")),
    "a-normalised": dict(opts=dict(a_norm=True)),
    "w2+w1val": dict(opts=dict(b_path="w2+w1val", w1_val_weight=0.7)),
    "w1val": dict(opts=dict(b_path="w1val", w1_val_weight=0.7)),
    # issue-13 candidates: w1-val's b path with a / mean(a), and with b / mean(b) as well
    "w1-val-a-norm": dict(sgd="momentum-wd", opts=dict(b_path="w2+w1val", a_norm=True)),
    "w1-val-a-norm-b-norm": dict(
        sgd="momentum-wd", opts=dict(b_path="w2+w1val", a_norm=True, b_mode="batch-normalised")
    ),
    "bank": dict(bank=True),
    "head-encoder": dict(head=True),
    "shared": dict(shared=True, sgd="momentum-wd"),
    "own-loss": dict(loss=smoothed, sgd="momentum-wd", opts=dict(b_path="w2+w1val")),
    # u and a rebuilt in stage 3 instead of held (LFM-DARTS's memory setting), on every term
    "u-rebuilt": dict(
        sgd="momentum-wd", bank=True, opts=dict(b_path="w2+w1val", hold_u_graph=False)
    ),
}


def run_case(name, backend):
    with per_example_loss(CASES[name].get("loss")):  # both sides use the case's loss
        return _run_case(name, backend)


def _run_case(name, backend):
    case = CASES[name]
    seed = case.get("seed", 0)
    torch.manual_seed(seed)
    w1, w2 = Net(case.get("bn", False)), Net(case.get("bn", False))
    if case.get("shared"):
        w2 = copy.deepcopy(w1.head)  # W2 = a head over W1's body
        nn.init.normal_(w2.weight)
    vnet = nn.Sequential(
        nn.Linear(D, 7),
        *([nn.BatchNorm1d(7)] if case.get("vbn") else []),
        nn.Tanh(),
        nn.Linear(7, 4),
    )
    d = data(seed)
    x_tr, y_tr, x_val, y_val, b, r = d
    bank = None
    if case.get("bank"):
        g = torch.Generator().manual_seed(3)
        bank = (
            torch.randn(4, 4, generator=g),
            torch.randint(0, C, (4,), generator=g),
            torch.rand(4, generator=g),
        )
        r = torch.cat([r, torch.randn(4, generator=g)])
        d = (x_tr, y_tr, x_val, y_val, b, r)
    opts = IterOptions(backend=backend, **case.get("opts", {}))
    s1, s2 = (
        make_sgd(case.get("sgd", "sgd"), w1, seed),
        make_sgd(case.get("sgd", "sgd"), w2, seed + 2),
    )
    lr1, lr2 = 0.3, 0.4
    ref_s1, ref_s2 = copy.deepcopy(s1), copy.deepcopy(s2)
    ref_w1, ref_w2, ref_v = copy.deepcopy(w1), copy.deepcopy(w2), copy.deepcopy(vnet)

    if case.get("head"):
        enc = HeadEncoder(nn.Tanh(), D, 100, 100, out_dim=4)  # frozen backbone, cached features
        ref_v = copy.deepcopy(enc.proj)
        tr_idx, val_idx = torch.arange(N), torch.arange(M) + 50
        embed = lambda p1n: enc.embed(x_tr, x_val, tr_idx, val_idx)  # noqa: E731
        v_params = list(enc.proj.parameters())
        d_ref = (torch.tanh(x_tr), y_tr, torch.tanh(x_val), y_val, b, r)
    elif case.get("shared"):
        cache = {}

        def feats(p1n):
            if not cache:
                body = {k[5:]: v for k, v in p1n.items() if k.startswith("body.")}
                with torch.no_grad():
                    cache["f"] = functional_call(w1.body, body, (torch.cat([x_tr, x_val]),))
            return cache["f"][:N], cache["f"][N:]

        embed, v_params = feats, []
    else:
        enc = FullEncoder(vnet)
        embed = lambda p1n: enc.embed(x_tr, x_val)  # noqa: E731
        v_params = list(vnet.parameters())

    rl = r.clone().requires_grad_()
    res = _iter(w1, w2, s1, s2, d, rl, embed, v_params, opts, lr1, lr2, case, bank)
    if case.get("head"):
        # reference: V = proj over tanh features, the same graph as a full encoder on tanh(x)
        gb, gr, gv = _ref_head(ref_w1, ref_w2, ref_s1, ref_s2, d, d_ref, ref_v, opts, lr1, lr2)
    else:
        gb, gr, gv = reference(
            ref_w1,
            ref_w2,
            ref_s1,
            ref_s2,
            d,
            ref_v,
            opts,
            lr1,
            lr2,
            shared=case.get("shared", False),
            bank=bank,
        )
    return res, gb, gr, gv


def _iter(w1, w2, s1, s2, d, rl, embed, v_params, opts, lr1, lr2, case, bank):
    x_tr, y_tr, x_val, y_val, b, _ = d
    w2_inputs = None
    if case.get("shared"):
        w2_inputs = embed
    return iteration(
        Learner(w1, s1),
        Learner(w2, s2),
        x_tr,
        y_tr,
        x_val,
        y_val,
        b,
        rl,
        embed,
        v_params,
        opts,
        lr1,
        lr2,
        w2_inputs=w2_inputs,
        bank=bank,
    )


def _ref_head(w1, w2, s1, s2, d, d_ref, proj, opts, lr1, lr2):
    """Head encoder = proj(tanh(x)): run the reference with V = proj on pre-featurised inputs."""

    class OnFeatures(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):  # x = cat of raw inputs: featurise then project
            return self.p(torch.tanh(x))

    return reference(w1, w2, s1, s2, d, OnFeatures(proj), opts, lr1, lr2)


def dr_case(name, backend, tol):
    """b, r and V against the unrolled graph (b and r's references must be non-zero)."""
    res, gb, gr, gv = run_case(name, backend)
    if gb is None:  # without u, b does not reach the validation loss at all
        assert name == "no-u", name
        out = [Cmp("b (zero without u)", res.grad_b, torch.zeros_like(res.grad_b), tol)]
    else:
        out = [Cmp("b", res.grad_b, gb, tol, nonzero=True)]
    out.append(Cmp("r", res.grad_r, gr, tol, nonzero=True))
    for i, (g, ref) in enumerate(zip(res.grad_v, gv, strict=False)):  # shared: V has none
        if float(ref.norm()) >= 1e-14:  # a V parameter the loss does not reach is not compared
            out.append(Cmp(f"V[{i}]", torch.zeros_like(ref) if g is None else g, ref, tol))
    return out


# ----------------------------------------------------------------------------------------- NAS


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
    """w' of the method's step rule, by the one unroll every reference uses."""
    return unrolled(rule.opt, w, g, rule.lr)


@contextmanager
def _float32_draws():
    """Initial weights, alphas and encoder drawn in float32 (cast to float64 after), the draws
    these cases were tuned on: a float64 draw is another draw, and on it fd-smooth's error at
    DARTS's step is 2e-2, not 3e-4 (the 1e-3 tolerance holds for this draw, not for every one).
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _setup(seed: int = 0, heads: int = 1, smooth: bool = False, dropout: float = 0.0, clip=None):
    torch.manual_seed(seed)
    ops = [[p for p in PRIMITIVES if p != "max_pool_3x3"]] * 14 if smooth else None
    with _float32_draws():
        # 3 cells: reduction cells at 1 and 2, so both alpha_normal and alpha_reduce are used
        net = Supernet(4, 3, 3, (1, 8, 8), heads=heads, normal_ops=ops, reduce_ops=ops)
        # larger alphas than DARTS's 1e-3 init so the softmax is far from uniform
        an, ar = (0.5 * t.double() for t in net.new_alphas(scale=1.0))
    net = net.double()
    if smooth:
        _smooth(net)
    net.set_skip_dropout(dropout)  # P-DARTS's dropout after skip-connect (train mode)
    w = {k: p.detach().clone() for k, p in net.named_parameters()}
    buf = {k: 0.1 * torch.randn_like(p) for k, p in w.items()}
    sgd = _sgd(0.05, 0.9, 3e-4, buf, clip=clip)
    xt, yt = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    xv, yv = torch.randn(4, 1, 8, 8), torch.tensor([1, 0, 1, 2])
    return net, w, (an, ar), sgd, (xt, yt), (xv, yv)


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


def darts_second(backend, smooth, fd_scale, tol, dropout, clip, nesterov=False):
    net, w, alphas, sgd, train, val = _setup(smooth=smooth, dropout=dropout, clip=clip)
    if nesterov:  # dw'/dg = -lr (1 + momentum); the unrolled reference sees that by itself
        sgd = _sgd(sgd.lr, sgd.opt.momentum, sgd.opt.weight_decay, sgd.opt.buffers, True, clip)
    masks = SameMasks(7)
    ref = _darts_reference(net, w, alphas, sgd, train, val, masks)
    got = darts_alpha_grad(net, w, alphas, train, val, sgd, 2, backend, fd_scale, masks).alphas
    return alpha_cmps(got, ref, tol)


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    with _float32_draws():
        enc = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4, 5),
        )  # fmt: skip
    return batch_stats_only(enc).double()


R = [1.0, -0.5, 2.0, 0.7]  # the validation examples' r


def _second_learner(w1, clip=None):
    """W2 near W1 with its own SGD state, the encoder V and its parameters."""
    w2 = {k: t + 0.05 * torch.randn_like(t) for k, t in w1.items()}
    sgd2 = _sgd(0.03, 0.9, 3e-4, {k: 0.1 * torch.randn_like(t) for k, t in w2.items()}, clip=clip)
    enc = _encoder()
    encp = {k: p.detach().clone() for k, p in enc.named_parameters()}
    return w2, sgd2, enc, encp


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
    emb = functional_call(enc, e, (torch.cat([xt, xv]),))
    x = torch.softmax(emb[:4] @ emb[4:].T, dim=1)
    z = (yt[:, None] == yv[None]).to(x.dtype)
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


def lfm_darts(backend, smooth, fd_scale, tol, dropout, clip):
    net, w1, alphas, sgd1, train, val = _setup(smooth=smooth, dropout=dropout, clip=clip)
    masks = SameMasks(7)
    w2, sgd2, enc, encp = _second_learner(w1, clip)
    r = torch.tensor(R)
    ref_a, ref_r, ref_e = _lfm_reference(
        net, w1, w2, alphas, r, enc, encp, sgd1, sgd2, train, val, masks
    )
    got = lfm_nas_grad(
        net, w1, w2, alphas, r, train, val, sgd1, sgd2, enc, encp, backend,
        fd_scale=fd_scale, masks=masks,
    )  # fmt: skip
    ge = torch.cat([got.encoder[k].flatten() for k in ref_e])
    re = torch.cat([ref_e[k].flatten() for k in ref_e])
    return [*alpha_cmps(got.alphas, ref_a, tol), Cmp("r", got.r, ref_r, tol), Cmp("V", ge, re, tol)]


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
    fc = functional_call
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
    z = (yt[:, None] == yv[None]).to(x.dtype)
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


def lfm_darts_shared(backend, smooth, fd_scale, tol, dropout, clip):
    net, w, alphas, sgd, train, val = _setup(heads=2, smooth=smooth, dropout=dropout, clip=clip)
    r = torch.tensor(R)
    masks = SameMasks(7)
    ref_a, ref_r = _lfm_shared_reference(net, w, alphas, r, sgd, train, val, masks)
    got = lfm_nas_grad_shared(
        net, w, alphas, r, train, val, sgd, backend, fd_scale=fd_scale, masks=masks
    )
    return [*alpha_cmps(got.alphas, ref_a, tol), Cmp("r", got.r, ref_r, tol)]


# the authors' form (issue 12): u reads a detached alpha; it must differ from the paper's form


def authors_full(backend, smooth, fd_scale, tol):
    """u_alpha=False is autograd through the unroll whose u reads a detached alpha, and it is
    a different gradient from the paper's (the du/dalpha term is not zero here)."""
    net, w1, alphas, sgd1, train, val = _setup(smooth=smooth)
    w2, sgd2, enc, encp = _second_learner(w1)
    r = torch.tensor(R)
    args = (net, w1, w2, alphas, r, train, val, sgd1, sgd2, enc, encp, backend)
    ref_a, ref_r, _ = _lfm_reference(
        net, w1, w2, alphas, r, enc, encp, sgd1, sgd2, train, val, u_alpha=False
    )
    got = lfm_nas_grad(*args, fd_scale=fd_scale, u_alpha=False)
    out = [*alpha_cmps(got.alphas, ref_a, tol), Cmp("r (same in both forms)", got.r, ref_r, tol)]
    if backend == "exact":  # the du/dalpha term is small (relative 1e-4 here): beyond fd's tol
        paper = lfm_nas_grad(*args, fd_scale=fd_scale).alphas
        out += [
            c._replace(tol=10 * tol, differ=True)
            for c in alpha_cmps(got.alphas, paper, tol, "paper's alpha")
        ]
    return out


def authors_shared(backend, tol):
    net, w, alphas, sgd, train, val = _setup(heads=2)
    r = torch.tensor(R)
    ref_a, ref_r = _lfm_shared_reference(net, w, alphas, r, sgd, train, val, u_alpha=False)
    got = lfm_nas_grad_shared(net, w, alphas, r, train, val, sgd, backend, u_alpha=False)
    paper = lfm_nas_grad_shared(net, w, alphas, r, train, val, sgd, backend).alphas
    differ = [
        c._replace(tol=1e-5, differ=True)
        for c in alpha_cmps(got.alphas, paper, tol, "paper's alpha")
    ]
    return [*alpha_cmps(got.alphas, ref_a, tol), Cmp("r", got.r, ref_r, tol), *differ]


# ------------------------------------------------------------------ the one case table and test

# id suffix -> (backend, smooth, fd_scale, tol, dropout, clip)
DARTS_CASES = {
    "exact": ("exact", False, 0.01, 1e-6, 0.0, None),
    "fd-smooth": ("fd", True, 0.01, 1e-3, 0.0, None),
    "fd-small-step": ("fd", False, 1e-6, 1e-4, 0.0, None),
    # skip dropout: every pass over a batch must draw the same masks, or the central
    # difference divides mask noise by eps
    "exact-dropout": ("exact", False, 0.01, 1e-6, 0.5, None),
    "fd-small-step-dropout": ("fd", False, 1e-6, 1e-4, 0.5, None),
    # a clipped step (the gradient norm here is about 1): the real step's clip is in the unroll
    "exact-clip": ("exact", False, 0.01, 1e-6, 0.0, 0.05),
}
# both LFM-DARTS forms' cases: exact, fd at DARTS's step on a smooth net, skip dropout, a clip
LFM_CASES = {k: DARTS_CASES[k] for k in ("exact", "fd-smooth", "exact-dropout", "exact-clip")}


def _table():
    cases = [
        pytest.param(partial(dr_case, name, backend, tol), id=f"dr-{name}-{backend}")
        for name in CASES
        for backend, tol in (("exact", 1e-6), ("fd", 1e-3))
    ]
    cases += [
        pytest.param(partial(darts_second, *c), id=f"darts_second-{k}")
        for k, c in DARTS_CASES.items()
    ]
    nesterov = partial(darts_second, *DARTS_CASES["exact"], nesterov=True)
    cases.append(pytest.param(nesterov, id="darts_second-exact-nesterov"))
    for fn in (lfm_darts, lfm_darts_shared):
        cases += [
            pytest.param(partial(fn, *c), id=f"{fn.__name__}-{k}") for k, c in LFM_CASES.items()
        ]
    cases += [
        pytest.param(partial(authors_full, "exact", False, 0.01, 1e-6), id="authors-full-exact"),
        pytest.param(partial(authors_full, "fd", True, 0.01, 1e-3), id="authors-full-fd-smooth"),
        pytest.param(partial(authors_shared, "exact", 1e-6), id="authors-shared-exact"),
    ]
    return cases


@pytest.mark.parametrize("case", _table())
def test_hypergradient_matches_unrolled_graph(case, request):
    name = request.node.callspec.id
    comparisons = case()
    assert comparisons, name
    for c in comparisons:
        e = rel(c.got, c.want)
        if c.differ:
            assert e > c.tol, f"{name}: {c.label} must differ (rel {e:.3g}): the switch did nothing"
        else:
            assert e < c.tol, f"{name}: {c.label} rel {e:.3g} >= {c.tol:g}"
        if c.nonzero:
            assert float(c.want.norm()) > 0, f"{name}: {c.label}'s reference is zero"


# -------------------------------------------------------------------------- the specific tests


def _b_grad(backend, y_val=None, x_val=None, b_path="w2"):
    torch.manual_seed(0)
    w1, w2, vnet = Net(), Net(), nn.Sequential(nn.Linear(D, 4), nn.Tanh())
    x_tr, y_tr, xv, yv, b, r = data(0)
    xv = xv if x_val is None else x_val
    yv = yv if y_val is None else y_val
    enc = FullEncoder(vnet)
    res = iteration(
        Learner(w1, VirtualSGD(0.9, 1e-3)),
        Learner(w2, VirtualSGD(0.9, 1e-3)),
        x_tr,
        y_tr,
        xv,
        yv,
        b,
        r.clone().requires_grad_(),
        lambda p: enc.embed(x_tr, xv),
        list(vnet.parameters()),
        IterOptions(backend=backend, b_path=b_path),
        0.3,
        0.3,
    )
    return res.grad_b


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_b_gradient_changes_when_only_validation_labels_change(backend):
    yv = data(0)[3]
    g0 = _b_grad(backend)
    g1 = _b_grad(backend, y_val=(yv + 1) % C)
    assert rel(g1, g0) > 1e-2


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_authors_code_b_gradient_ignores_validation_data(backend):
    xv, yv = data(0)[2], data(0)[3]
    g0 = _b_grad(backend, b_path="own-grad")
    g1 = _b_grad(backend, y_val=(yv + 1) % C, x_val=2 * xv + 1, b_path="own-grad")
    assert float(g0.norm()) > 0
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    # and it is -xi1/n * h . grad l_i(W1) with h = W1's own (clipped) training gradient
    torch.manual_seed(0)
    w1 = Net()
    x_tr, y_tr, _, _, b, _ = data(0)
    p = dict(w1.named_parameters())
    per = F.cross_entropy(w1(x_tr), y_tr, reduction="none")
    g = torch.autograd.grad((b * per).mean(), list(p.values()), retain_graph=True)
    gn = torch.sqrt(sum((t**2).sum() for t in g))
    h = [t * min(1.0, 5.0 / (float(gn) + 1e-6)) for t in g]
    want = torch.stack(
        [
            -0.3
            / N
            * sum(
                (hh * gg).sum()
                for hh, gg in zip(
                    h, torch.autograd.grad(per[i], list(p.values()), retain_graph=True), strict=True
                )
            )
            for i in range(N)
        ]
    )
    torch.testing.assert_close(g0, want, rtol=1e-3 if backend == "fd" else 1e-8, atol=1e-12)


def test_a_users_own_loss_reaches_every_hypergradient():
    """The own-loss case is not cross-entropy in disguise: with CE instead, b, r and V's
    hypergradients all change (so the match above checks the user's loss on every path)."""
    own = run_case("own-loss", "exact")[0]
    plain = _run_case("own-loss", "exact")[0]  # outside per_example_loss: cross-entropy
    assert rel(own.grad_b, plain.grad_b) > 1e-2 and rel(own.grad_r, plain.grad_r) > 1e-2
    assert rel(own.grad_v[0], plain.grad_v[0]) > 1e-2


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_authors_b_path_ignores_validation_data_and_has_the_opposite_sign(backend):
    """The `authors` b path (authors-code) never sees validation data either, and is
    +(1/n) h . grad l_i where `own-grad` is -(xi1/n) h . grad l_i: opposite signs."""
    xv, yv = data(0)[2], data(0)[3]
    g0 = _b_grad(backend, b_path="authors")
    g1 = _b_grad(backend, y_val=(yv + 1) % C, x_val=2 * xv + 1, b_path="authors")
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    own = _b_grad(backend, b_path="own-grad")
    big = own.abs() > 0.05 * own.abs().max()
    assert big.sum() > 3 and bool((torch.sign(g0[big]) == -torch.sign(own[big])).all())


# -- the hypergradient module's two shapes, against double backward ------------------------------


@pytest.mark.parametrize("backend,tol", [("exact", 1e-10), ("fd", 1e-4)])
def test_both_shapes_of_each_backend_match_double_backward(backend, tol):
    """grad_beta <grad_W f(W, beta), v> for beta = (per-example weights, a gate inside the
    network, like NAS's alpha): `mixed_grad` equals autograd's double backward, and the
    per-example `directional` form equals its weights part (both applications' one module)."""
    from lfm.engine.hypergrad import directional, mixed_grad

    torch.manual_seed(0)
    net = Net()
    x, y, *_ = data()
    p = params_of(net)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    wts, gate = 0.5 + torch.rand(N), torch.randn(C)

    def f(w, beta):
        logits = functional_call(net, w, (x,)) * beta[1]
        return (beta[0] * F.cross_entropy(logits, y, reduction="none")).mean()

    wl = {k: t.clone().requires_grad_(True) for k, t in p.items()}
    bl = (wts.clone().requires_grad_(True), gate.clone().requires_grad_(True))
    g = torch.autograd.grad(f(wl, bl), list(wl.values()), create_graph=True)
    inner = sum((gi * v[k]).sum() for gi, k in zip(g, wl, strict=True))
    ref = torch.autograd.grad(inner, bl)
    got = mixed_grad(f, p, (wts, gate), v, backend, fd_scale=1e-5 if backend == "fd" else 0.01)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < tol, (backend, rel(a, b))
    ones = (torch.ones(N), torch.ones(C))
    per_example = mixed_grad(f, p, ones, v, backend, fd_scale=1e-5 if backend == "fd" else 0.01)[0]
    dirn = directional(backend)(net, p, {}, x, y, v) / N
    assert rel(dirn, per_example) < tol, (backend, rel(dirn, per_example))


def test_darts_first_order_is_direct_gradient():
    net, w, alphas, _, _, val = _setup()
    a = tuple(t.clone().requires_grad_(True) for t in alphas)
    ref = torch.autograd.grad(ce_loss(net, w, a, *val), a)
    got = darts_alpha_grad(net, w, alphas, None, val, order=1).alphas
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(g, r)
