"""`lfm dr`: LFM data reweighting beside the baselines, on one data set, in one table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lfm.apps.protocols import PROTOCOLS, protocol
from lfm.cli.args import add_run_args, run_config
from lfm.methods import METHODS
from lfm.train import distributed
from lfm.train.runlock import run_folder_lock
from lfm.train.summary import runs_table
from lfm.train.trainer import train

HELP = "reweight training data with LFM-DR and compare it with plain cross-entropy"
# The variant `lfm dr` runs unless told otherwise. Picked on validation accuracy of the MNIST-1D
# suites in docs/RESULTS.md (40% flip noise and imbalance 50, 3 seeds), where it ties with its
# control w1-val-only and beats the faithful `paper` form; `--variant paper` runs the paper's.
RECOMMENDED = "w1-val"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm dr`."""
    p = sub.add_parser(
        "dr",
        help=HELP,
        description=HELP + ". With no options: digits with 40%% flip noise and imbalance 5, "
        "an MLP, LFM-DR beside cross-entropy.",
    )
    p.add_argument(
        "--protocol",
        default="default",
        help=f"named setting applied first (flags override it): {', '.join(PROTOCOLS)}",
    )
    p.add_argument(
        "--compare",
        default="ce",
        help="comma-separated baselines trained on the same data first (default ce; '' for none)",
    )
    g = p.add_argument_group("LFM-DR")
    g.add_argument(
        "--variant",
        default=RECOMMENDED,
        help=f"LFM-DR variant (default {RECOMMENDED}, chosen on validation data, see "
        "docs/RESULTS.md): paper (faithful to the paper), authors-code, a-normalised, a-only, "
        "w1-val, w1-val-only",
    )
    g.add_argument(
        "--backend",
        choices=["exact", "fd"],
        help="hypergradients: exact (jvp) or finite differences",
    )
    g.add_argument(
        "--encoder",
        choices=["full", "head", "shared"],
        help="encoder V: trained network, frozen backbone + projection, or W1's own body",
    )
    g.add_argument(
        "--similarity", choices=["dot", "cosine", "l2"], help="similarity inside x (paper Fig. 5)"
    )
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train the baselines and LFM-DR with identical data and seed; print one table."""
    base = protocol(args.protocol)
    lfm_opts = {
        k: getattr(args, k)
        for k in ("variant", "backend", "encoder", "similarity")
        if getattr(args, k) is not None
    }
    methods = [m for m in args.compare.split(",") if m] + ["lfm"]
    for m in methods:
        METHODS.get(m)  # unknown names fail before any training
    out = run_config(args, {**base, "method": "lfm"}).out  # --out, or the YAML file's
    with run_folder_lock(out):  # the whole command: no other run may start in between
        all_results = _train_all(args, base, methods, lfm_opts)
        if not distributed.is_main():  # under torchrun, rank 0 alone prints
            return 0
        print(runs_table(all_results))
    if out:
        print(f"runs written to {out}/<method>/ (results.json, per_example.npz with b and a)")
    return 0


def _train_all(
    args: argparse.Namespace, base: dict, methods: list[str], lfm_opts: dict
) -> list[dict]:
    """Train every method in turn on the same data and seed; their results, in order."""
    all_results = []
    for m in methods:
        cfg = run_config(args, {**base, "method": m})
        if m == "lfm":
            cfg.method_options = {**lfm_opts, **cfg.method_options}
        elif lfm_opts or cfg.method_options:
            cfg.method_options = {}  # LFM options mean nothing to the baselines
        if cfg.out:
            cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / m))
        res = train(cfg)
        if m == "lfm":  # name the variant in the table
            res = {**res, "method": f"lfm ({cfg.method_options.get('variant', 'paper')})"}
        all_results.append(res)
    return all_results
