"""The virtual step equals torch.optim.SGD's real step, over several iterations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.engine.functional import params_of
from lfm.engine.virtual import EntryOptimizer, VirtualSGD
from lfm.errors import LFMError
from lfm.train.optim import OptimConfig


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize(
    "momentum,wd,nesterov,clip",
    [
        (0.0, 0.0, False, None),
        (0.9, 5e-4, False, None),
        (0.9, 1e-2, True, None),
        (0.5, 1e-3, False, 0.1),
        (0.9, 0.0, True, 0.1),
    ],
)
def test_virtual_step_equals_torch_sgd(momentum, wd, nesterov, clip):
    real, virt = net(), net()
    opt = torch.optim.SGD(
        real.parameters(), lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov
    )
    sgd = VirtualSGD(momentum, wd, nesterov, clip)
    g = torch.Generator().manual_seed(1)
    for it in range(5):
        x, y = (
            torch.randn(16, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        lr = 0.1 * (0.9**it)  # a schedule
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        nn.functional.cross_entropy(real(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(real.parameters(), clip)
        opt.step()
        p = {k: v.detach().clone().requires_grad_() for k, v in virt.named_parameters()}
        loss = nn.functional.cross_entropy(torch.func.functional_call(virt, p, (x,)), y)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))
        c = sgd.clip_coef(grads)
        new_p, new_m = sgd.step(params_of(virt), grads, lr, c)
        sgd.commit(virt, new_p, new_m)
        for (k, a), b in zip(real.named_parameters(), virt.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{k} at step {it}")
        if momentum:
            for prm, (k, _) in zip(real.parameters(), virt.named_parameters(), strict=True):
                torch.testing.assert_close(opt.state[prm]["momentum_buffer"], sgd.buffers[k])


def test_xi_is_minus_the_derivative_of_the_step():
    for nesterov in (False, True):
        sgd = VirtualSGD(0.9, 1e-2, nesterov)
        p = {"w": torch.randn(4, dtype=torch.float64)}
        sgd.buffers = {"w": torch.randn(4, dtype=torch.float64)}
        g = {"w": torch.randn(4, dtype=torch.float64, requires_grad=True)}
        new, _ = sgd.step(p, g, 0.3)
        (d,) = torch.autograd.grad(new["w"].sum(), g["w"])
        torch.testing.assert_close(d, torch.full_like(d, -sgd.xi(0.3)))


def test_adam_learner_is_a_clear_error():
    with pytest.raises(LFMError, match="SGD"):
        VirtualSGD.from_config(OptimConfig(optimizer="adam"))


def test_entry_optimizer_moves_only_batch_entries():
    for kind in ("sgd", "adam"):
        v = torch.ones(10)
        opt = EntryOptimizer(10, kind, lr=0.1)
        opt.step(v, torch.tensor([2, 5, 2]), torch.tensor([1.0, -1.0, 1.0]))
        assert v[2] < 1 and v[5] > 1
        assert torch.all(v[[0, 1, 3, 4, 6, 7, 8, 9]] == 1)


def test_entry_adam_is_torch_adam_on_each_entry_it_sees():
    """Lazy per-entry Adam: an entry in every batch follows torch.optim.Adam exactly (moments,
    bias correction); an entry seen on k steps follows Adam over those k gradients alone."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(6, 4, generator=g, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    opt = EntryOptimizer(4, "adam", lr=0.1)
    ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    torch_adam = torch.optim.Adam([ref], lr=0.1)
    alone = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # entry 3, every 2nd step
    alone_adam = torch.optim.Adam([alone], lr=0.1)
    for t in range(6):
        idx = torch.tensor([0, 1, 2, 3]) if t % 2 == 0 else torch.tensor([0, 1, 2])
        opt.step(v, idx, grads[t, idx])
        ref.grad = grads[t].clone()
        torch_adam.step()
        if t % 2 == 0:
            alone.grad = grads[t, 3:].clone()
            alone_adam.step()
    torch.testing.assert_close(v[:3], ref.detach()[:3], rtol=1e-4, atol=1e-6)  # moments kept in fp32
    torch.testing.assert_close(v[3:], alone.detach(), rtol=1e-4, atol=1e-6)  # moments kept in fp32
