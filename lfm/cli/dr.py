"""`lfm dr`: LFM data reweighting beside the baselines, on one data set, in one table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lfm.apps.protocols import PROTOCOLS, protocol
from lfm.cli.args import add_run_args, run_config
from lfm.methods import METHODS
from lfm.methods.lfm_dr import RECOMMENDED
from lfm.train import distributed
from lfm.train.runlock import run_folder_lock
from lfm.train.summary import runs_table
from lfm.train.trainer import train

HELP = "reweight training data with LFM-DR and compare it with plain cross-entropy"


# What the table's two LFM rows are (Algorithm 1): without it "W1" and "W2" mean nothing.
LEARNERS = (
    "W1: LFM-DR's first learner, trained on the b-weighted training loss (stage 1: learn); "
    "W2: the second, trained on the a-weighted loss, a_i from W1's validation mistakes "
    "(stage 2: relearn). Both are scored on the same test set."
)


def setting_line(results: dict, protocol: str) -> str:
    """One line naming the data, corruption, validation set, model and budget of the runs."""
    info, cfg = results.get("data", {}), results.get("config", {})
    sizes = info.get("sizes", {})
    split = ", ".join(f"{k} {v}" for k, v in sizes.items())
    if info.get("val_fraction"):
        val = f"validation {info['val_fraction']:g} of train"
    else:
        val = f"validation {info.get('val_per_class')} per class"
    noise = info.get("noise", "none")
    rate = info.get("noise_rate")
    noise += f" ({rate:.1%} of train labels wrong)" if rate else ""
    epochs = cfg.get("epochs")
    return (
        f"setting ({protocol}): {info.get('dataset', results.get('dataset'))} ({split}); "
        f"noise {noise}; imbalance {info.get('imbalance', 1):g}; {val}; "
        f"model {cfg.get('model', {}).get('name')}; {epochs} epoch{'' if epochs == 1 else 's'}, "
        f"batch {cfg.get('batch_size')}, seed {cfg.get('seed')}"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm dr`."""
    p = sub.add_parser(
        "dr",
        help=HELP,
        description=HELP + ". With no options: digits with 40% flip noise and imbalance 5, "
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
        "docs/RESULTS.md): paper (faithful to the paper), authors-code (the authors' public "
        "code's b rule), own-grad-chain-rule, a-normalised, a-only, w1-val, w1-val-only, "
        "w1-val-a-norm, w1-val-a-norm-b-norm, w1-val-a-norm-b-norm-warm, w1-val-a-norm-slow-b",
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
    # Every run's configuration (and lfm's options) is checked before the first one trains.
    # --opt and YAML method options are LFM's: the baselines get none.
    bare = argparse.Namespace(**{**vars(args), "opt": None})
    cfgs = []
    for m in methods:
        if m == "lfm":
            cfg = run_config(args, {**base, "method": m, "method_options": lfm_opts})
        else:
            cfg = run_config(bare, {**base, "method": m}, check_options=False)
            cfg.method_options = {}
        if cfg.out:
            cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / m))
        cfgs.append(cfg)
    out = run_config(args, {**base, "method": "lfm"}).out  # --out, or the YAML file's
    with run_folder_lock(out):  # the whole command: no other run may start in between
        all_results = [train(cfg) for cfg in cfgs]  # results name the variant: lfm[w1-val]
        if not distributed.is_main():  # under torchrun, rank 0 alone prints
            return 0
        print(setting_line(all_results[-1], args.protocol))
        print(runs_table(all_results))
        print(LEARNERS)
    if out:
        where = Path(out) / "<method>"
        print(f"runs written to {where}/ (results.json, per_example.npz with b and a)")
    return 0
