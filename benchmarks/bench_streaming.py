"""An image folder streamed from disk against the same folder in memory, side by side.

    python benchmarks/bench_streaming.py                      # 30000 PNGs, budget 32 MiB
    python benchmarks/bench_streaming.py --images 200 --budget-mb 0.2   # a quick run
    python benchmarks/bench_streaming.py --root PATH --budget-mb 512    # your own folder

Writes a class-per-subfolder folder of random `--src-size` PNGs (unless `--root` is given) and
builds it twice with `build_data`: once with `memory_budget_mb` far above its decoded size (the
in-memory path) and once with `--budget-mb` below it (streaming, `--workers` loader processes).
Each row: build time; peak resident-set growth of this process over building the data and one
epoch of reading it (VmHWM, reset through /proc/self/clear_refs, `lfm.train.memory.PeakRSS`)
against the budget; the loader workers' private memory over the same stretch (Private_Clean +
Private_Dirty from /proc/PID/smaps_rollup, sampled every 20 ms, summed over workers; the pages
they share with this process are counted once, in its column); examples/s over that epoch of
`iterate_batches` -> `bundle.inputs` (data only), and over the first `--step-batches` batches
of a second epoch with a train step of a small CNN (SGD) on each, outside the memory window
(the model's activations are the same on both paths).

RSS figures count allocator caching and are indicative ("n/a" where /proc does not allow them).
glibc raises its mmap threshold each time a large block is freed, and then keeps freed batch
tensors cached in the heap (about 40 MiB here, on either path), so by default the benchmark
fixes the threshold at 128 KiB (mallopt M_MMAP_THRESHOLD) before anything is allocated: the
figure is then the memory the data path holds. `--malloc-default` keeps glibc's dynamic one.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfm.data import DataConfig, build_data, iterate_batches  # noqa: E402
from lfm.models import create_model  # noqa: E402
from lfm.train.memory import PeakRSS  # noqa: E402


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Pin glibc's mmap threshold (mallopt M_MMAP_THRESHOLD = -3), so that freed large blocks go
    back to the system at once instead of staying cached; False where it cannot be set."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))
    except (OSError, AttributeError):  # not glibc
        return False


def make_folder(root: Path, images: int, classes: int, size: int, seed: int = 0) -> None:
    """`images` random RGB PNGs of side `size` in root/train/class<k>/ (classes differ in tint)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        c = i % classes
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 160, (size, size, 3)) + (c * 90 // max(classes - 1, 1))
        Image.fromarray(px.astype(np.uint8)).save(d / f"{i:06d}.png", compress_level=1)


class WorkerMemory:
    """Peak of the summed private memory of this process's children, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.available = Path(f"/proc/{os.getpid()}/task").is_dir()

    def _children(self) -> list[str]:
        kids: list[str] = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                kids += (task / "children").read_text().split()
            except OSError:
                pass
        return kids

    def _private_mb(self, pid: str) -> float:
        total = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
        except (OSError, ValueError):  # the worker exited between listing and reading
            return 0.0
        return total / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, sum(self._private_mb(p) for p in self._children()))
            except OSError:
                self.available = False
                return
            time.sleep(self.every)

    def __enter__(self) -> WorkerMemory:
        if self.available:
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._t.join()


def run_path(
    cfg: DataConfig, batch: int, model_name: str, step_batches: int, seed: int = 0
) -> dict:
    """Build `cfg`'s bundle, read one epoch of train, then train on `step_batches` batches."""
    gc.collect()
    rss = PeakRSS()
    rss.start()
    # The memory window covers the data alone (building it, one epoch of reading it): a model's
    # activations are the same on both paths and would only blur what the budget governs.
    with WorkerMemory() as workers:
        t = time.perf_counter()
        bundle = build_data(cfg)
        load_s = time.perf_counter() - t
        n = len(bundle.train)
        t = time.perf_counter()
        for b in iterate_batches(bundle.train, batch, seed=seed, epoch=0):
            bundle.inputs(b.x, train=True)
        data_eps = n / (time.perf_counter() - t)
        rss_mb = rss.growth()

    torch.manual_seed(seed)
    model = create_model(model_name, bundle.num_classes, bundle.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t, seen = time.perf_counter(), 0
    for i, b in enumerate(iterate_batches(bundle.train, batch, seed=seed, epoch=1)):
        if i == step_batches:
            break
        loss = nn.functional.cross_entropy(model(bundle.inputs(b.x, train=True)), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(b)
    step_eps = seen / (time.perf_counter() - t)
    src = bundle.info["source"]
    return {
        "path": "streaming" if bundle.info["streaming"] else "in memory",
        "images": len(src["train_files"]),
        "decoded_mb": src["decoded_mb"],
        "budget_mb": cfg.memory_budget_mb,
        "workers": cfg.loader_workers if bundle.info["streaming"] else 0,
        "load_s": load_s,
        "rss_mb": rss_mb,
        "workers_mb": workers.peak if workers.available else None,
        "data_eps": data_eps,
        "step_eps": step_eps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, return its rows (streaming first)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default=None, help="an existing image folder (default: generate one)")
    ap.add_argument("--images", type=int, default=30000, help="images to generate")
    ap.add_argument("--classes", type=int, default=10, help="classes to generate")
    ap.add_argument("--src-size", type=int, default=48, help="side of the generated PNGs")
    ap.add_argument("--image-size", type=int, default=32, help="side images are resized to")
    ap.add_argument("--budget-mb", type=float, default=32.0, help="memory budget of the stream")
    ap.add_argument("--workers", type=int, default=2, help="loader processes when streaming")
    ap.add_argument("--batch", type=int, default=100, help="batch size")
    ap.add_argument("--step-batches", type=int, default=30, help="batches with a train step")
    ap.add_argument("--model", default="cnn", help="registry model for the train-step column")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--malloc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then counts cached freed batches)",
    )
    args = ap.parse_args(argv)
    pinned = False if args.malloc_default else fix_mmap_threshold()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lfm-bench-stream-") as tmp:
        if args.root:
            root = Path(args.root)
        else:
            root = Path(tmp) / "folder"
            t = time.perf_counter()
            make_folder(root, args.images, args.classes, args.src_size)
            print(f"wrote {args.images} PNGs in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        def cfg(budget: float) -> DataConfig:
            return DataConfig(
                "imagefolder",
                root=str(root),
                image_size=args.image_size,
                val_per_class=10,
                memory_budget_mb=budget,
                loader_workers=args.workers,
                test_fraction=0.1,
            )

        huge = 1e12  # far above any folder: the in-memory path
        # Warm-up on a small folder: first-use costs (PIL plugins, kernels, loader machinery)
        # are paid here, not by whichever row would come first.
        warm = Path(tmp) / "warm-up"
        make_folder(warm, 20 * args.classes, args.classes, args.src_size, seed=1)
        warm_cfg = DataConfig(
            "imagefolder",
            root=str(warm),
            image_size=args.image_size,
            val_per_class=1,
            memory_budget_mb=0.0,
            loader_workers=args.workers,
        )
        run_path(warm_cfg, args.batch, args.model, 1)
        steps = args.step_batches
        rows = [run_path(cfg(args.budget_mb), args.batch, args.model, steps)]
        rows.append(run_path(cfg(huge), args.batch, args.model, steps))
    s, m = rows
    print(
        f"image folder: {s['images']} images -> {args.image_size}x{args.image_size}, decoded "
        f"{s['decoded_mb']:.1f} MiB; budget {args.budget_mb:g} MiB; batch {args.batch}; "
        f"model {args.model}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs; glibc mmap threshold "
        + ("fixed at 128 KiB" if pinned else "dynamic (default)")
    )
    print(
        "| path | loader workers | build s | peak RSS growth (MiB) | budget (MiB) | within budget "
        "| workers' private (MiB) | examples/s, data only | examples/s, with train step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "n/a" if r["rss_mb"] is None else f"{r['rss_mb']:.1f}"
        wk = "n/a" if r["workers_mb"] is None else f"{r['workers_mb']:.1f}"
        r["within_budget"] = None if r["rss_mb"] is None else r["rss_mb"] <= args.budget_mb
        within = {None: "n/a", True: "yes", False: "no"}[r["within_budget"]]
        budget = f"{args.budget_mb:g}"  # the in-memory row: what holding the folder would cost
        print(
            f"| {r['path']} | {r['workers']} | {r['load_s']:.2f} | {rss} | {budget} | {within} "
            f"| {wk if r['workers'] else '-'} | {r['data_eps']:.0f} | {r['step_eps']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
