"""`lfm-class`: one learned weight per class as LFM's upper variable (lfm/methods/lfm_class.py).

Its hypergradient is autograd's through the explicitly unrolled graph, and on imbalanced
digits it learns to weigh the rare classes up, which is what a per-class weight is for."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_hypergradients import C, Net, data, make_sgd, reference, rel
from torch import nn

from lfm.config import RunConfig
from lfm.data.config import DataConfig
from lfm.engine.trilevel import IterOptions, Learner, Upper, iteration
from lfm.reweight.encoder import FullEncoder
from lfm.reweight.function import b_weights
from lfm.train.trainer import Trainer


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("backend,tol", [("exact", 1e-6), ("fd", 1e-3)])
@pytest.mark.parametrize("b_mode", ["raw", "batch-normalised"])
@pytest.mark.parametrize("b_path", ["w2", "w2+w1val"])
def test_class_weight_hypergradient_matches_unrolled_graph(f64, backend, tol, b_mode, b_path):
    torch.manual_seed(0)
    w1, w2 = Net(), Net()
    vnet = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    x_tr, y_tr, x_val, y_val, _, r = data(0)
    big_b = 0.5 + torch.rand(C, generator=torch.Generator().manual_seed(5))
    d = (x_tr, y_tr, x_val, y_val, big_b, r)
    opts = IterOptions(backend=backend, b_mode=b_mode, b_path=b_path)
    s1, s2 = make_sgd("sgd", w1, 0), make_sgd("sgd", w2, 2)
    refs = copy.deepcopy((w1, w2, s1, s2, vnet))

    def weigh(v):
        return b_weights(v[y_tr], b_mode)

    enc = FullEncoder(vnet)
    res = iteration(
        Learner(w1, s1), Learner(w2, s2), x_tr, y_tr, x_val, y_val, Upper(big_b, weigh),
        r.clone().requires_grad_(), lambda p: enc.embed(x_tr, x_val), list(vnet.parameters()),
        opts, 0.3, 0.4,
    )  # fmt: skip
    gb, gr, _ = reference(*refs[:4], d, refs[4], opts, 0.3, 0.4, weigh=weigh)
    assert res.grad_b.shape == (C,)
    assert rel(res.grad_b, gb) < tol, rel(res.grad_b, gb)
    assert rel(res.grad_r, gr) < tol
    assert float(gb.norm()) > 0


def test_rare_classes_are_weighted_up_on_imbalanced_digits(tmp_path):
    """Digits with imbalance 10 (class 0 has ten times the examples of class 9), 8 epochs:
    the learned weights of the five rarest classes end above those of the five most common.
    Measured: see the assertion message."""
    cfg = RunConfig(
        method="lfm-class", data=DataConfig("digits", imbalance=10.0), epochs=8,
        batch_size=100, progress=False, out=str(tmp_path), method_options={"b_lr": 0.05},
    )  # fmt: skip
    res = Trainer(cfg).run()
    arrays = np.load(tmp_path / "per_example.npz")
    w = arrays["class_weight"]
    counts = np.bincount(arrays["label"], minlength=len(w))
    order = np.argsort(counts)  # rarest first
    rare, common = w[order[:5]].mean(), w[order[5:]].mean()
    assert rare > common + 0.05, (w.round(3).tolist(), counts.tolist(), rare, common)
    assert "lfm-class" in res["method"]
