"""L2RW, Meta-Weight-Net and small-loss: exact meta-gradients and runs in the shared trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lfm.config import RunConfig
from lfm.data.config import DataConfig
from lfm.engine.functional import buffers_of, leaves, losses, params_of
from lfm.engine.virtual import VirtualAdam, VirtualSGD
from lfm.errors import LFMError
from lfm.methods import METHODS
from lfm.methods.meta import (
    WeightNet,
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_meta_grad,
    mwnet_reduce,
)
from lfm.methods.small_loss import estimate_noise_rate, keep_smallest
from lfm.train.trainer import Trainer

B, D, C = 7, 4, 3


def _tiny(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(D, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, C)]
    return nn.Sequential(*layers).double().train()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    xv = torch.randn(5, D, generator=g, dtype=torch.float64)
    yv = torch.randint(0, C, (5,), generator=g)
    return x, y, xv, yv


def _opt(model: nn.Module, momentum, wd: float, nesterov: bool, warm: bool):
    if momentum == "adam":  # Adam, first step or a later one with moments
        adam = VirtualAdam((0.8, 0.99), weight_decay=wd)
        if warm:
            g = torch.Generator().manual_seed(2)
            ps = params_of(model)
            adam.t = 3
            adam.exp_avg = {
                k: 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ps.items()
            }
            adam.exp_avg_sq = {
                k: 0.01 * torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in ps.items()
            }
        return adam
    opt = VirtualSGD(momentum, wd, nesterov)
    if warm and momentum > 0:  # a later step: momentum buffers already hold something
        g = torch.Generator().manual_seed(2)
        opt.buffers = {
            k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1
            for k, v in params_of(model).items()
        }
    return opt


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    scale = b.abs().max().clamp(min=1e-30)
    assert (a - b).abs().max() / scale < rtol, (a, b)


OPTIMS = [
    (0.0, 0.0, False, False),  # the plain step of the published code
    (0.9, 5e-4, False, False),  # first momentum step
    (0.9, 5e-4, False, True),  # later momentum step
    (0.9, 5e-4, True, True),  # nesterov
    ("adam", 1e-2, False, False),  # Adam, first step
    ("adam", 1e-2, False, True),  # Adam, a later step
]


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("momentum,wd,nesterov,warm", OPTIMS)
def test_l2rw_eps_grad_matches_unrolled_autograd(batchnorm, momentum, wd, nesterov, warm):
    model = _tiny(batchnorm)
    x, y, xv, yv = _data()
    opt = _opt(model, momentum, wd, nesterov, warm)
    lr = 0.3
    p, buf = params_of(model), buffers_of(model)
    fast = l2rw_eps_grad(model, p, buf, x, y, xv, yv, opt, lr)

    # Explicit unroll: eps -> grad(create_graph) -> virtual step -> clean loss -> d/d eps.
    eps = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    q = leaves(p)
    l = losses(model, q, buf, x, y)
    g = torch.autograd.grad((eps * l).sum(), list(q.values()), create_graph=True)
    p_virtual, _ = opt.step(q, dict(zip(q, g, strict=True)), lr)
    val = losses(model, p_virtual, buf, xv, yv).mean()
    (exact,) = torch.autograd.grad(val, eps)
    assert exact.abs().max() > 1e-8  # the check is not vacuous
    _close(fast, exact)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("momentum,wd,nesterov,warm", OPTIMS)
def test_mwnet_meta_grad_matches_unrolled_autograd(
    normalize, batchnorm, momentum, wd, nesterov, warm
):
    model = _tiny(batchnorm)
    torch.manual_seed(3)
    wnet = WeightNet(8).double()
    x, y, xv, yv = _data()
    opt = _opt(model, momentum, wd, nesterov, warm)
    lr = 0.3
    p, buf = params_of(model), buffers_of(model)
    fast, _ = mwnet_meta_grad(model, wnet, p, buf, x, y, xv, yv, opt, lr, normalize)

    q = leaves(p)
    l = losses(model, q, buf, x, y)
    coef = mwnet_reduce(wnet(l.detach()), normalize)
    g = torch.autograd.grad((coef * l).sum(), list(q.values()), create_graph=True)
    p_virtual, _ = opt.step(q, dict(zip(q, g, strict=True)), lr)
    val = losses(model, p_virtual, buf, xv, yv).mean()
    names = [k for k, _ in wnet.named_parameters()]
    exact = torch.autograd.grad(val, list(wnet.parameters()))
    for k, e in zip(names, exact, strict=True):
        assert e.abs().max() > 1e-12
        _close(fast[k], e)


def test_l2rw_weights_rule():
    w = l2rw_weights(torch.tensor([-1.0, 2.0, -3.0]))
    assert torch.allclose(w, torch.tensor([0.25, 0.0, 0.75]))
    assert torch.equal(l2rw_weights(torch.tensor([1.0, 0.5])), torch.zeros(2))
    assert torch.allclose(mwnet_reduce(torch.tensor([1.0, 3.0]), True), torch.tensor([0.25, 0.75]))
    assert torch.allclose(mwnet_reduce(torch.tensor([1.0, 3.0]), False), torch.tensor([0.5, 1.5]))
    assert torch.equal(mwnet_reduce(torch.zeros(2), True), torch.zeros(2))


def test_small_loss_pieces():
    assert keep_smallest(torch.tensor([3.0, 1.0, 2.0, 0.5]), 0.5).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert keep_smallest(torch.tensor([3.0, 1.0]), 0.99).sum() == 1  # never an empty batch
    assert keep_smallest(torch.tensor([3.0, 1.0]), 0.0).all()
    rate = estimate_noise_rate(
        torch.tensor([0.1, 0.2, 5.0, 6.0]), torch.tensor([0.1, 0.3, 0.5]), 1.0
    )
    assert rate == 0.5


def _cfg(method: str, **opts) -> RunConfig:
    return RunConfig(
        method=method,
        data=DataConfig("digits", noise="flip:0.4"),
        method_options=opts,
        epochs=2,
        max_steps=14,
        progress=False,
        out=None,
    )


@pytest.mark.parametrize(
    "method,opts",
    [("l2rw", {}), ("mwnet", {"virtual": "sgd"}), ("small-loss", {"rho": 0.3}), ("small-loss", {})],
)
def test_methods_train_and_resume(method, opts):
    assert method in METHODS
    trainer = Trainer(_cfg(method, **opts))
    results = trainer.run()
    assert 0 <= results["last"]["model"]["test_acc"] <= 1
    arrays = trainer.method.per_example()
    w = arrays["weight"]
    assert w.shape == (len(trainer.bundle.train),)
    seen = ~np.isnan(w)
    assert seen.sum() > 0 and (w[seen] >= 0).all()
    if method == "small-loss" and not opts:  # rho=auto was estimated after the warm-up epoch
        assert 0 <= float(arrays["rho"]) <= 0.8
    # the state round-trips: a fresh method loads it and continues
    other = Trainer(_cfg(method, **opts))
    other.method.load_state_dict(trainer.method.state_dict())
    a = next(iter(trainer.method.models().values())).state_dict()
    b = next(iter(other.method.models().values())).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_option_is_an_error():
    with pytest.raises(LFMError, match="unknown option"):
        Trainer(_cfg("l2rw", bogus=1))
    with pytest.raises(LFMError, match="rho"):
        Trainer(_cfg("small-loss", rho=1.5))
    with pytest.raises(LFMError, match="virtual"):
        Trainer(_cfg("mwnet", virtual="adam"))


@pytest.mark.parametrize("method", ["l2rw", "mwnet", "lfm"])
def test_meta_methods_train_with_adam_learners(method):
    """Adam learners (the virtual step is Adam's): 3 epochs on clean digits reach about the
    validation accuracy measured for each (l2rw 0.85, mwnet 0.89, lfm W1 0.91 / W2 0.91, of 100
    validation images; required 0.75, where an untrained net has about 0.1)."""
    cfg = RunConfig(
        method=method,
        data=DataConfig("digits", imbalance=1),
        epochs=3,
        progress=False,
        out=None,
    )
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay = "adam", 1e-2, 0.0
    results = Trainer(cfg).run()
    accs = {k: v["val_acc"] for k, v in results["last"].items()}
    assert all(a > 0.75 for a in accs.values()), accs
