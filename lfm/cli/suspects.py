"""`lfm suspects RUN_DIR`: training examples ranked by learned weight (low = suspect)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "rank a run's training examples by learned weight and score the ranking against known noise"

EPILOG = """Writes RUN_DIR/suspects.csv (rank, index, origin, given_label, predicted_label, weight,
and weight_change / change_rank when epoch snapshots exist). predicted_label comes from the
run's newest checkpoint; it is empty when the run kept none (or with --no-predict).
When the run's noise mask is known, prints AUROC and precision@k (k = #noisy and 100);
--cleanlab adds cleanlab's K-fold self-confidence ranking on the same data."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm suspects`."""
    p = sub.add_parser(
        "suspects",
        help=HELP,
        description=HELP + ".",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run folder (results.json, per_example.npz)"
    )
    p.add_argument(
        "--key",
        help="per-example array to rank by (default: the one the run's method documents as its "
        "signal: an LFM-DR variant's a or b, see SIGNAL_KEY in lfm/methods/lfm_dr.py; else "
        "weight, b, a)",
    )
    p.add_argument(
        "--learner", help="learner whose predictions fill predicted_label (default: last)"
    )
    p.add_argument("--no-predict", action="store_true", help="leave predicted_label empty")
    p.add_argument("--top", type=int, default=10, help="suspects to print (default 10)")
    p.add_argument("--cleanlab", action="store_true", help="also score cleanlab on the same data")
    p.add_argument("--folds", type=int, default=5, help="cleanlab cross-validation folds")
    p.add_argument("--cleanlab-epochs", type=int, default=10, help="epochs per fold")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write suspects.csv, print the top suspects and the detection metrics."""
    from lfm.apps.suspects import SUSPECTS_CSV, cleanlab_for_run, suspects_table

    rows, metrics = suspects_table(
        args.run_dir, key=args.key, predict=not args.no_predict, learner=args.learner
    )
    report = {"suspects": metrics}
    if args.cleanlab:
        report["cleanlab"] = cleanlab_for_run(
            args.run_dir, args.folds, args.cleanlab_epochs
        ).metrics
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    cols = [
        c
        for c in (
            "rank",
            "index",
            "given_label",
            "predicted_label",
            "weight",
            "weight_change",
            "true_label",
        )
        if rows and c in rows[0]
    ]
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows[: args.top]:
        print(
            "  ".join(
                f"{r[c]:>15.4g}" if isinstance(r[c], float) else f"{r[c]!s:>15}" for c in cols
            )
        )
    print(f"{len(rows)} examples ranked; written to {Path(args.run_dir) / SUSPECTS_CSV}")
    for name, m in report.items():
        if m is None:
            print(f"{name}: the noisy-label mask is unknown for this data, so no AUROC")
            continue
        pk = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("precision@"))
        auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.4f}"
        by = f" by {m['key']}" if "key" in m else ""
        print(f"{name}{by}: AUROC {auroc}; {pk} ({m['n_noisy']} noisy of {m['n']})")
        if m.get("warning"):
            print(f"warning: {m['warning']}")
    return 0
