"""`lfm.Reweighter`, the public API: your own module, optimizer and DataLoader, one path with
the CLI (the Trainer calls the same step), every method by one word, Adam, clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import lfm
from lfm.config import RunConfig
from lfm.data.config import DataConfig
from lfm.errors import LFMError
from lfm.train.optim import OptimConfig
from lfm.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class WithIndex(Dataset):
    """(x, y, i) for any map-style dataset (the shape lfm.Reweighter.step wants)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, y, i


def _plain(model: nn.Module) -> nn.Sequential:
    """The same network as a plain Sequential: no `body`, no `head` (the user's own module)."""
    return nn.Sequential(*copy.deepcopy(model.body), copy.deepcopy(model.head))


def test_one_path_the_api_with_a_users_loader_equals_lfm_dr():
    """50 steps of `lfm dr`'s run (Trainer, LFM-DR w1-val, SGD momentum 0.9 Nesterov wd 5e-4)
    and 50 steps through lfm.Reweighter with a plain nn.Sequential, a TensorDataset in a
    shuffling DataLoader with 2 workers and torch.optim.SGD, from the same initial weights and
    in the same batch order: b, r, W1 and W2 agree to 1e-6."""
    optim = OptimConfig("sgd", 0.05, 0.9, True, 5e-4, schedule="constant")
    cfg = RunConfig(
        method="lfm",
        data=DataConfig("digits", noise="flip:0.4", imbalance=1),
        method_options={"variant": "w1-val"},
        optim=optim,
        epochs=1,
        max_steps=50,
        batch_size=20,
        progress=False,
        out=None,
    )
    trainer = Trainer(cfg)
    m = trainer.method
    w1, w2, v = _plain(m.w1.module), _plain(m.w2.module), copy.deepcopy(m.V.net)
    trainer.run()

    bundle = trainer.bundle
    x_tr, y_tr = bundle.inputs(bundle.train.x), bundle.train.y
    x_val, y_val = bundle.inputs(bundle.val.x), bundle.val.y
    # the Trainer's first-epoch order is torch.randperm with this generator (data.types)
    # (the sampler gets its own generator: the loader draws its workers' seed from its own)
    data = WithIndex(TensorDataset(x_tr, y_tr))
    order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 0)
    loader = DataLoader(
        data, batch_size=20, sampler=RandomSampler(data, generator=order), num_workers=2
    )
    make = lambda ps: torch.optim.SGD(  # noqa: E731
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    torch.manual_seed(0)
    rw = lfm.Reweighter(
        w1,
        make(w1.parameters()),
        num_train=len(y_tr),
        val_data=(x_val, y_val),
        w2=w2,
        w2_optimizer=make(w2.parameters()),
        encoder=v,
        val_batch_size=20,
        seed=cfg.seed,
        preset="w1-val",
    )
    for step, (x, y, idx) in enumerate(loader):
        if step == 50:
            break
        rw.step(x, y, idx)

    def close(a, b, what):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        assert a.shape == b.shape, what
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        assert err < 1e-6, (what, err)

    close(rw.weights, m.b, "b")
    close(rw.method.r, m.r, "r")
    for name, mine, ref in (("W1", w1, m.w1.module), ("W2", w2, m.w2.module)):
        for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
            close(a.detach(), b.detach(), name)
    assert (rw.weights != 1).sum() > 500  # b really moved on the examples seen


def _digits(n_val_per_class: int = 10):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    val = torch.cat([torch.nonzero(y == c)[:n_val_per_class, 0] for c in range(10)])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[val] = False
    return x[rest], y[rest], x[val], y[val]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize(
    "method,options",
    [("lfm", {}), ("mwnet", {}), ("l2rw", {}), ("small-loss", {"rho": 0.3}), ("ce", {})],
)
def test_every_method_by_one_word_and_its_state_resumes(method, options):
    """The same loop for every method; state_dict / load_state_dict of the Reweighter (with
    the user's model and optimizer saved by the user) continues to the uninterrupted result."""
    x, y, xv, yv = _digits()

    def build():
        torch.manual_seed(0)
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        return net, opt, lfm.Reweighter(net, opt, len(y), (xv, yv), method, **options)

    batches = [torch.arange(i * 50, (i + 1) * 50) for i in range(12)]
    net, opt, rw = build()
    for idx in batches:
        logs = rw.step(x[idx], y[idx], idx)
    assert logs and all(np.isfinite(list(logs.values())))
    assert rw.weights.shape == (len(y),)

    net2, opt2, rw2 = build()
    for idx in batches[:6]:
        rw2.step(x[idx], y[idx], idx)
    saved = copy.deepcopy((net2.state_dict(), opt2.state_dict(), rw2.state_dict()))
    net3, opt3, rw3 = build()
    net3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    rw3.load_state_dict(saved[2])
    for idx in batches[6:]:
        rw3.step(x[idx], y[idx], idx)
    for a, b in zip(net.parameters(), net3.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(rw.weights, rw3.weights, rtol=0, atol=0, equal_nan=True)


def test_an_adam_users_optimizer_is_stepped_as_its_own_step_would():
    """With torch.optim.Adam, the user's optimizer holds the step count and moments afterwards,
    and one more plain Adam step of the user's own equals what Adam would do from there."""
    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rw = lfm.Reweighter(net, opt, len(y), (xv, yv), "mwnet")
    for i in range(5):
        idx = torch.arange(i * 40, (i + 1) * 40)
        rw.step(x[idx], y[idx], idx)
    p0 = next(iter(net.parameters()))
    assert int(opt.state[p0]["step"]) == 5 and opt.state[p0]["exp_avg"].abs().sum() > 0
    twin = copy.deepcopy(net)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    for n_, o_ in ((net, opt), (twin, twin_opt)):
        o_.zero_grad()
        nn.functional.cross_entropy(n_(x[:40]), y[:40]).backward()
        o_.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(opt.state[p0]["step"]) == 6


def test_suspects_are_the_flipped_labels():
    """Digits with 30% of the training labels flipped, 2 epochs of LFM-DR (w1-val): the 100
    most suspect examples are mostly flipped ones (measured 0.96; required 0.8, chance 0.3)."""
    x, y, xv, yv = _digits()
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(len(y), generator=g) < 0.3
    y_noisy = torch.where(flip, (y + 1) % 10, y)
    torch.manual_seed(0)
    net = _net()
    rw = lfm.Reweighter(
        net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), len(y), (xv, yv)
    )
    loader = DataLoader(WithIndex(TensorDataset(x, y_noisy)), batch_size=100, shuffle=True)
    for _ in range(6):
        for xb, yb, idx in loader:
            rw.step(xb, yb, idx)
    top = rw.suspects(100)
    precision = float(flip[top].float().mean())
    assert precision > 0.8, precision


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(optimizer=lambda net: torch.optim.LBFGS(net.parameters())), "LBFGS"),
        (dict(method="cb"), "not offered"),
        (dict(model=lambda: _net()), "nn.Module"),
        (dict(val_data=(torch.randn(5, 64), torch.zeros(5))), "int64"),
        (dict(val_data=(torch.randn(5, 64), torch.full((5,), 12))), "outputs"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, needle):
    net = _net()
    args = dict(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        num_train=100,
        val_data=(torch.randn(5, 64), torch.randint(0, 10, (5,))),
        method="lfm",
    )
    if callable(kwargs.get("optimizer")):
        kwargs = {**kwargs, "optimizer": kwargs["optimizer"](net)}
    args.update(kwargs)
    with pytest.raises(LFMError, match=needle):
        lfm.Reweighter(**args)


def test_an_index_outside_the_training_set_is_a_clear_error():
    net = _net()
    rw = lfm.Reweighter(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        10,
        (torch.randn(5, 64), torch.randint(0, 10, (5,))),
        "l2rw",
    )
    with pytest.raises(LFMError, match="outside 0..9"):
        rw.step(torch.randn(4, 64), torch.randint(0, 10, (4,)), torch.tensor([0, 1, 2, 10]))


def test_the_readme_example_runs_as_written(capsys):
    """The README's Python API example, executed verbatim: it trains, and what it prints says
    the mislabelled examples were weighted down (measured: mean b 1.158 clean vs 0.956
    mislabelled; 80% of the 50 most suspect are mislabelled, where 30% of all are; required:
    lower b, and at least 60%)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    clean, noisy = map(float, re.search(r"clean ([\d.]+), mislabelled ([\d.]+)", out).groups())
    share = float(re.search(r"most suspect: (\d+)%", out)[1])
    assert noisy < clean and share >= 60, out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lfm", "mwnet"])
def test_under_torchrun_each_process_passes_its_part_and_learns_what_one_does(tmp_path, method):
    """A user's own DDP script (tests/ddp_reweighter.py): two processes, each passing its half
    of every batch to `step`, end with the b / weights, W1 and W2 of one process on the whole
    batches (to 1e-5: sums of float32 parts in another order)."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "ddp_reweighter.py")
    from test_distributed import _env  # tests/ is on sys.path under pytest

    env = _env()
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    runs = (
        [sys.executable, script, str(one), method],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         script, str(two), method],
    )  # fmt: skip
    for cmd in runs:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    for k in a["per_example"]:
        torch.testing.assert_close(
            a["per_example"][k], b["per_example"][k], rtol=1e-5, atol=1e-6, equal_nan=True
        )
    for k in a["nets"]:
        for p, q in zip(a["nets"][k], b["nets"][k], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_users_own_loss_is_the_one_trained():
    """loss= is what the learner descends: one "ce" step with a label-smoothed loss equals
    torch.optim.SGD's step on that loss (and differs from a cross-entropy step)."""
    import torch.nn.functional as F

    def smoothed(logits, y):
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=0.3)

    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    net = _net()
    ref = copy.deepcopy(net)
    rw = lfm.Reweighter(
        net, torch.optim.SGD(net.parameters(), lr=0.5), len(y), (xv, yv), "ce", loss=smoothed
    )
    idx = torch.arange(64)
    rw.step(x[idx], y[idx], idx)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    smoothed(ref(x[idx]), y[idx]).mean().backward()
    opt.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    other = _net()
    rw2 = lfm.Reweighter(other, torch.optim.SGD(other.parameters(), lr=0.5), len(y), (xv, yv), "ce")
    rw2.step(x[idx], y[idx], idx)
    assert not torch.allclose(next(other.parameters()), next(net.parameters()))


def test_the_users_optimizer_is_the_truth_between_steps():
    """Steps the user takes with their own optimizer between Reweighter steps (a warm-up, say)
    are seen: their momentum is read before the next step, which then equals the step of a
    Reweighter built only after the user's steps."""
    x, y, xv, yv = _digits()

    def own_steps(net, opt):
        for i in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(
                net(x[i * 50 : (i + 1) * 50]), y[i * 50 : (i + 1) * 50]
            ).backward()
            opt.step()

    idx = torch.arange(200, 250)
    torch.manual_seed(0)
    a = _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    rw_a = lfm.Reweighter(a, opt_a, len(y), (xv, yv), "mwnet")  # built first
    own_steps(a, opt_a)
    torch.manual_seed(0)
    b = _net()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    own_steps(b, opt_b)
    torch.manual_seed(0)
    _net()  # the same draws as building `a` took
    rw_b = lfm.Reweighter(b, opt_b, len(y), (xv, yv), "mwnet")  # built after
    rw_a.step(x[idx], y[idx], idx)
    rw_b.step(x[idx], y[idx], idx)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_public_step_runs_under_autocast():
    """Under torch.autocast (bf16 on the CPU) the step runs, b moves, and the learners stay
    fp32 (the engine keeps a, losses and hypergradients in fp32)."""
    x, y, xv, yv = _digits()
    torch.manual_seed(0)
    net = _net()
    rw = lfm.Reweighter(
        net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), len(y), (xv, yv)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(4):
            idx = torch.arange(i * 50, (i + 1) * 50)
            logs = rw.step(x[idx], y[idx], idx)
    assert all(np.isfinite(list(logs.values())))
    assert (rw.weights[:200] != 1).all() and next(net.parameters()).dtype == torch.float32
