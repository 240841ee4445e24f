"""Cost of one LFM-DR iteration against a plain cross-entropy step, side by side in one process.

    python benchmarks/bench_dr_step.py                 # ResNet-32, CIFAR-shaped data, batch 100
    python benchmarks/bench_dr_step.py --small         # a tiny ResNet-8 at 16x16, batch 16
    python benchmarks/bench_dr_step.py --device cuda

Rows: plain CE step; LFM-DR (paper variant) with each hypergradient backend (exact jvp, fd)
and each encoder mode (full, head, shared). Columns: seconds per iteration and its ratio to the
CE step; the same in process CPU time (robust to other processes sharing the CPU; use
`--threads 1` so that thread spin-waits do not count); peak memory:
`torch.cuda.max_memory_allocated` on CUDA, and on CPU the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before each row), which also counts
allocator caching and is only indicative ("n/a" where /proc does not allow it).
Targets: head / shared at most 6x a CE step; exact within 1.3x of fd.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfm.data.types import DataBundle, Split, Stream, iterate_batches  # noqa: E402
from lfm.methods.base import Context  # noqa: E402
from lfm.methods.lfm_dr import LFMDR, LFMConfig  # noqa: E402
from lfm.train.memory import PeakRSS  # noqa: E402
from lfm.train.optim import OptimConfig, make_optimizer  # noqa: E402

ROWS = [  # (label, LFMConfig overrides) ; None = plain CE
    ("plain CE step", None),
    ("LFM-DR full, exact", dict(encoder="full", backend="exact")),
    ("LFM-DR full, fd", dict(encoder="full", backend="fd")),
    ("LFM-DR head, exact", dict(encoder="head", backend="exact")),
    ("LFM-DR head, fd", dict(encoder="head", backend="fd")),
    ("LFM-DR shared, exact", dict(encoder="shared", backend="exact")),
    ("LFM-DR shared, fd", dict(encoder="shared", backend="fd")),
]


def _model_factory(name: str, shape, device):
    try:
        if name == "fallback":
            raise ImportError
        from lfm.models import create_model

        create_model(name, 10, shape)
        return lambda: create_model(name, 10, shape).to(device), name
    except Exception:  # lfm.models missing (or asked for): a local contract-conforming CNN
        c = shape[0]

        class Fallback(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(c, 16, 3, padding=1),
                    nn.BatchNorm2d(16),
                    nn.ReLU(),
                    nn.Conv2d(16, 32, 3, 2, 1),
                    nn.BatchNorm2d(32),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                )
                self.head, self.feature_dim = nn.Linear(32, 10), 32

            def forward(self, x):
                return self.head(self.body(x))

        return lambda: Fallback().to(device), "fallback-cnn"


def _under(amp, step):
    """`step` run inside the autocast context `amp` (what `--precision bf16` does in a run)."""

    def run(b, ctx):
        with amp:
            return step(b, ctx)

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, return its rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny model and batch (a quick run)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 100; 16 small)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per row")
    ap.add_argument(
        "--model",
        default=None,
        help="registry model (default resnet32; resnet20 with --small) or fallback",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run (0 = CE)")
    ap.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast each step"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.small else 100)
    iters = args.iters or (2 if args.small else 5)
    shape = (3, 16, 16) if args.small else (3, 32, 32)
    if args.model == "fallback" and args.small:
        shape = (3, 8, 8)
    torch.manual_seed(0)
    n_tr, n_val = batch * (iters + 2), batch * 2
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(
            torch.randn(n, *shape, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            torch.arange(n),
        )

    bundle = DataBundle("random-cifar", 10, shape, split(n_tr), split(n_val), split(batch))
    name = args.model or ("resnet20" if args.small else "resnet32")
    factory, model_name = _model_factory(name, shape, device)
    optim = OptimConfig("sgd", 0.05, 0.9, False, 5e-4, "constant")
    rows_to_run = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    results = []
    for label, over in rows_to_run:
        gc.collect()
        ctx = Context(
            bundle,
            device,
            factory,
            Stream(bundle.val, batch, device=device),
            steps_per_epoch=iters + 1,
            total_steps=iters + 1,
            lr_factor=lambda s: 1.0,
            optim=optim,
        )
        if over is None:
            model = factory()
            opt = make_optimizer(model.parameters(), optim)

            def step(b, ctx, model=model, opt=opt):
                loss = nn.functional.cross_entropy(model(ctx.bundle.inputs(b.x, True)), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            method = LFMDR(LFMConfig(**over))
            method.setup(ctx)
            step = method.step
        amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        step = _under(amp, step)
        batches = list(iterate_batches(bundle.train, batch, device=device, shuffle=False))
        step(batches[0], ctx)  # warm-up (also fills the head encoder's cache for batch 0)
        rss = PeakRSS()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            rss.start()
        t, c = time.perf_counter(), time.process_time()
        for i in range(iters):
            ctx.step = i + 1
            step(batches[(i + 1) % len(batches)], ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t) / iters
        cpu = (time.process_time() - c) / iters
        if device.type == "cuda":
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            mem = rss.growth()
        results.append({"row": label, "sec": sec, "cpu_sec": cpu, "mem_mib": mem})
        del step
    ce = next((r["sec"] for r in results if r["row"] == "plain CE step"), None)
    mem_note = "peak CUDA alloc" if device.type == "cuda" else "peak RSS growth"
    print(
        f"model {model_name}, input {shape}, batch {batch}, device {device}, "
        f"{iters} timed iterations, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.precision}"
    )
    ce_cpu = next((r["cpu_sec"] for r in results if r["row"] == "plain CE step"), None)
    print(f"| row | s / iter | x CE step | CPU s / iter | x CE (CPU time) | {mem_note} (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = "" if ce is None else f"{r['sec'] / ce:.2f}"
        cratio = "" if not ce_cpu else f"{r['cpu_sec'] / ce_cpu:.2f}"
        mem = "n/a" if r["mem_mib"] is None else f"{r['mem_mib']:.0f}"
        r["x_ce"] = None if ce is None else r["sec"] / ce
        print(f"| {r['row']} | {r['sec']:.3f} | {ratio} | {r['cpu_sec']:.3f} | {cratio} | {mem} |")
    return results


if __name__ == "__main__":
    main()
