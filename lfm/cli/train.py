"""`lfm train`: one plain method (cross-entropy, focal, class-balanced, ...) on one data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfm.cli.args import add_run_args, run_config
from lfm.methods import METHODS
from lfm.train import distributed
from lfm.train.runlock import run_folder_lock
from lfm.train.summary import runs_table
from lfm.train.trainer import train

HELP = "train a classifier with one method and print its test accuracy"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm train`."""
    p = sub.add_parser("train", help=HELP, description=HELP + ".")
    add_run_args(p, methods=METHODS.names())
    p.add_argument(
        "--loss", choices=["ce", "focal", "cb"], help="shorthand for --method ce|focal|cb"
    )
    p.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and print the results table."""
    if args.loss and not args.method:
        args.method = args.loss
    cfg = run_config(args)
    with run_folder_lock(cfg.out):  # before the data is built: a busy folder fails at once
        results = train(cfg)
    if not distributed.is_main():  # under torchrun, rank 0 alone prints
        return 0
    print(json.dumps(results, indent=1) if args.json else runs_table([results]))
    if cfg.out:
        print(f"results written to {Path(cfg.out) / 'results.json'}")
    return 0
