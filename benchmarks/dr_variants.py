"""Summarise LFM-DR variant suites: validation and test accuracy, and how well b and a find noise.

Reads one or more `lfm bench` output folders (see `docs/RESULTS.md` for the commands that make
them) and prints, per setting, a Markdown table with the mean (and std over seeds) of last-epoch
validation and test accuracy per method and learner, the AUROC of ranking training examples by
learned `b` and by last `a` against the injected-noise mask (low weight = suspect), and the
variant that validation accuracy alone would pick. Test accuracy never enters the choice.

    python benchmarks/dr_variants.py evidence/mnist1d-noise evidence/mnist1d-imb
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of `score` for `positive` (ties count one half); NaN if a class is absent."""
    keep = np.isfinite(score)
    score, positive = score[keep], positive[keep].astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = score.argsort(kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def weight_aurocs(run_dir: Path) -> dict[str, float]:
    """AUROC of -b and -a (low weight = suspect) against the noisy mask of one run."""
    path = run_dir / "per_example.npz"
    if not path.is_file():
        return {}
    arrays = np.load(path)
    if "noisy" not in arrays or not arrays["noisy"].any():
        return {}
    return {k: auroc(-arrays[k].astype(float), arrays["noisy"]) for k in ("b", "a") if k in arrays}


def mean_std(values: list[float]) -> str:
    """'m ± s' over seeds (sample std), or '-'."""
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{np.mean(vals):.3f} ± {sd:.3f}"


def summarise(folder: Path) -> str:
    """The Markdown table of one bench folder (complete runs only; works on a partial suite)."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple[str, str]] = []
    for run_dir in sorted((folder / "runs").iterdir()):
        spec_path, res_path = run_dir / "run.json", run_dir / "results.json"
        if not (spec_path.is_file() and res_path.is_file()):
            continue
        spec, res = json.loads(spec_path.read_text()), json.loads(res_path.read_text())
        if res.get("status") != "complete":
            continue
        for learner, last in res["last"].items():
            name = spec["label"] if learner == "model" else f"{spec['label']} {learner}"
            key = (spec["setting"], name)
            c = cells[key]
            c["val"].append(last["val_acc"])
            c["test"].append(last["test_acc"])
            if learner in ("model", "W1"):  # weights are per run: count them once
                for k, v in weight_aurocs(run_dir).items():
                    c[f"auroc_{k}"].append(v)
    # rows in the order methods were listed: baselines first, then the LFM variants
    order = sorted(cells, key=lambda k: (k[0], k[1].startswith("lfm"), k[1]))
    out = []
    for setting in dict.fromkeys(s for s, _ in order):
        out.append(f"### {folder.name}: {setting}\n")
        out.append(
            "| method | seeds | val acc (last) | test acc (last) | AUROC of b | AUROC of a |"
        )
        out.append("|---|---|---|---|---|---|")
        best_val, best_name = -math.inf, ""
        for s, name in order:
            if s != setting:
                continue
            c = cells[(s, name)]
            out.append(
                f"| {name} | {len(c['test'])} | {mean_std(c['val'])} | {mean_std(c['test'])} | "
                f"{mean_std(c.get('auroc_b', []))} | {mean_std(c.get('auroc_a', []))} |"
            )
            if name.startswith("lfm") and np.mean(c["val"]) > best_val:
                best_val, best_name = float(np.mean(c["val"])), name
        out.append(
            f"\nLFM variant and learner with the best mean validation accuracy: **{best_name}**"
            f" ({best_val:.3f}).\n"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Print the summary of each folder given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    for folder in p.parse_args(argv).folders:
        print(summarise(folder))


if __name__ == "__main__":
    main()
