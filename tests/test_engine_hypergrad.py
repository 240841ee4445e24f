"""The engine's hypergradients for b, V and r equal autograd through the explicitly unrolled
three-stage graph (create_graph=True), for both backends, several optimizers, BatchNorm,
every similarity, the ablation switches, the b modes and the variants' b paths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lfm.engine.functional import example_losses, params_of, per_example_loss
from lfm.engine.trilevel import IterOptions, Learner, iteration
from lfm.engine.virtual import VirtualAdam, VirtualSGD
from lfm.reweight.encoder import FullEncoder, HeadEncoder
from lfm.reweight.function import attention, b_weights, label_match, reweight


@pytest.fixture(autouse=True)
def float64():
    """Float64 for these tests only (restored afterwards, other modules keep float32)."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny nets: avoid OpenMP spin-waits on a shared 2-core machine
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


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
    c1 = s1.clip_coef({k: v.detach() for k, v in g1.items()})
    P1n, _ = s1.step(P1, g1, lr1, c1)
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
    c2 = s2.clip_coef({k: v.detach() for k, v in g2.items()})
    P2n, _ = s2.step(P2, g2, lr2, c2)
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


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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


@pytest.mark.parametrize("backend,tol", [("exact", 1e-6), ("fd", 1e-3)])
@pytest.mark.parametrize("name", list(CASES))
def test_hypergradients_match_unrolled_graph(name, backend, tol):
    res, gb, gr, gv = run_case(name, backend)
    if gb is None:  # without u, b does not reach the validation loss at all
        assert name == "no-u" and float(res.grad_b.abs().max()) == 0.0
        gb = torch.ones(1)
    else:
        assert rel(res.grad_b, gb) < tol, (name, rel(res.grad_b, gb))
    assert rel(res.grad_r, gr) < tol, (name, rel(res.grad_r, gr))
    for g, ref in zip(res.grad_v, gv, strict=False):  # shared mode: V has no parameters
        g = torch.zeros_like(ref) if g is None else g
        assert rel(g, ref) < tol or float(ref.norm()) < 1e-14, (name, rel(g, ref))
    assert float(gb.norm()) > 0 and float(gr.norm()) > 0


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
