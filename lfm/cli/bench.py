"""`lfm bench`: methods x settings x seeds in one command, with tables of mean ± std."""

from __future__ import annotations

import argparse

from lfm.cli.args import add_run_args, run_config

HELP = "run a benchmark suite (methods x imbalance/noise settings x seeds) and tabulate it"

EPILOG = """example:
  lfm bench --dataset digits --methods ce,ce-clean,ce-all,small-loss,focal,cb,l2rw,mwnet,lfm \\
      --imbalance 1,10,50 --noise none,flip:0.2,flip:0.4,uniform:0.4 --seeds 3 --out bench/
  lfm bench ... --variant sl-0.2=small-loss:rho=0.2 --methods ce,small-loss,sl-0.2

Re-running the same command skips runs already complete and retries failed ones.
--opt applies to every method (methods reject options they do not know); use --variant
to give one method options. The seed of each run also seeds its data (noise draw, split).
Results: OUT/table.md, OUT/all_runs.csv, OUT/runs/<dataset>-<setting>-<method>-s<seed>/.
Then `lfm report OUT` draws the figures and an index.html."""


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lfm bench`."""
    p = sub.add_parser(
        "bench",
        help=HELP,
        description=HELP + ".",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # the suite's --imbalance / --noise / --out take lists / a folder, replacing the run flags
        conflict_handler="resolve",
    )
    add_run_args(p)
    g = p.add_argument_group("suite")
    g.add_argument(
        "--methods",
        type=_names,
        required=True,
        help="comma-separated method names or --variant labels",
    )
    g.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:K=V,...]",
        help="a method with options under its own label (repeatable), "
        "e.g. sl-0.2=small-loss:rho=0.2",
    )
    g.add_argument(
        "--imbalance",
        dest="imbalances",
        type=_floats,
        default=[1.0],
        help="comma-separated imbalance factors, e.g. 1,10,50",
    )
    g.add_argument(
        "--noise",
        dest="noises",
        type=_names,
        default=["none"],
        help="comma-separated noise specs, e.g. none,flip:0.2,uniform:0.4",
    )
    g.add_argument(
        "--grid",
        choices=["product", "sweep"],
        default="product",
        help="product: every imbalance with every noise; sweep: imbalance alone, "
        "then noise alone (the paper's tables)",
    )
    g.add_argument(
        "--seeds", type=int, default=1, help="number of seeds, starting at --seed (default 1)"
    )
    g.add_argument("--out", dest="suite_out", required=True, help="the suite's output folder")
    g.add_argument(
        "--suspects",
        action="store_true",
        help="score learned weights against the noisy mask and run cleanlab on the "
        "same data (AUROC, precision@k)",
    )
    g.add_argument("--cleanlab-folds", type=int, default=5, help="cross-validation folds")
    g.add_argument("--cleanlab-epochs", type=int, default=10, help="epochs per fold")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite and print its table."""
    from lfm.apps.bench import BenchConfig, make_settings, parse_method_specs, run_suite

    # --opt applies to every method of the suite: `check_suite` checks it against each one
    base = run_config(args, defaults={"progress": False}, check_options=False)
    seeds = [base.seed + i for i in range(max(1, args.seeds))]
    cfg = BenchConfig(
        base=base,
        methods=parse_method_specs(args.methods, args.variant),
        settings=make_settings(args.imbalances, args.noises, args.grid),
        seeds=seeds,
        out=args.suite_out,
        suspects=args.suspects,
        cleanlab_folds=args.cleanlab_folds,
        cleanlab_epochs=args.cleanlab_epochs,
    )
    summary = run_suite(cfg)
    from lfm.train import distributed

    if distributed.is_main():  # under torchrun, rank 0 alone prints
        print(summary["table"])
    return 1 if summary["failed"] else 0
