"""The virtual step equals torch.optim.SGD / Adam / AdamW's real step, over several iterations,
and mirrors a user's own optimizer (settings and state, read and written back)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.engine.functional import params_of
from lfm.engine.virtual import (
    EntryOptimizer,
    VirtualAdam,
    VirtualSGD,
    read_state,
    virtual_from_torch,
    write_back,
)
from lfm.errors import LFMError
from lfm.train.optim import OptimConfig


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


def _lockstep(real, opt, virt, virtual, steps, lr0, decay, clip, state_key):
    """`steps` real steps of `opt` on `real` and virtual steps on `virt` under one lr schedule:
    parameters equal to 1e-12 after each, and the optimizer state `state_key` equal too."""
    g = torch.Generator().manual_seed(1)
    for it in range(steps):
        x, y = _batch(g)
        lr = lr0 * (decay**it)  # a schedule
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
        new_p, new_state = virtual.step(params_of(virt), grads, lr, virtual.clip_coef(grads))
        virtual.commit(virt, new_p, new_state)
        for (k, a), b in zip(real.named_parameters(), virt.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{k} at step {it}")
        if state_key is not None:
            mine = virtual.buffers if state_key == "momentum_buffer" else virtual.exp_avg_sq
            for prm, (k, _) in zip(real.parameters(), virt.named_parameters(), strict=True):
                torch.testing.assert_close(opt.state[prm][state_key], mine[k])


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
    _lockstep(real, opt, virt, sgd, 5, 0.1, 0.9, clip, "momentum_buffer" if momentum else None)


def test_xi_is_minus_the_derivative_of_the_step():
    for nesterov in (False, True):
        sgd = VirtualSGD(0.9, 1e-2, nesterov)
        p = {"w": torch.randn(4, dtype=torch.float64)}
        sgd.buffers = {"w": torch.randn(4, dtype=torch.float64)}
        g = {"w": torch.randn(4, dtype=torch.float64, requires_grad=True)}
        new, _ = sgd.step(p, g, 0.3)
        (d,) = torch.autograd.grad(new["w"].sum(), g["w"])
        torch.testing.assert_close(d, torch.full_like(d, -sgd.xi(0.3)))


def _batch(g: torch.Generator):
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


@pytest.mark.parametrize(
    "kind,wd,clip",
    [("adam", 0.0, None), ("adam", 1e-2, None), ("adamw", 1e-2, None), ("adamw", 0.0, 0.1)],
)
def test_virtual_adam_equals_torch_adam(kind, wd, clip):
    """Six steps under an lr schedule: parameters and both moments match torch's to 1e-12."""
    real, virt = net(), net()
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls(real.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    adam = VirtualAdam((0.8, 0.99), 1e-6, wd, decoupled=kind == "adamw", grad_clip=clip)
    _lockstep(real, opt, virt, adam, 6, 1e-2, 0.8, clip, "exp_avg_sq")
    assert adam.t == 6


def test_adam_pullback_is_the_transposed_jacobian_of_the_step():
    """(dp'/dg)^T v from `pullback` equals autograd through `step`, at a later step."""
    adam = VirtualAdam(weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    adam.t = 3
    adam.exp_avg = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    adam.exp_avg_sq = {"w": torch.rand(5, generator=gen, dtype=torch.float64)}
    g = {"w": torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)}
    v = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    new, _ = adam.step(p, g, 0.05, 0.7)
    (ref,) = torch.autograd.grad((new["w"] * v["w"]).sum(), g["w"])
    torch.testing.assert_close(adam.pullback(p, g, 0.05, 0.7, v)["w"], ref)
    sgd = VirtualSGD(0.9, 1e-2, nesterov=True)
    torch.testing.assert_close(sgd.pullback(p, g, 0.3, 0.5, v)["w"], -sgd.xi(0.3, 0.5) * v["w"])


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_virtual_from_torch_reads_and_writes_the_users_optimizer(kind):
    """Two real steps of the user's optimizer, then the virtual twin read from it takes the
    third: equal to the real third step; write_back leaves the state torch's step leaves."""
    real, virt = net(), net()
    virt.load_state_dict(real.state_dict())
    make = {
        "sgd": lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
        ),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    }[kind]
    opt_r, opt_v = make(real.parameters()), make(virt.parameters())
    g = torch.Generator().manual_seed(3)
    batches = [_batch(g) for _ in range(3)]
    for i, (x, y) in enumerate(batches):
        opt_r.zero_grad()
        nn.functional.cross_entropy(real(x), y).backward()
        opt_r.step()
        if i < 2:  # the user's own loop for the first two steps
            opt_v.zero_grad()
            nn.functional.cross_entropy(virt(x), y).backward()
            opt_v.step()
    vo = virtual_from_torch(opt_v, virt)
    x, y = batches[2]
    p = {k: v.detach().clone().requires_grad_() for k, v in virt.named_parameters()}
    loss = nn.functional.cross_entropy(torch.func.functional_call(virt, p, (x,)), y)
    grads = dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))
    new_p, state = vo.step(params_of(virt), grads, opt_v.param_groups[0]["lr"])
    vo.commit(virt, new_p, state)
    write_back(vo, opt_v, virt)
    for a, b in zip(real.parameters(), virt.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(real.parameters(), virt.parameters(), strict=True):
        for key, val in opt_r.state[a].items():
            torch.testing.assert_close(
                torch.as_tensor(opt_v.state[b][key]).double(), torch.as_tensor(val).double()
            )
    read_state(vo, opt_v, virt)  # reading back what was written changes nothing
    if kind == "sgd":
        assert vo.buffers is not None
    else:
        assert vo.t == 3


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda ps: torch.optim.LBFGS(ps), "LBFGS is not supported"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda ps: torch.optim.Adam(ps, amsgrad=True), "amsgrad"),
        (lambda ps: torch.optim.Adagrad(ps), "Adagrad is not supported"),
        (
            lambda ps: torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 1}], lr=0.1),
            "2 parameter groups",
        ),
    ],
)
def test_an_optimizer_the_virtual_step_cannot_mirror_is_a_clear_error(make, needle):
    model = net()
    with pytest.raises(LFMError, match=needle) as e:
        virtual_from_torch(make(list(model.parameters())), model)
    assert "torch.optim.SGD" in str(e.value) and "AdamW" in str(e.value)  # names what works


def test_config_adam_has_a_virtual_twin():
    assert isinstance(VirtualSGD.from_config(OptimConfig(optimizer="adam")), VirtualAdam)


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
    torch.testing.assert_close(
        v[:3], ref.detach()[:3], rtol=1e-4, atol=1e-6
    )  # moments kept in fp32
    torch.testing.assert_close(v[3:], alone.detach(), rtol=1e-4, atol=1e-6)  # moments kept in fp32
