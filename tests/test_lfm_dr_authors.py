"""`authors-code` runs what the authors' code runs: b against a direct transcription of their rule.

The transcription below mirrors `DR/lfm-dr-class_imbalance/dr-lfm-imbalance.py` (GitHub
importZL/LFM) in plain PyTorch: stage 1 leaves W1's clipped gradient in `.grad` (lines 301-305),
`_hessian_vector_product1` takes the central difference at the old W1 (lines 391-416), the
result is added to b's zeroed gradient (353-365), clipped (367) and `optimizer_b` steps (373).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_lfm_dr import bundle, context  # tests/ is on sys.path under pytest
from torch import nn

from lfm.data.types import iterate_batches
from lfm.methods.lfm_dr import LFMDR, PRESETS
from lfm.train.optim import OptimConfig

CLIP_W, CLIP_B = 0.3, 0.02  # small, so both clips act on this tiny problem
STEPS = 3


@pytest.fixture(autouse=True)
def float64_one_thread():
    n, dt = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(dt)


def _concat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


def _hessian_vector_product1(model, vector, input, target, r=1e-2):
    """Their function, with `model.weight_b[:, i]` = the fresh model's ones (it is not in the
    state dict, so `model_old` keeps its initial ones)."""
    R = r / _concat(vector).norm()
    ones = torch.ones(len(target), requires_grad=True)
    for p, v in zip(model.parameters(), vector, strict=True):
        p.data.add_(v, alpha=R)
    loss = (F.cross_entropy(model(input), target, reduction="none") * ones).mean()
    grads_p = torch.autograd.grad(loss, [ones])
    for p, v in zip(model.parameters(), vector, strict=True):
        p.data.sub_(v, alpha=2 * R)
    loss = (F.cross_entropy(model(input), target, reduction="none") * ones).mean()
    grads_n = torch.autograd.grad(loss, [ones])
    for p, v in zip(model.parameters(), vector, strict=True):
        p.data.add_(v, alpha=R)
    return [(x - y).div_(2 * R) for x, y in zip(grads_p, grads_n, strict=True)]


def transcription(model, batches, n_b, slots_of, clipped):
    """b after len(batches) iterations of their rule; W1 = `model` with their optimizer_a."""
    optimizer_a = torch.optim.SGD(
        model.parameters(), 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    weight_b = torch.ones(n_b, requires_grad=True)
    optimizer_b = torch.optim.SGD([weight_b], 1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for i, (x, y) in enumerate(batches):
        slots = slots_of(i)
        model_old = copy.deepcopy(model)
        # step 1
        cost_w = F.cross_entropy(model(x), y, reduction="none")
        l_f = (cost_w * weight_b[slots]).mean()
        optimizer_a.zero_grad()
        l_f.backward()
        clipped.append(float(_concat([p.grad for p in model.parameters()]).norm()) > CLIP_W)
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_W)
        optimizer_a.step()
        # step 3 (b's part)
        optimizer_b.zero_grad(set_to_none=False)  # their torch zeroed in place
        d_lvalw2p_alpha = [weight_b.grad]  # should be zero
        vector = [p.grad.data for p in model.parameters()]
        finite_diff_1 = _hessian_vector_product1(model_old, vector, x, y)
        full = torch.zeros(n_b)
        full[slots] = finite_diff_1[0]
        for g, g_fd1 in zip(d_lvalw2p_alpha, [full], strict=True):
            g.data.sub_(g_fd1.data.mul(-1), alpha=1)
        clipped.append(float(weight_b.grad.norm()) > CLIP_B)
        nn.utils.clip_grad_norm_([weight_b], CLIP_B)
        optimizer_b.step()
    return weight_b.detach()


def _run(preset, b_index="example", steps=STEPS, clips=(CLIP_W, CLIP_B)):
    b = bundle()
    optim = OptimConfig("sgd", 0.05, 0.9, True, 5e-4, grad_clip=clips[0])
    ctx = context(b, steps=steps * 10, optim=optim)
    cfg = replace(PRESETS[preset], own_grad_clip=clips[0], b_index=b_index)
    if preset == "authors-code":
        cfg = replace(cfg, b_clip=clips[1])
    m = LFMDR(cfg)
    m.setup(ctx)
    w1_init = copy.deepcopy(m.w1.module)
    batches, logs = [], []
    for step, batch in enumerate(iterate_batches(b.train, 50, seed=ctx.seed, epoch=0)):
        if step == steps:
            break
        ctx.step = step
        batches.append((batch.x, batch.y, batch.idx))
        logs.append(m.step(batch, ctx))
    return m, w1_init, batches, logs


@pytest.mark.parametrize("b_index", ["example", "position"])
def test_b_matches_a_transcription_of_the_authors_code(b_index):
    m, w1_init, batches, logs = _run("authors-code", b_index)
    n = len(batches[0][1])

    def slots_of(i):
        return batches[i][2] if b_index == "example" else torch.arange(i * n, (i + 1) * n)

    clipped: list[bool] = []
    ref = transcription(w1_init, [(x, y) for x, y, _ in batches], len(m.b), slots_of, clipped)
    assert any(clipped[0::2]) and any(clipped[1::2])  # both clips were exercised
    assert m.b.dtype == torch.float64
    moved = (ref - 1).abs().max()
    assert moved > 1e-4  # b did move
    err = float((m.b - ref).abs().max() / moved)
    print(f"max |b - transcription| / max |b - 1| = {err:.2e}")
    assert err < 1e-6, err
    assert 0 <= logs[-1]["b_fell"] <= 1


def test_examples_that_agree_with_the_batch_gradient_go_down():
    """One iteration: b_i falls where g1 . grad l_i(W1) > 0 (authors-code) and rises there in
    the chain-rule form (own-grad-chain-rule), g1 computed here by plain autograd."""
    for preset, sign in (("authors-code", -1.0), ("own-grad-chain-rule", 1.0)):
        m, w1, batches, _ = _run(preset, steps=1, clips=(5.0, 5.0))  # clips as theirs
        x, y, idx = batches[0]
        params = list(w1.parameters())
        losses = F.cross_entropy(w1(x), y, reduction="none")
        g1 = torch.autograd.grad(losses.mean(), params, retain_graph=True)
        align = torch.stack(
            [
                _concat(torch.autograd.grad(li, params, retain_graph=True)) @ _concat(g1)
                for li in losses
            ]
        )
        moved = m.b[idx] - 1.0
        # where |grad b_i| = |align_i| / n is well above b's weight decay 5e-4 * b_i
        big = align.abs() / len(y) > 5e-3
        assert big.sum() > 10 and (align[big] > 0).any() and (align[big] < 0).any()
        agree = (torch.sign(moved[big]) == sign * torch.sign(align[big])).float().mean()
        assert agree == 1.0, (preset, float(agree))


def test_authors_fd_product_is_the_directional_derivative():
    """Their central difference with eps = 0.01/||g1|| is g1 . grad l_i to fd accuracy (on a
    smooth net: with ReLU a kink inside +-eps makes single entries differ)."""
    from lfm.engine.hypergrad import directional

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    p = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(20, 10), torch.randint(0, 3, (20,))
    g = {k: torch.randn_like(v) for k, v in p.items()}
    fd = directional("fd")(net, p, {}, x, y, g)
    exact = directional("exact")(net, p, {}, x, y, g)
    assert torch.allclose(fd, exact, rtol=1e-3, atol=1e-8)  # O(0.01^2) truncation


def test_variant_brings_its_preset():
    """`lfm dr --variant authors-code` (options {"variant": ...}) runs the authors' optimizer;
    today's form keeps its lazy Adam under its own name."""
    from lfm.methods.lfm_dr import LFMConfig

    cfg = LFMConfig.from_options({"variant": "authors-code"})
    assert (cfg.b_optim, cfg.b_lr, cfg.b_clip, cfg.b_index) == ("authors-sgd", 1e-2, 5.0, "example")
    assert cfg.iter_options().b_path == "authors"
    old = LFMConfig.from_options({"variant": "own-grad-chain-rule"})
    assert (old.b_optim, old.b_clip, old.iter_options().b_path) == ("adam", None, "own-grad")
    pos = LFMConfig.from_options({"preset": "authors-code", "b_index": "position"})
    assert pos.b_index == "position" and pos.b_optim == "authors-sgd"


def test_authors_b_optimizer_resumes_identically():
    """The momentum of the authors' optimizer_b is in the state dict: 8 steps, save, 8 more equal
    16 straight (position-indexed b, crossing an epoch boundary at step 12)."""
    import numpy as np
    from test_lfm_dr import train

    b = bundle()
    cfg = replace(PRESETS["authors-code"], b_index="position")
    ctx = context(b)
    m = LFMDR(cfg)
    m.setup(ctx)
    train(m, ctx, 8)
    state = copy.deepcopy(m.state_dict())
    stream_state = ctx.val_stream.state_dict()
    train(m, ctx, 16, start=8)
    ctx2 = context(b)
    m2 = LFMDR(cfg)
    m2.setup(ctx2)
    m2.load_state_dict(state)
    ctx2.val_stream.load_state_dict(stream_state)
    train(m2, ctx2, 16, start=8)
    np.testing.assert_array_equal(m.per_example()["b"], m2.per_example()["b"])


def test_authors_b_step_lowers_half_the_squared_batch_gradient():
    """(1/n) g1 . grad l_i is d/db_i of 1/2 ||g1(b)||^2 (g1 = grad of mean_i b_i l_i at W1, no
    clip active): one authors-code step on b lowers it on that batch at that W1, and the step
    with the opposite sign would raise it."""
    m, w1, batches, _ = _run("authors-code", steps=1, clips=(5.0, 5.0))
    x, y, idx = batches[0]
    params = list(w1.parameters())

    def half_sq(bvec):
        g = torch.autograd.grad((F.cross_entropy(w1(x), y, reduction="none") * bvec).mean(), params)
        return 0.5 * float(_concat(g).norm() ** 2)

    ones = torch.ones(len(y))
    assert float(_concat(torch.autograd.grad(F.cross_entropy(w1(x), y), params)).norm()) < 5.0
    before, after = half_sq(ones), half_sq(m.b[idx])
    mirrored = half_sq(2 * ones - m.b[idx])
    assert after < before - 1e-6 and mirrored > before, (before, after, mirrored)
