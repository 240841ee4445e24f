"""What each method must *do*, on small fixed problems where right and wrong differ measurably.

The hypergradient tests check formulas against autograd; these check that the methods follow
them: an upper-level update lowers the objective it descends (a one-step check against the
objective's value, in float64), learned weights go down on examples that are certainly
mislabelled (or up, where the method's rule says so), and a resumed run keeps training to the
uninterrupted result. Each threshold sits well inside a margin measured on the same problem
(the figures are beside each test), so a sign flip, a dropped update or a lost state fails.

`python tests/mutants.py` applies the semantic mutants listed beside the code and reports which
test kills each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from test_lfm_dr import bundle, context  # tests/ is on sys.path under pytest

from lfm.data.types import DataBundle, iterate_batches
from lfm.engine.functional import buffers_of, params_of
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.lfm_dr import LFMDR, PRESETS
from lfm.methods.meta import mwnet_meta_grad
from lfm.nas.genotypes import num_edges
from lfm.nas.hypergrad import (
    SameMasks,
    ce_loss,
    darts_alpha_grad,
    lfm_nas_grad,
    lfm_nas_grad_shared,
)
from lfm.nas.ops import PRIMITIVES
from lfm.nas.search import SearchConfig, _Learners, _plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def float64() -> Iterator[None]:
    """A one-step change of an objective is 1e-6 to 1e-3: float64 leaves rounding at ~1e-15."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _blobs(dtype: torch.dtype = torch.float32) -> DataBundle:
    """3 separated Gaussian blobs, 600 training examples of which 30% are flipped to the next
    class (certainly mislabelled), 30 clean validation examples; inputs used as they are."""
    b = bundle()
    for s in (b.train, b.val, b.test):
        s.x = s.x.to(dtype)
    b.prepare = lambda x, train: x  # the default prepare casts to float32
    return b


def _train(m: Method, ctx: Context, stop: int, start: int = 0) -> None:
    """Steps start..stop-1 of the fixed batch order (batch 50, 12 per epoch), epoch hooks."""
    step = 0
    for epoch in range(10_000):
        ctx.epoch = epoch
        for batch in iterate_batches(ctx.bundle.train, 50, seed=ctx.seed, epoch=epoch):
            if step >= start:
                ctx.step = step
                m.step(batch, ctx)
            step += 1
            if step >= stop:
                return
        if step > start:
            m.on_epoch_end(ctx)


def _method(name: str, ctx: Context) -> Method:
    """`lfm[variant]` or a registry name, set up on `ctx`."""
    if name.startswith("lfm["):
        m: Method = LFMDR(PRESETS[name[4:-1]])
    else:
        m = METHODS.get(name)()
    m.setup(ctx)
    return m


# -- LFM-DR: every upper-level update descends its objective ------------------------------------

# The objective the b path follows, read from a step's logs (evaluated at the step's inputs):
# L_val(W2') for the paper's form; + w1_val_weight (1) * L_val(W1') for w1-val.
OBJECTIVE: dict[str, Callable[[dict], float]] = {
    "paper": lambda logs: logs["L_val"],
    "a-normalised": lambda logs: logs["L_val"],
    "w1-val": lambda logs: logs["L_val"] + logs["u_mean"],
}


@pytest.mark.parametrize(
    "preset,backend",
    [("paper", "exact"), ("paper", "fd"), ("a-normalised", "exact"), ("w1-val", "exact")],
)
def test_lfm_dr_b_r_and_v_updates_each_lower_the_objective_they_follow(float64, preset, backend):
    """One step at a later iteration (momentum, Adam moments and V already moved), then the same
    step re-run from the same state with only b, only r or only V set to its updated value: the
    objective must fall. Measured (float64): b -3.0e-6 (paper), -4.8e-6 (a-normalised), -1.4e-3
    (w1-val); r -1.0e-5 to -1.4e-5; V -9.4e-5 to -1.5e-4. A sign flip raises it by as much; a
    dropped update leaves it equal. Required: a fall of at least 1e-8 (rounding is ~1e-15)."""
    b = _blobs(torch.float64)
    ctx = context(b)
    m = LFMDR(replace(PRESETS[preset], backend=backend))
    m.setup(ctx)
    _train(m, ctx, 10)
    before, stream = copy.deepcopy(m.state_dict()), ctx.val_stream.state_dict()
    batch = next(iterate_batches(b.train, 50, seed=5, epoch=3))
    ctx.step = 10
    f = OBJECTIVE[preset]
    f0 = f(m.step(batch, ctx))
    after = copy.deepcopy(m.state_dict())
    put = {
        "b": lambda: m.b.copy_(after["b"]),
        "r": lambda: m.r.copy_(after["r"]),
        "V": lambda: m.V.load_state_dict(after["V"]),
    }
    for name, apply in put.items():
        m.load_state_dict(copy.deepcopy(before))
        ctx.val_stream.load_state_dict(stream)
        apply()
        f1 = f(m.step(batch, ctx))
        assert f1 < f0 - 1e-8, f"{name}'s update did not lower the objective: {f0} -> {f1}"


def test_lfm_dr_shared_mode_r_update_lowers_the_validation_loss(float64):
    """Parameter sharing (Table X): r still descends L_val(W2'), measured -8.5e-6. (b's path in
    this mode leaves out W2's input features at W1', by design; see lfm_dr's docstring.)"""
    b = _blobs(torch.float64)
    ctx = context(b)
    m = LFMDR(PRESETS["ps"])
    m.setup(ctx)
    _train(m, ctx, 10)
    before, stream = copy.deepcopy(m.state_dict()), ctx.val_stream.state_dict()
    batch = next(iterate_batches(b.train, 50, seed=5, epoch=3))
    ctx.step = 10
    f0 = m.step(batch, ctx)["L_val"]
    r_new = m.r.clone()
    m.load_state_dict(before)
    ctx.val_stream.load_state_dict(stream)
    m.r.copy_(r_new)
    f1 = m.step(batch, ctx)["L_val"]
    assert f1 < f0 - 1e-8, (f0, f1)


# -- weights on certainly mislabelled examples ---------------------------------------------------


@pytest.mark.parametrize(
    "name,key,steps,options,direction",
    [
        # measured AUROC of (-weight) for "mislabelled", seeds 0 / 1 / 2
        ("l2rw", "weight", 12, {}, "down"),  # 0.93 / 0.85 / 0.95 after one epoch
        ("mwnet", "weight", 240, {}, "down"),  # 1.00 / 1.00 / 1.00
        ("small-loss", "weight", 240, {"rho": 0.3}, "down"),  # 1.00 / 1.00 / 1.00
        ("lfm[paper]", "a", 240, {}, "down"),  # 1.00 / 1.00 / 1.00
        ("lfm[w1-val]", "a", 240, {}, "down"),  # 1.00 / 1.00 / 1.00
        ("lfm[w1-val]", "b", 240, {}, "down"),  # 1.00 / 1.00 / 1.00
        # the faithful form's known incentive (SPEC.md section 1): b rises on the mislabelled
        ("lfm[paper]", "b", 240, {}, "up"),  # 0.000 / 0.000 / 0.007
    ],
)
def test_learned_weights_on_mislabelled_examples(name, key, steps, options, direction):
    """On blobs with 30% of labels flipped, the method's per-example weight ranks the flipped
    examples low (AUROC > 0.8), or, for the paper's b, high (AUROC < 0.1)."""
    b = _blobs()
    ctx = context(b, steps=steps)
    ctx.options = dict(options)
    m = _method(name, ctx)
    _train(m, ctx, steps)
    w = m.per_example()[key]
    seen = ~np.isnan(w)
    noisy = (b.train.y != b.train.y_true).numpy()[seen]
    assert 0.2 < noisy.mean() < 0.4 and seen.mean() > 0.95
    auroc = roc_auc_score(noisy, -w[seen])
    if direction == "down":
        assert auroc > 0.8, auroc
    else:
        assert auroc < 0.1, auroc


def test_mwnet_update_lowers_the_clean_loss_after_the_virtual_step(float64):
    """Meta-Weight-Net's MLP step descends L_val(p'(theta)): with the MLP before and after one
    step, at the same parameters, batch and clean batch. Measured: -3.7e-4; required 1e-8."""
    b = _blobs(torch.float64)
    ctx = context(b)
    m = _method("mwnet", ctx)
    _train(m, ctx, 10)
    model, virtual, wnet = copy.deepcopy(m.model), copy.deepcopy(m.virtual), copy.deepcopy(m.wnet)
    stream = ctx.val_stream.state_dict()
    clean = next(ctx.val_stream)
    ctx.val_stream.load_state_dict(stream)
    batch = next(iterate_batches(b.train, 50, seed=5, epoch=3))
    ctx.step = 10
    m.step(batch, ctx)

    def meta_loss(net: torch.nn.Module) -> float:
        p, buf = params_of(model), buffers_of(model)
        _, loss = mwnet_meta_grad(
            model, net, p, buf, batch.x, batch.y, clean.x, clean.y, virtual, 0.05, m.normalize
        )
        return float(loss)

    f0, f1 = meta_loss(wnet), meta_loss(m.wnet)
    assert f1 < f0 - 1e-8, (f0, f1)


# -- architecture search: alpha (and LFM's r, V) descend the validation objective --------------


@pytest.fixture(scope="module")
def digits64(digits_images) -> DataBundle:
    """64 training and 64 validation digits as (1, 8, 8) float64 images (conftest's split)."""
    b = digits_images(64, 64)
    for s in (b.train, b.val, b.test):
        s.x = s.x.double()
    return b


def _search_objective(L: _Learners, batches, alphas, r=None, encoder=None) -> float:
    """The validation objective the search step's alpha gradient follows, at L's weights:
    DARTS L_val(w, alpha) (first order) or L_val(w'(alpha), alpha); LFM L_val(W2'(alpha, ...))."""
    (xt, yt), (xv, yv), vidx = batches
    masks = SameMasks(123)
    named1 = dict(L.net1.named_parameters())
    w1 = {k: p.detach() for k, p in named1.items()}
    if not L.lfm:
        view = L._rule(L.net1, L.opt1)
        return darts_alpha_grad(
            L.net1, w1, alphas, (xt, yt), (xv, yv), view, L.cfg.order, "exact", masks=masks
        ).loss_val
    r = L.r[vidx] if r is None else r
    if L.shared:
        return lfm_nas_grad_shared(
            L.net1, w1, alphas, r, (xt, yt), (xv, yv), L._rule(L.net1, L.opt1), "exact",
            masks=masks,
        ).loss_val  # fmt: skip
    named2 = dict(L.net2.named_parameters())
    enc = encoder if encoder is not None else L.encoder
    return lfm_nas_grad(
        L.net1, w1, {k: p.detach() for k, p in named2.items()}, alphas, r, (xt, yt), (xv, yv),
        L._rule(L.net1, L.opt1), L._rule(L.net2, L.opt2), enc,
        {k: p.detach() for k, p in enc.named_parameters()}, "exact", masks=masks,
    ).loss_val  # fmt: skip


@pytest.mark.parametrize(
    "method,kw",
    [
        ("darts", {"order": 1}),
        ("darts", {"order": 2}),
        ("lfm-darts", {}),
        ("lfm-darts", {"encoder": "shared"}),
    ],
)
def test_search_step_moves_alpha_down_its_validation_objective(float64, digits64, method, kw):
    """A search step (after one warm step, so Adam and momentum hold state) moves alpha, and at
    the step's weights the validation objective at the new alpha is lower than at the old one.
    Measured (float64, arch_lr 3e-3): -8.6e-4 to -2.7e-3. For LFM, r and V are checked the same
    way (r -8.7e-6, V -2.3e-5). Required falls: alpha 1e-4, r and V 1e-8. The weight step lowers
    the training loss on its batch (measured -0.51 to -0.55; required 0.1). P-DARTS runs this
    same step; what it adds (operation dropping) is tested in test_nas_space."""
    cfg = SearchConfig(
        method=method, layers=2, C=4, batch_size=16, w_lr=0.05, arch_lr=3e-3, vr_lr=3e-3,
        backend="exact", warmup_epochs=0, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    e = num_edges()
    L = _Learners(
        cfg, digits64, _plan(cfg, False)[0], [list(PRIMITIVES)] * e, [list(PRIMITIVES)] * e,
        method.startswith("lfm"), "cpu", torch.Generator().manual_seed(0),
    )  # fmt: skip
    tr, va = digits64.train, digits64.val
    vidx = torch.arange(16)
    batches = ((tr.x[:16], tr.y[:16]), (va.x[:16], va.y[:16]), vidx)
    L.step(tr.x[16:32], tr.y[16:32], va.x[16:32], va.y[16:32], vidx + 16, True)
    old = copy.deepcopy(L)
    L.step(*batches[0], *batches[1], vidx, True)
    a_old = tuple(a.detach() for a in old.alphas)
    a_new = tuple(a.detach() for a in L.alphas)
    f0 = _search_objective(old, batches, a_old)
    f1 = _search_objective(old, batches, a_new)
    assert f1 < f0 - 1e-4, f"alpha's step did not lower the objective: {f0} -> {f1}"
    # the weight step descends the training loss (the real step of W1, or of DARTS's net)
    with torch.no_grad():
        l_old = ce_loss(old.net1, dict(old.net1.named_parameters()), a_old, *batches[0])
        l_new = ce_loss(L.net1, dict(L.net1.named_parameters()), a_old, *batches[0])
    assert float(l_new) < float(l_old) - 0.1, ("weight step", float(l_old), float(l_new))
    if L.lfm:
        fr = _search_objective(old, batches, a_old, r=L.r[vidx].detach())
        assert fr < f0 - 1e-8, f"r's step did not lower the objective: {f0} -> {fr}"
        if L.encoder is not None:
            fv = _search_objective(old, batches, a_old, encoder=L.encoder)
            assert fv < f0 - 1e-8, f"V's step did not lower the objective: {f0} -> {fv}"


# -- resume: a resumed method keeps training to the uninterrupted result ------------------------


@pytest.mark.parametrize(
    "name,options",
    [
        ("ce", {}),
        ("focal", {}),
        ("l2rw", {}),
        ("mwnet", {}),
        ("small-loss", {}),  # rho=auto: estimated at the epoch end (step 12) after resuming
        ("lfm-sn", {}),  # the frozen snapshot is taken at step 12, after resuming
        ("lfm[w1-val]", {}),
    ],
)
def test_a_resumed_method_keeps_training_to_the_uninterrupted_result(name, options):
    """Train 0..20 straight; and 0..8, state_dict, a fresh method loads it and trains 8..20: the
    learners, optimizer-dependent weights and per-example arrays are bitwise equal."""
    b = _blobs()

    def fresh() -> tuple[Method, Context]:
        ctx = context(b, steps=24)
        ctx.options = dict(options)
        return _method(name, ctx), ctx

    straight, ctx = fresh()
    _train(straight, ctx, 20)

    first, ctx1 = fresh()
    _train(first, ctx1, 8)
    state, stream = copy.deepcopy(first.state_dict()), ctx1.val_stream.state_dict()
    at_8 = {n: copy.deepcopy(net.state_dict()) for n, net in first.models().items()}
    resumed, ctx2 = fresh()
    resumed.load_state_dict(state)
    ctx2.val_stream.load_state_dict(stream)
    _train(resumed, ctx2, 20, start=8)

    for learner, net in straight.models().items():
        got = resumed.models()[learner].state_dict()
        assert any(not torch.equal(v, at_8[learner][k]) for k, v in got.items()), learner
        for k, v in net.state_dict().items():
            assert torch.equal(v, got[k]), (learner, k)
    want, have = straight.per_example(), resumed.per_example()
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], have[k], err_msg=k)


@pytest.mark.parametrize("encoder", ["full", "shared"])
def test_search_real_step_is_torch_sgd_with_clipping(float64, digits64, encoder):
    """LFM-DARTS's W1' is the real update: after a step whose gradient is clipped (clip 0.01,
    far below the gradient's norm), W1 equals what torch.optim.SGD gives after
    clip_grad_norm_ on W1's own training gradient (in shared mode: on the head H1's)."""
    cfg = SearchConfig(
        method="lfm-darts", layers=2, C=4, batch_size=16, grad_clip=0.01, warmup_epochs=0,
        encoder=encoder,
    )  # fmt: skip
    torch.manual_seed(0)
    e = num_edges()
    L = _Learners(
        cfg, digits64, _plan(cfg, False)[0], [list(PRIMITIVES)] * e, [list(PRIMITIVES)] * e,
        True, "cpu", torch.Generator().manual_seed(0),
    )  # fmt: skip
    tr, va = digits64.train, digits64.val
    L.step(tr.x[16:32], tr.y[16:32], va.x[16:32], va.y[16:32], torch.arange(16, 32), True)
    old = copy.deepcopy(L)
    L.step(tr.x[:16], tr.y[:16], va.x[:16], va.y[:16], torch.arange(16), True)
    net, opt = old.net1, old.opt1
    a = tuple(t.detach() for t in old.alphas)
    head = [p for k, p in net.named_parameters() if k.startswith("heads.0.")]
    mine = head if encoder == "shared" else list(net.parameters())
    logits = net(tr.x[:16], a, head=0) if encoder == "shared" else net(tr.x[:16], a)
    grads = torch.autograd.grad(F.cross_entropy(logits, tr.y[:16]), mine)
    for p, g in zip(mine, grads, strict=True):
        p.grad = g
    assert float(torch.nn.utils.clip_grad_norm_(mine, 0.01)) > 0.1  # the clip is active
    opt.step()
    new = dict(L.net1.named_parameters())
    for k, p in net.named_parameters():
        if any(p is q for q in mine):
            assert torch.allclose(new[k], p, atol=1e-10, rtol=0), k
