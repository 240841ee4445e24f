"""Search with every NAS method on the same data, evaluate each genotype the same way, tabulate.

Each method searches with one preset (default `tiny`, digits, half of train as validation),
then its genotype is trained from scratch by one evaluation preset on train + validation and
tested once, at the last epoch. The table also shows the final supernet's validation accuracy,
which is what a user may look at; test accuracy chooses nothing. Runs resume from their
checkpoints, so the script can be split across processes and re-run to print the table:

    python benchmarks/nas_methods.py --out evidence/nas --only darts lfm-darts
    python benchmarks/nas_methods.py --out evidence/nas --only pdarts lfm-pdarts lfm-darts-shared
    python benchmarks/nas_methods.py --out evidence/nas          # the rest, then the table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lfm.data.build import build_data
from lfm.data.config import DataConfig
from lfm.nas import EVAL_PRESETS, config_from_preset, run_evaluate, run_search

RUNS = {
    "darts": dict(method="darts"),
    "pdarts": dict(method="pdarts"),
    "lfm-darts": dict(method="lfm-darts"),
    "lfm-darts-shared": dict(method="lfm-darts", encoder="shared"),
    "lfm-pdarts": dict(method="lfm-pdarts"),
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Search, evaluate and record one method (or read its record if it is already done)."""
    folder = Path(args.out) / name
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    data = DataConfig(dataset=args.dataset, val_per_class=0, val_fraction=0.5, seed=args.seed)
    bundle = build_data(data)
    cfg = config_from_preset(args.preset, seed=args.seed, **RUNS[name])
    t0 = time.time()
    res = run_search(bundle, cfg, progress=not args.quiet, out=folder)
    search_s = time.time() - t0
    res.genotype.save(folder / "genotype.json")
    ecfg = EVAL_PRESETS[args.eval_preset]
    t0 = time.time()
    ev = run_evaluate(bundle, res.genotype, ecfg, progress=not args.quiet, out=folder / "eval")
    rec = {
        "run": name,
        "search_seconds": round(search_s, 1),
        "supernet_val_acc": res.history[-1]["val_acc"],
        "eval_seconds": round(time.time() - t0, 1),
        "eval_params": ev["params"],
        "test_acc": ev["test_acc"],
        "skip_connects_normal": res.genotype.count("skip_connect"),
        "genotype": res.genotype.to_dict(),
    }
    done.write_text(json.dumps(rec, indent=1))
    return rec


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen methods and print a Markdown table of every finished one."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="evidence/nas")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="methods to run (default all)")
    ap.add_argument("--preset", default="tiny", help="search preset")
    ap.add_argument("--eval-preset", default="tiny", help="evaluation preset")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only or RUNS:
        run_one(name, args)
    rows = [
        json.loads(p.read_text())
        for name in RUNS
        if (p := Path(args.out) / name / "result.json").exists()
    ]
    print("\n| search | search min | supernet val acc | skip (normal) | eval min | test acc |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['search_seconds'] / 60:.1f} | {r['supernet_val_acc']:.3f} | "
            f"{r['skip_connects_normal']} | {r['eval_seconds'] / 60:.1f} | {r['test_acc']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
