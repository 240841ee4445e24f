"""`lfm search` in one process and split over N processes (torchrun), side by side.

    python benchmarks/bench_search_procs.py                       # lfm-darts, 1 and 2 processes
    python benchmarks/bench_search_procs.py --procs 4 --device cuda --layers 8 --C 16 --batch 64

Runs the same search (same seed, same global batch) once per process count, each in a fresh
folder, and prints one table: seconds per step (the Trainer's, excluding start-up and the
end-of-run evaluation), the ratio to one process, and the largest |difference| of the final
alphas and r from the one-process run (what splitting the batch changes: float rounding).
On CUDA each process takes one GPU (nccl); on a CPU gloo, one thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lfm.train.checkpoint import CheckpointDir, safe_load


def _run(procs: int, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "lfm"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), "-m", "lfm"]  # fmt: skip
    cmd += [
        "search", "--method", args.method, "--layers", str(args.layers), "--C", str(args.C),
        "--batch-size", str(args.batch), "--epochs", "2", "--steps-per-epoch", str(args.steps),
        "--set", "warmup_epochs=0", "--device", args.device, "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{procs} processes failed:\n{res.stderr[-3000:]}")
    timing = json.loads((out / "results.json").read_text())["timing"]
    state = safe_load(CheckpointDir(out / "checkpoints" / "search").paths()[-1])
    learners = state["method"]["learners"]
    return {"sec": timing["sec_per_iter"], "alphas": learners["alphas"], "r": learners.get("r")}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lfm-darts")
    ap.add_argument("--procs", type=int, default=2, help="the split run's process count")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--C", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="global batch (divisible by procs)")
    ap.add_argument("--steps", type=int, default=3, help="steps per epoch (2 epochs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="threads per process on a CPU")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: _run(p, Path(tmp) / f"p{p}", args) for p in (1, args.procs)}
    one = runs[1]
    print(f"lfm search --method {args.method}, {args.layers} cells, C={args.C}, "
          f"global batch {args.batch}, {2 * args.steps} steps, {args.device}")  # fmt: skip
    print("| processes | s/step | ratio to 1 | max abs diff alphas | max abs diff r |")
    print("|---|---|---|---|---|")
    rows = []
    for p, r in runs.items():
        pairs = zip(r["alphas"], one["alphas"], strict=True)
        da = max(float((a - b).abs().max()) for a, b in pairs)
        dr = float((r["r"] - one["r"]).abs().max()) if r["r"] is not None else float("nan")
        print(f"| {p} | {r['sec']:.3f} | {r['sec'] / one['sec']:.2f} | {da:.2g} | {dr:.2g} |")
        rows.append({"procs": p, "sec": r["sec"], "ratio": r["sec"] / one["sec"], "alphas": da,
                     "r": dr})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
