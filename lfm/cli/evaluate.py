"""`lfm evaluate`: train a genotype's network from scratch and report its test accuracy."""

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

HELP = "train the evaluation network of a genotype (a JSON file or a built-in name) from scratch"
_FLAGS = {
    "layers": "layers",
    "C": "C",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "steps_per_epoch": "steps_per_epoch",
    "seed": "seed",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm evaluate`."""
    from lfm.nas import EVAL_PRESETS, GENOTYPES

    p = sub.add_parser("evaluate", help=HELP, description=HELP + ".")
    p.add_argument(
        "--genotype",
        required=True,
        help=f"genotype JSON file from `lfm search`, or a built-in: {', '.join(GENOTYPES)}",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help=f"settings to start from: {', '.join(EVAL_PRESETS)} (default tiny, for a CPU)",
    )
    p.add_argument("--layers", type=int, help="cells (paper: 20)")
    p.add_argument("--C", type=int, help="initial channels (paper: 36)")
    p.add_argument("--epochs", type=int, help="training epochs (paper: 600)")
    p.add_argument("--batch-size", type=int, help="batch size (paper: 96)")
    p.add_argument("--steps-per-epoch", type=int, help="cap on batches per epoch")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other setting, e.g. cutout=16 (repeatable)",
    )
    p.add_argument("--config", help="YAML file with an `evaluate:` section")
    p.add_argument(
        "--out",
        help="folder for evaluation.json and per-epoch checkpoints (a run with the same settings "
        "continues from them; without --out nothing is saved)",
    )
    add_run_flags(p)
    add_resume_arg(p)
    add_data_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train the network and print its accuracy and size."""
    from lfm.errors import LFMError
    from lfm.nas import EVAL_PRESETS, EvalConfig

    if args.preset not in EVAL_PRESETS:
        raise LFMError(
            f"unknown evaluation preset {args.preset!r}", f"use one of {', '.join(EVAL_PRESETS)}"
        )
    cfg = config_with_overrides(EvalConfig, EVAL_PRESETS[args.preset], args, "evaluate", _FLAGS)
    with run_folder_lock(args.out):  # before the data: a busy or unwritable folder fails at once
        _evaluate_and_save(args, cfg)
    return 0


def _evaluate_and_save(args: argparse.Namespace, cfg: Any) -> None:
    """Train, print and write evaluation.json (the caller holds the folder's lock)."""
    from lfm.data.build import build_data
    from lfm.nas import Genotype, run_evaluate

    seed_everything(cfg.seed)
    genotype = Genotype.load(args.genotype)
    bundle = build_data(data_config(args))
    res = run_evaluate(
        bundle,
        genotype,
        cfg,
        resolve_device(args.device),
        progress=not args.no_progress,
        out=args.out,
        resume=not args.no_resume,
        **run_flags(args),
    )
    if not distributed.is_main():  # under torchrun rank 0 alone writes and prints
        return
    print(
        f"genotype {args.genotype}: {cfg.layers} cells, C={cfg.C}, "
        f"{res.get('params', 0) / 1e6:.3f}M parameters"
    )
    print(f"test accuracy (last epoch): {res['test_acc']:.4f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"config": cfg.__dict__, "genotype": genotype.to_dict(), **res}
        write_json(Path(args.out) / "evaluation.json", record, default=str)
