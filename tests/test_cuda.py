"""What only a CUDA device can check (skipped without one; `benchmarks/gpu_check.sh` runs them).

The same computation on the GPU and on the CPU gives the same numbers: one LFM-DR iteration's
hypergradients (float64, so only the order of summation differs), one LFM-DARTS search step
(float32), and a bf16 `lfm dr` run stays finite and trains like the fp32 one."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_dr_hypergradients_on_cuda_equal_the_cpu_ones():
    from test_hypergradients import Net, data, make_sgd
    from torch import nn

    from lfm.engine.trilevel import IterOptions, Learner, iteration
    from lfm.reweight.encoder import FullEncoder

    torch.manual_seed(0)
    nets = [Net().double(), Net().double(), nn.Sequential(nn.Linear(6, 4), nn.Tanh()).double()]
    batch = [t.double() if t.is_floating_point() else t for t in data(0)]
    out = {}
    for dev in ("cpu", "cuda"):
        w1, w2, v = (copy.deepcopy(n).to(dev) for n in nets)
        x_tr, y_tr, x_val, y_val, b, r = (t.to(dev) for t in batch)
        enc = FullEncoder(v)
        res = iteration(
            Learner(w1, make_sgd("sgd", w1, 0)), Learner(w2, make_sgd("sgd", w2, 2)),
            x_tr, y_tr, x_val, y_val, b, r.clone().requires_grad_(),
            lambda p, e=enc, a=x_tr, c=x_val: e.embed(a, c), list(v.parameters()), IterOptions(),
            0.3, 0.4,
        )  # fmt: skip
        out[dev] = (res.grad_b.cpu(), res.grad_r.cpu())
    for a, c in zip(out["cpu"], out["cuda"], strict=True):
        assert torch.allclose(a, c, rtol=1e-9, atol=1e-12)


def test_search_step_on_cuda_equals_the_cpu_one(digits_images):
    from lfm.nas.genotypes import num_edges
    from lfm.nas.ops import PRIMITIVES
    from lfm.nas.search import SearchConfig, _Learners, _plan

    bundle = digits_images(32, 32)
    cfg = SearchConfig(method="lfm-darts", layers=2, C=4, batch_size=16, warmup_epochs=0)
    ops = [list(PRIMITIVES)] * num_edges()
    out = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        L = _Learners(cfg, bundle, _plan(cfg, False)[0], ops, ops, True, dev, torch.Generator())
        tr, va = bundle.train, bundle.val
        L.step(*(t.to(dev) for t in (tr.x[:16], tr.y[:16], va.x[:16], va.y[:16])),
               torch.arange(16, device=dev), True)  # fmt: skip
        out[dev] = copy.deepcopy([a.detach().cpu() for a in L.alphas])
    for a, b in zip(out["cpu"], out["cuda"], strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bf16_lfm_run_on_cuda_trains_like_fp32():
    from lfm.config import RunConfig
    from lfm.data.config import DataConfig
    from lfm.train.trainer import Trainer

    acc = {}
    for p in ("fp32", "bf16"):
        cfg = RunConfig(method="lfm", data=DataConfig("digits"), epochs=3, device="cuda",
                        progress=False, precision=p)  # fmt: skip
        acc[p] = Trainer(cfg).run()["last"]["W1"]["test_acc"]
    assert abs(acc["bf16"] - acc["fp32"]) < 0.05, acc
