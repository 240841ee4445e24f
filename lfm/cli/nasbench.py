"""`lfm nasbench`: the 1-D cell space's ground-truth table (build it, look a cell up)."""

from __future__ import annotations

import argparse
import json

HELP = "the 1-D cell space's table of trained accuracies: build it, or look a cell up"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm nasbench build` and `lfm nasbench query`."""
    p = sub.add_parser("nasbench", help=HELP, description=HELP + ".")
    cmds = p.add_subparsers(dest="nasbench_cmd", required=True, metavar="{build,query}")
    b = cmds.add_parser(
        "build",
        help="train every (cell, seed) missing from the table (resumable; see lfm.nas.bench1d)",
    )
    b.add_argument("--table", help="the table file (default: the one shipped in the package)")
    b.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per cell (default 2)")
    b.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no bar")
    b.set_defaults(func=run_build)
    q = cmds.add_parser("query", help="a cell's parameters and accuracies, per seed and mean")
    q.add_argument(
        "arch", metavar="ARCH", help="a cell, e.g. '|skip_connect~0|+|sep_conv_3x3~0|none~1|'"
    )
    q.add_argument("--table", help="the table file (default: the shipped one)")
    q.add_argument("--json", action="store_true", help="print the entry as JSON")
    q.set_defaults(func=run_query)


def run_build(args: argparse.Namespace) -> int:
    """Build (or complete) the table and print how many cells it holds."""
    from lfm.errors import LFMError
    from lfm.nas.bench1d import build

    if args.seeds < 1 or args.workers < 1:
        raise LFMError(
            "--seeds and --workers must be at least 1", "pass e.g. --seeds 2 --workers 2"
        )
    table = build(args.table, tuple(range(args.seeds)), args.workers, progress=args.progress)
    full = sum(len(e["seeds"]) >= args.seeds for e in table["entries"].values())
    print(f"{full} cells with {args.seeds} seeds in the table")
    return 0


def run_query(args: argparse.Namespace) -> int:
    """Print one cell's entry."""
    from lfm.nas.bench1d import load, lookup

    e = lookup(args.arch, load(args.table))
    if args.json:
        print(json.dumps(e, indent=1))
        return 0
    print(f"{e['arch']}: {e['params']} parameters")
    for s, r in sorted(e["seeds"].items()):
        print(f"  seed {s}: train {r['train']:.4f}  val {r['val']:.4f}  test {r['test']:.4f}")
    print(f"  mean:   train {e['train']:.4f}  val {e['val']:.4f}  test {e['test']:.4f}")
    return 0
