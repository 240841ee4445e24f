"""Cost of the public step (`lfm.Reweighter.step` over the user's module and torch optimizer)
against the method's own step inside the Trainer's context, side by side in one process.

    python benchmarks/bench_api_step.py            # 1-D CNN on MNIST-1D-shaped data, batch 100
    python benchmarks/bench_api_step.py --small    # a tiny MLP, batch 16

Both paths run the same method code; the public one also reads the user's optimizer state before
each step and writes it back after. Each row pair is timed interleaved (A, B, A, B, ...) from the
same initial weights and batches, so drift of the machine falls on both; the table gives the
median seconds per step and the ratio public / method. Target: within 1.05.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lfm  # noqa: E402
from lfm.data.types import Batch, DataBundle, Split, Stream  # noqa: E402
from lfm.methods.base import METHODS, Context  # noqa: E402
from lfm.train.optim import OptimConfig  # noqa: E402

ROWS = [("lfm", "sgd"), ("lfm", "adam"), ("mwnet", "sgd"), ("l2rw", "sgd")]


def _model(small: bool) -> nn.Module:
    if small:
        return nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    return nn.Sequential(  # the MNIST-1D reference 1-D CNN (SPEC.md section 4)
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 25, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(125, 10),
    )


def _optim(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table; return its rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny MLP and batch (a quick run)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 100; 16)")
    ap.add_argument("--iters", type=int, default=30, help="timed steps per path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.small else 100)
    n, m = 20 * batch, 100
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    xv, yv = torch.randn(m, 40, generator=g), torch.randint(0, 10, (m,), generator=g)
    batches = [torch.randperm(n, generator=g)[:batch] for _ in range(args.iters + 2)]
    rows = []
    for method, kind in ROWS:
        torch.manual_seed(0)
        base = _model(args.small)
        # path A: the method inside a Trainer-style context (factories and a config)
        optim = OptimConfig(kind, 0.05 if kind == "sgd" else 1e-3, 0.9 if kind == "sgd" else 0.0)
        optim.weight_decay = 5e-4 if kind == "sgd" else 0.0
        train = Split(x, y, torch.arange(n))
        val = Split(xv, yv, torch.arange(m))
        bundle = DataBundle("bench", 10, (40,), train, val, val, prepare=lambda t, tr: t)
        copies = iter([copy.deepcopy(base) for _ in range(3)])  # V, W1, W2 (LFM-DR)
        opts = {"preset": "w1-val"} if method == "lfm" else {}
        ctx = Context(
            bundle, torch.device("cpu"), lambda it=copies: next(it), Stream(val, batch, seed=1),
            20, 10_000, lambda s: 1.0, optim, options=dict(opts),
        )  # fmt: skip
        a = METHODS.create(method)
        a.setup(ctx)
        # path B: the public object over the user's own module and optimizer
        user = copy.deepcopy(base)
        b = lfm.Reweighter(
            user, _optim(kind, user.parameters()), n, (xv, yv), method,
            val_batch_size=batch, **opts,
        )  # fmt: skip
        times: dict[str, list[float]] = {"method": [], "public": []}
        for i, idx in enumerate(batches):
            for name in ("method", "public") if i % 2 == 0 else ("public", "method"):
                t0 = time.perf_counter()
                if name == "method":
                    ctx.step = i
                    a.step(Batch(x[idx], y[idx], idx), ctx)
                else:
                    b.step(x[idx], y[idx], idx)
                if i >= 2:  # the first steps warm up (jvp decompositions, allocator)
                    times[name].append(time.perf_counter() - t0)
        ta, tb = statistics.median(times["method"]), statistics.median(times["public"])
        rows.append(
            {"method": method, "optimizer": kind, "sec_method": ta, "sec_public": tb,
             "ratio": tb / ta}
        )  # fmt: skip
    print(f"{'method':8s} {'optim':6s} {'method step':>12s} {'public step':>12s} {'ratio':>7s}")
    for r in rows:
        print(
            f"{r['method']:8s} {r['optimizer']:6s} {r['sec_method'] * 1e3:9.2f} ms "
            f"{r['sec_public'] * 1e3:9.2f} ms {r['ratio']:7.3f}"
        )
    return rows


if __name__ == "__main__":
    main()
