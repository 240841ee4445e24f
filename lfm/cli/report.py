"""`lfm report RESULTS_DIR`: figures and an index.html for a bench folder or one run folder."""

from __future__ import annotations

import argparse

HELP = "draw figures (confusion, per-class, weights, curves, ablations) and an index.html"


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm report`."""
    p = sub.add_parser("report", help=HELP, description=HELP + ".")
    p.add_argument(
        "results_dir",
        metavar="RESULTS_DIR",
        help="a folder written by `lfm bench --out` or `lfm train --out`",
    )
    p.add_argument("--out", help="where the PNGs and index.html go (default RESULTS_DIR/report)")
    p.add_argument(
        "--compare",
        type=_names,
        metavar="A,B",
        help="the two methods whose confusion matrices are drawn side by side "
        "(default: ce against the best other method of each setting)",
    )
    p.add_argument(
        "--group",
        type=_names,
        action="append",
        default=[],
        metavar="A,B,...",
        help="a group of methods to compare with bars (repeatable); variants of "
        "one method are grouped automatically",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from lfm.apps.report import make_report

    index = make_report(args.results_dir, args.out, args.compare, args.group)
    print(f"report written to {index}")
    return 0
