"""Time and memory of one architecture-search step: DARTS (1st, 2nd order) vs LFM-DARTS.

    python benchmarks/bench_nas_step.py --small            # seconds on a CPU
    python benchmarks/bench_nas_step.py --layers 8 --C 16 --batch 64 --device cuda   # the paper

One process, the same CIFAR-shaped random batches for every method; for time the methods take
turns step by step (median over steps). Peak memory, one method at a time: on CUDA,
torch.cuda.max_memory_allocated; on CPU, the peak bytes held by autograd's saved tensors
(the activations a step keeps for backward, which is what grows with unrolling), measured with
saved-tensor hooks; with --backend exact on a CPU (torch.func refuses those hooks), the growth of
the process's peak resident set (lfm.train.memory.PeakRSS), which counts allocator caching too.
The issue's targets: LFM-DARTS <= 2x DARTS 2nd order in time without parameter sharing,
<= 1.2x with sharing, memory <= 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lfm.data.types import DataBundle, Split
from lfm.nas.search import SearchConfig, _Learners, _Stage
from lfm.train.memory import PeakRSS


class _SavedBytes:
    """Peak bytes of tensors saved for backward, tracked through saved-tensor hooks."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        return _Token(t, n, self)

    def unpack(self, tok):
        return tok.t


class _Token:
    def __init__(self, t, n, owner):
        self.t, self.n, self.owner = t, n, owner

    def __del__(self):
        self.owner.now -= self.n


METHODS = {
    "darts-1st": dict(method="darts", order=1),
    "darts-2nd": dict(method="darts", order=2),
    "lfm-darts (full V)": dict(method="lfm-darts", encoder="full"),
    "lfm-darts (shared)": dict(method="lfm-darts", encoder="shared"),
}


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse flags, run every method, print a markdown table and return its rows."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (after 1 warm-up)")
    ap.add_argument("--backend", default="fd", choices=["fd", "exact"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    ap.add_argument("--small", action="store_true", help="quick mode: 5 cells, C=8, batch 16")
    ap.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast each step"
    )
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.C, args.batch = 5, 8, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    n = 4 * args.batch

    def split() -> Split:
        return Split(torch.randn(n, *shape), torch.randint(0, 10, (n,)), torch.arange(n))

    bundle = DataBundle("random-cifar", 10, shape, split(), split(), split())
    stage = _Stage(args.layers, 8, 1, 0, 0.0)
    xs = [
        tuple(
            t.to(dev)
            for t in (
                bundle.train.x[i * args.batch : (i + 1) * args.batch],
                bundle.train.y[i * args.batch : (i + 1) * args.batch],
                bundle.val.x[i * args.batch : (i + 1) * args.batch],
                bundle.val.y[i * args.batch : (i + 1) * args.batch],
                torch.arange(i * args.batch, (i + 1) * args.batch),
            )
        )
        for i in range(4)
    ]

    def learners(kw: dict) -> _Learners:
        cfg = SearchConfig(
            layers=args.layers, C=args.C, batch_size=args.batch, backend=args.backend, **kw
        )
        lfm = cfg.method.startswith("lfm")
        return _Learners(cfg, bundle, stage, None, None, lfm, dev, torch.Generator().manual_seed(0))

    amp = torch.autocast(dev.type, torch.bfloat16, enabled=args.precision == "bf16")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # time: the methods take turns step by step, so a change in the machine's load during the
    # run hits every method alike (the ratios are what we report)
    lns = {name: learners(kw) for name, kw in METHODS.items()}
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for s in range(args.steps + 1):
        for name, ln in lns.items():
            sync()
            t0 = time.perf_counter()
            with amp:
                ln.step(*xs[s % 4], arch=True)
            sync()
            if s > 0:  # the first step pays for allocation and lazy init
                times[name].append(time.perf_counter() - t0)
    del lns
    # memory: one method at a time, so nothing else is resident (one warm-up step first)
    mems = {}
    for name, kw in METHODS.items():
        ln = learners(kw)
        with amp:
            ln.step(*xs[0], arch=True)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            with amp:
                ln.step(*xs[1], arch=True)
            sync()
            mems[name] = torch.cuda.max_memory_allocated()
        elif args.backend == "exact":  # torch.func refuses saved-tensor hooks: resident set
            rss = PeakRSS()
            rss.start()
            ln.step(*xs[1], arch=True)
            growth = rss.growth()
            mems[name] = float("nan") if growth is None else growth * 2**20
        else:
            meter = _SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                ln.step(*xs[1], arch=True)
            mems[name] = meter.peak
        del ln
    rows = [(name, statistics.median(times[name]), mems[name] / 2**20) for name in METHODS]
    base_t = dict((r[0], r[1]) for r in rows)["darts-2nd"]
    base_m = dict((r[0], r[2]) for r in rows)["darts-2nd"]
    print(
        f"\ndevice {dev}, {args.layers} cells, C={args.C}, batch {args.batch}, "
        f"{args.size}x{args.size}, backend={args.backend}, threads {torch.get_num_threads()}, "
        f"{args.precision}"
    )
    mem_kind = (
        "peak CUDA MiB"
        if dev.type == "cuda"
        else "peak RSS growth MiB"
        if args.backend == "exact"
        else "peak saved-for-backward MiB"
    )
    print(f"\n| method | s / step | x DARTS-2nd | {mem_kind} | x DARTS-2nd |")
    print("|---|---|---|---|---|")
    for name, t, m in rows:
        xm = f"{m / base_m:.2f}" if base_m > 0 else "n/a"
        print(f"| {name} | {t:.3f} | {t / base_t:.2f} | {m:.1f} | {xm} |")
    return [
        {
            "method": n,
            "sec": t,
            "x_time": t / base_t,
            "mib": m,
            "x_mem": m / base_m if base_m else None,
        }
        for n, t, m in rows
    ]


if __name__ == "__main__":
    main()
