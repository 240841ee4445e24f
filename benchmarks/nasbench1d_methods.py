"""Which search finds better cells? Every method in the 1-D cell space, scored by the table.

Each (setting, seed, method) runs once with one budget (`lfm.nas.space_search.base_config`) and
its record goes to OUT/SETTING/METHOD-sSEED.json, so the script resumes where it stopped and a
second call only prints the tables. Random sampling runs last in each setting, with k matched
to the measured mean cost of DARTS (first order) and of LFM-DARTS (separate encoder) there.

    OMP_NUM_THREADS=1 python benchmarks/nasbench1d_methods.py --out evidence/nasbench1d
    python benchmarks/nasbench1d_methods.py --out evidence/nasbench1d --seeds 0 1 2 3 4 --report

Settings: `clean` (the table's labels) and `flip40` (40% pair-flip noise in the search's
training split, a new draw per seed; the validation split clean).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lfm.nas.bench1d import load
from lfm.nas.space1d import parse_arch
from lfm.nas.space_search import (
    SPACE_METHODS,
    base_config,
    kendall_tau,
    mean_cell_seconds,
    random_sampling,
    run_method,
    score,
    search_bundle,
)
from lfm.train.atomic import write_json

SETTINGS = {"clean": "none", "flip40": "flip:0.4"}
METHODS = [
    "rsws",
    "darts-1",
    "darts-2",
    "pdarts",
    "lfm-darts",
    "lfm-darts-shared",
    "lfm-darts-authors",
    "lfm-pdarts",
]
MATCH = ("darts-1", "lfm-darts")  # random sampling's k is matched to these searches' cost
COLUMNS = [
    ("test", "test acc", 3),
    ("regret", "regret", 3),
    ("rank", "rank /125", 1),
    ("percentile", "percentile", 1),
    ("tau", "Kendall tau", 2),
    ("tau_none", "tau vs #none", 2),
    ("param_free", "param-free ops", 1),
    ("seconds", "seconds", 0),
    ("cell_trainings", "cell trainings", 1),
]


def _record(path: Path) -> dict | None:
    """A run's record, with `tau_none`: Kendall tau between the method's scores of all cells
    and their count of `none` edges (the table's own is -0.27: `none` hurts), NaN if unscored."""
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    scores = rec.get("scores") or {}
    archs = sorted(scores)
    nones = [sum(op == "none" for op in parse_arch(a)) for a in archs]
    rec["tau_none"] = kendall_tau([scores[a] for a in archs], nones) if archs else math.nan
    return rec


def run_all(out: Path, seeds: list[int], settings: list[str], methods: list[str]) -> None:
    """Every search not yet recorded; seeds outermost, so a cut-short run stays balanced."""
    table = load()
    for seed in seeds:
        for setting in settings:
            bundle = search_bundle(SETTINGS[setting], seed)
            for m in methods:
                path = out / setting / f"{m}-s{seed}.json"
                if path.is_file():
                    continue
                t0 = time.time()
                found = run_method(m, bundle, base_config(seed=seed))
                rec = score(found, table) | {"scores": found.scores}
                write_json(path, rec)
                print(
                    f"[{setting} s{seed}] {m:18s} {found.arch} test {rec['test']:.3f} "
                    f"tau {rec['tau']:+.2f} ({time.time() - t0:.0f}s)",
                    flush=True,
                )


def run_random(out: Path, seeds: list[int], settings: list[str]) -> None:
    """Random sampling with k matched to each of MATCH's mean search cost in the setting."""
    table = load()
    unit = mean_cell_seconds(table)
    for setting in settings:
        ks = []
        for m in MATCH:
            recs = [_record(out / setting / f"{m}-s{s}.json") for s in seeds]
            secs = [r["seconds"] for r in recs if r is not None]
            if secs:
                ks.append(max(1, round(statistics.mean(secs) / unit)))
        for seed in seeds:
            trained: dict = {}  # noisy trainings shared by both k of this seed
            for k in sorted(set(ks), reverse=True):
                path = out / setting / f"random-{k}-s{seed}.json"
                if path.is_file():
                    continue
                found = random_sampling(k, seed, SETTINGS[setting], table, trained=trained)
                rec = score(found, table)
                write_json(path, rec)
                print(f"[{setting} s{seed}] random-{k} {found.arch} test {rec['test']:.3f}")


def _cell(values: list[float], digits: int) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def report(out: Path, seeds: list[int], settings: list[str]) -> str:
    """The markdown tables (mean ± std over seeds) of every recorded method, per setting."""
    lines = []
    for setting in settings:
        folder = out / setting
        names = METHODS + sorted(
            {p.name.rsplit("-s", 1)[0] for p in folder.glob("random-*.json")},
            key=lambda n: int(n.split("-")[1]),
        )
        lines += [f"### {setting}", ""]
        lines.append("| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        for name in names:
            recs = [_record(folder / f"{name}-s{s}.json") for s in seeds]
            recs = [r for r in recs if r is not None]
            if not recs:
                continue
            cells = [_cell([float(r[k]) for r in recs], d) for k, _, d in COLUMNS]
            lines.append(f"| {name} | {len(recs)} | " + " | ".join(cells) + " |")
        lines.append("")
        for name in names:
            recs = [_record(folder / f"{name}-s{s}.json") for s in seeds]
            archs = [r["arch"] for r in recs if r is not None]
            if archs:
                lines.append(f"- {name}: " + ", ".join(f"`{a}`" for a in archs))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="evidence/nasbench1d")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=SPACE_METHODS.names())
    p.add_argument("--report", action="store_true", help="print the tables, run nothing")
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)  # tiny convolutions; the CPU is shared
    if not args.report:
        run_all(out, args.seeds, args.settings, args.methods)
        run_random(out, args.seeds, args.settings)
    print(report(out, args.seeds, args.settings))


if __name__ == "__main__":
    main()
