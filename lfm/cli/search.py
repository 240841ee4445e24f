"""`lfm search`: DARTS, P-DARTS, LFM-DARTS or LFM-PDARTS; prints and draws the genotype."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lfm.cli.nas_args import (
    add_data_args,
    add_resume_arg,
    add_run_flags,
    config_with_overrides,
    data_config,
    run_flags,
)
from lfm.device import resolve_device, seed_everything
from lfm.train import distributed
from lfm.train.atomic import write_json
from lfm.train.runlock import run_folder_lock

HELP = "search a cell architecture (DARTS, P-DARTS, LFM-DARTS, LFM-PDARTS) and save its genotype"
_FLAGS = {
    "method": "method",
    "layers": "layers",
    "C": "C",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "steps_per_epoch": "steps_per_epoch",
    "order": "order",
    "backend": "backend",
    "encoder": "encoder",
    "seed": "seed",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm search`."""
    from lfm.nas import SEARCH_PRESETS, SEARCHERS

    p = sub.add_parser("search", help=HELP, description=HELP + ".")
    p.add_argument(
        "--method", help=f"search method: {', '.join(SEARCHERS.names())} (default darts)"
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help=f"settings to start from: {', '.join(SEARCH_PRESETS)} (default tiny, for a CPU)",
    )
    p.add_argument("--layers", type=int, help="cells in the supernet (paper: 8)")
    p.add_argument("--C", type=int, help="initial channels (paper: 16)")
    p.add_argument("--epochs", type=int, help="search epochs (per stage for P-DARTS)")
    p.add_argument("--batch-size", type=int, help="train and validation batch size")
    p.add_argument("--steps-per-epoch", type=int, help="cap on batches per epoch")
    p.add_argument("--order", type=int, choices=[1, 2], help="DARTS first or second order")
    p.add_argument(
        "--backend",
        choices=["exact", "fd"],
        help="mixed second derivatives: exact (default; no finite-difference error; on a CPU "
        "about fd's time per step at the paper's size, 1.5-2x it at the tiny preset's) or fd "
        "(DARTS's finite differences, eps = 0.01 / ||v||; the darts-paper and pdarts-paper "
        "presets use it, as the papers did)",
    )
    p.add_argument("--hvp", help=argparse.SUPPRESS)  # renamed --backend: a hint, not a crash
    p.add_argument(
        "--encoder",
        choices=["full", "shared"],
        help="LFM encoder V: a trained CNN, or W1's body (parameter sharing)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other search setting (repeatable)"
    )
    p.add_argument("--config", help="YAML file with a `search:` section")
    p.add_argument(
        "--out",
        default="search-out",
        help="folder for genotype.json and genotype.png (arch.json in the 1-D space), search.json "
        "and per-epoch checkpoints "
        "(a run with the same settings continues from them)",
    )
    add_run_flags(p)
    add_resume_arg(p)
    add_data_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Search, then save and print the genotype."""
    from lfm.errors import LFMError

    if args.hvp is not None:
        raise LFMError("--hvp was renamed --backend", f"pass --backend {args.hvp}")
    from lfm.nas import SearchConfig, config_from_preset

    cfg = config_with_overrides(
        SearchConfig, config_from_preset(args.preset), args, "search", _FLAGS
    )
    out = Path(args.out)
    with run_folder_lock(out):  # before the data: a busy or unwritable folder fails at once
        _search_and_save(args, cfg, out)
    return 0


def _search_and_save(args: argparse.Namespace, cfg: Any, out: Path) -> None:
    """Search, then write and print the genotype (the caller holds the folder's lock)."""
    from lfm.data.build import build_data
    from lfm.nas import plot_genotype, run_search

    seed_everything(cfg.seed)
    bundle = build_data(data_config(args))
    result = run_search(
        bundle,
        cfg,
        resolve_device(args.device),
        progress=not args.no_progress,
        out=out,
        resume=not args.no_resume,
        **run_flags(args),
    )
    if not distributed.is_main():  # under torchrun rank 0 alone writes and prints
        return
    out.mkdir(parents=True, exist_ok=True)
    cell1d = isinstance(result.genotype, str)  # the 1-D space's cells are arch strings
    if cell1d:
        written = ["arch.json", "search.json"]
        write_json(out / "arch.json", {"space": cfg.space, "arch": result.genotype})
    else:
        written = ["genotype.json", "genotype.png", "search.json"]
        result.genotype.save(out / "genotype.json")
        plot_genotype(result.genotype, out / "genotype.png")
    write_json(
        out / "search.json",
        {
            "config": cfg.__dict__,
            "history": result.history,
            "alphas": [a.tolist() for a in result.alphas],
            "normal_ops": result.normal_ops,
            "reduce_ops": result.reduce_ops,
        },
        default=str,
    )
    if cell1d:
        print(f"cell ({cfg.method}): {result.genotype}")
        print(f"  its trained accuracy: lfm nasbench query '{result.genotype}'")
    else:
        print(f"genotype ({cfg.method}):")
        print(f"  normal: {result.genotype.normal}")
        print(f"  reduce: {result.genotype.reduce}")
    if result.history:
        last = result.history[-1]
        print(
            "  last epoch: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        )
    print("written: " + ", ".join(f"{out / name}" for name in written))
