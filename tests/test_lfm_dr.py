"""LFM-DR as a Method: config, presets, short runs that learn, resume, NaN guard, SN."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lfm.data.types import DataBundle, Split, Stream, iterate_batches
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context
from lfm.methods.lfm_dr import LFMDR, LFMSN, PRESETS, LFMConfig
from lfm.train.optim import OptimConfig

D, C = 10, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLP(nn.Module):
    """Contract-conforming classifier (body + linear head), optionally with BatchNorm."""

    def __init__(self, bn: bool = False):
        super().__init__()
        norm = [nn.BatchNorm1d(32)] if bn else []
        self.body = nn.Sequential(nn.Linear(D, 32), *norm, nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, C)
        self.feature_dim = 16

    def forward(self, x):
        return self.head(self.body(x))


def blobs(n, g, noise=0.0):
    centers = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.randint(0, C, (n,), generator=g)
    x = centers[y] + torch.randn(n, D, generator=g)
    yn = y.clone()
    flip = torch.rand(n, generator=g) < noise
    yn[flip] = (y[flip] + 1) % C
    return Split(x, yn, torch.arange(n), y)


def bundle():
    g = torch.Generator().manual_seed(0)
    return DataBundle("blobs", C, (D,), blobs(600, g, 0.3), blobs(30, g), blobs(600, g))


def context(b, bn=False, steps=60, seed=0, optim=None):
    torch.manual_seed(seed)
    return Context(
        bundle=b,
        device=torch.device("cpu"),
        new_model=lambda: MLP(bn),
        val_stream=Stream(b.val, 30, seed=seed + 1),
        steps_per_epoch=12,
        total_steps=steps,
        lr_factor=lambda s: 1.0,
        optim=optim or OptimConfig("sgd", 0.05, 0.9, False, 5e-4),
        seed=seed,
    )


def train(method, ctx, steps, start=0):
    logs = []
    step = 0
    for epoch in range(100):
        for batch in iterate_batches(ctx.bundle.train, 50, seed=ctx.seed, epoch=epoch):
            if step >= start:
                ctx.step = step
                logs.append(method.step(batch, ctx))
            step += 1
            if step >= steps:
                return logs
    return logs


def accuracy(model, split):
    model.eval()
    with torch.no_grad():
        acc = (model(split.x).argmax(1) == split.y_true).float().mean().item()
    model.train()
    return acc


@pytest.mark.parametrize(
    "preset,bn",
    [
        ("paper", False),
        ("authors-code", False),
        ("own-grad-chain-rule", False),
        ("a-normalised", True),
        ("a-only", False),
        ("w1-val", True),
        ("w1-val-only", False),
        ("ps", False),
        ("fast", True),
    ],
)
def test_short_runs_learn(preset, bn):
    b = bundle()
    ctx = context(b, bn)
    m = LFMDR(PRESETS[preset])
    m.setup(ctx)
    logs = train(m, ctx, 40)
    assert all(np.isfinite(list(log.values())).all() for log in logs)
    # chance is 1/3; W1 trains on 30% flipped labels (CE-like), W2 on a-weighted examples
    assert accuracy(m.models()["W1"], b.test) > 0.55, preset
    assert accuracy(m.models()["W2"], b.test) > 0.85, preset
    pe = m.per_example()
    assert pe["b"].shape == (600,) and pe["a"].shape == (600,)
    assert np.isfinite(pe["a"]).all()  # 40 batches of 50 cover the 600 examples
    assert {"L1", "L2", "L_val", "a_mean", "b_mean", "hg_a", "hg_r"} <= set(logs[-1])


def test_registered_and_options_from_strings():
    assert "lfm" in METHODS and "lfm-sn" in METHODS
    cfg = LFMConfig.from_options(
        {
            "preset": "w1-val",
            "b_lr": "0.1",
            "use_x": "false",
            "encoder_dim": "none",
            "val_bank": "8",
        }
    )
    assert cfg.variant == "w1-val" and cfg.b_lr == 0.1 and cfg.use_x is False
    assert cfg.encoder_dim is None and cfg.val_bank == 8


@pytest.mark.parametrize(
    "field,value",
    [
        ("variant", "nope"),
        ("backend", "x"),
        ("similarity", "dotty"),
        ("b_lr", -1.0),
        ("encoder", "half"),
        ("val_bank", -2),
        ("b_mode", "soft"),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(LFMError, match=field):
        LFMConfig(**{field: value}).validate()
    with pytest.raises(LFMError, match="unknown option"):
        LFMConfig.from_options({"b_learning_rate": 1})


def test_adam_learners_unroll_adam():
    """With Adam learners, the learners' virtual steps are Adam's, and W2 still learns."""
    from lfm.engine.virtual import VirtualAdam

    b = bundle()
    ctx = context(b, optim=OptimConfig("adam", 1e-2, weight_decay=0.0))
    m = LFMDR()
    m.setup(ctx)
    assert isinstance(m.w1.opt, VirtualAdam) and isinstance(m.w2.opt, VirtualAdam)
    train(m, ctx, 40)
    assert m.w2.opt.t == 40 and accuracy(m.models()["W2"], b.test) > 0.85


@pytest.mark.parametrize("cls", [LFMDR, LFMSN])
def test_fd_backend_refuses_a_model_with_dropout(cls):
    """fd would difference two passes with different dropout masks: refused, exact is fine."""
    b = bundle()

    def ctx_with_dropout():
        ctx = context(b)
        ctx.new_model = lambda: nn.Sequential(MLP(), nn.Dropout(0.3))
        return ctx

    with pytest.raises(LFMError, match="dropout"):
        cls(replace_cfg(backend="fd", encoder="full")).setup(ctx_with_dropout())
    cls(replace_cfg(backend="exact", encoder="full")).setup(ctx_with_dropout())  # no error


def test_state_dict_round_trip_resumes_identically():
    b = bundle()
    cfg = replace_cfg(val_bank=20)
    ctx = context(b, bn=True)
    m = LFMDR(cfg)
    m.setup(ctx)
    train(m, ctx, 8)
    a = m.per_example()["a"]
    assert np.isfinite(a).sum() == 400 and np.isnan(a).sum() == 200  # NaN: never seen yet
    state = copy.deepcopy(m.state_dict())
    stream_state = ctx.val_stream.state_dict()
    train(m, ctx, 16, start=8)

    ctx2 = context(b, bn=True, seed=0)
    m2 = LFMDR(cfg)
    m2.setup(ctx2)
    m2.load_state_dict(state)
    ctx2.val_stream.load_state_dict(stream_state)
    train(m2, ctx2, 16, start=8)
    for k in ("W1", "W2"):
        for (n, p), q in zip(
            m.models()[k].state_dict().items(), m2.models()[k].state_dict().values(), strict=True
        ):
            assert torch.equal(p, q), (k, n)
    for k in ("b", "a"):
        np.testing.assert_array_equal(m.per_example()[k], m2.per_example()[k])
    assert torch.equal(m.r, m2.r)


def replace_cfg(**kw):
    from dataclasses import replace

    return replace(PRESETS["paper"], **kw)


def test_nan_names_level_and_step():
    b = bundle()
    b.train.x[:] = float("nan")
    ctx = context(b)
    m = LFMDR()
    m.setup(ctx)
    with pytest.raises(LFMError, match="stage 1.*step 0"):
        train(m, ctx, 1)


def test_head_encoder_caches_features_and_options_run():
    b = bundle()
    ctx = context(b)
    m = LFMDR(
        replace_cfg(
            encoder="head",
            similarity="cosine",
            val_bank=40,
            b_mode="sigmoid",
            backend="fd",
            encoder_dim=8,
        )
    )
    m.setup(ctx)
    train(m, ctx, 15)
    assert m.V._have["train"].sum() == 600 or m.V._have["train"].sum() >= 50 * 12
    assert m.bank["e"].shape[0] == 40


def test_single_network_train_reweight_retrain():
    b = bundle()
    ctx = context(b, steps=60)
    m = LFMSN()
    m.setup(ctx)
    logs = train(m, ctx, 60)
    assert "L1" in logs[0] and "L_val" in logs[-1]
    assert m.frozen is not None and accuracy(m.models()["W"], b.test) > 0.7
    state = copy.deepcopy(m.state_dict())
    m2 = LFMSN()
    m2.setup(context(b, steps=60))
    m2.load_state_dict(state)
    assert m2.frozen is not None
    assert isinstance(LFMSN(), LFMSN)


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_batchnorm_running_stats_updated_once_per_step(backend):
    """Only the real passes of stages 1 and 2 touch running stats, once each per iteration."""
    b = bundle()
    ctx = context(b, bn=True)
    m = LFMDR(replace_cfg(backend=backend))
    m.setup(ctx)
    ref1, ref2 = copy.deepcopy(m.w1.module), copy.deepcopy(m.w2.module)
    batch = next(iterate_batches(b.train, 50, seed=0))
    ctx.step = 0
    m.step(batch, ctx)
    with torch.no_grad():
        ref1(batch.x), ref2(batch.x)
    for mine, ref in ((m.w1.module, ref1), (m.w2.module, ref2)):
        for (k, v), w in zip(mine.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(v, w, msg=k)
    assert int(m.w1.module.body[1].num_batches_tracked) == 1
