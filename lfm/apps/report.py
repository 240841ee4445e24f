"""`lfm report`: figures and one self-contained ``index.html`` for a bench folder or one run.

What is drawn (each only where the data allows it):

- accuracy over epochs per method (from each ``results.json`` history), one figure per setting;
- per-class test accuracy bars per method (last epoch, mean over seeds), per setting;
- confusion matrices of two methods side by side (the paper's Fig. 6), per setting, first seed:
  the pair given with ``compare``, else ``ce`` (or the first method) against the best other
  method of that setting;
- histograms of the learned weights split by clean / noisy label (``per_example.npz`` mask) and
  their spread per class, per run with weights (first seed);
- ablation bars: every group of labels that share one registered method (``--variant``s of
  one method, e.g. LFM without x / u / z or with another similarity), plus any groups given
  with ``groups``: mean ± std test accuracy per setting.

``index.html`` holds the tables of ``table.md`` and the figures, which it references by relative
path (the PNGs sit beside it), so the folder can be copied or zipped as it is.
"""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfm.apps import figures
from lfm.apps.bench import (
    FAILED,
    RUN_SPEC,
    Setting,
    collect_rows,
    find_run_dirs,
    markdown_tables,
    mean_std,
    row_name,
)
from lfm.errors import LFMError
from lfm.train.atomic import write_atomic


@dataclass
class RunInfo:
    """One run folder as the report sees it."""

    dir: Path
    label: str
    method: str
    setting: str
    seed: int
    results: dict[str, Any] | None  # None for a failed or unfinished run


def load_runs(path: str | Path) -> list[RunInfo]:
    """Every run folder under `path` (or `path` itself), complete or not.

    Example
    -------
    >>> [r.label for r in load_runs("bench/")][:2]
    ['ce', 'ce']
    """
    runs = []
    for d in find_run_dirs(path):
        spec = _read(d / RUN_SPEC) or {}
        res = _read(d / "results.json")
        if res is not None and res.get("status") != "complete":
            res = None
        if res is None and not spec:
            if (d / FAILED).is_file():
                runs.append(RunInfo(d, d.name, d.name, "", 0, None))
            continue
        data = (res or {}).get("config", {}).get("data", {})
        setting = (
            spec.get("setting")
            or Setting(float(data.get("imbalance", 1)), data.get("noise", "none")).name
        )
        label = spec.get("label") or (res or {}).get("method", d.name)
        method = spec.get("method") or (res or {}).get("method", label)
        seed = spec.get("seed", (res or {}).get("seed", 0))
        runs.append(RunInfo(d, label, method, setting, int(seed), res))
    return runs


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _learner_names(runs: Sequence[RunInfo]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        for learner in (r.results or {}).get("last", {}):
            if learner not in out[r.label]:
                out[r.label].append(learner)
    return out


def _series_names(runs: Sequence[RunInfo]) -> list[tuple[str, str, str]]:
    """(row name, label, learner) for every learner of every label, in suite order."""
    learners = _learner_names(runs)
    return [
        (row_name(lab, ln, len(learners[lab]) > 1), lab, ln)
        for lab in dict.fromkeys(r.label for r in runs)
        for ln in learners[lab]
    ]


# -- figure builders ------------------------------------------------------------------------------
def _curves(runs: list[RunInfo], setting: str, out: Path) -> Path | None:
    series = {}
    for name, label, learner in _series_names(runs):
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for r in runs:
            if r.label == label and r.results:
                for h in r.results["history"]:
                    if learner in h["test"]:
                        by_epoch[h["epoch"]].append(h["test"][learner])
        if by_epoch:
            xs = sorted(by_epoch)
            series[name] = (xs, [float(np.mean(by_epoch[e])) for e in xs])
    if not series:
        return None
    return figures.curves(
        series,
        out / f"curves_{_safe(setting)}.png",
        title=f"test accuracy over epochs ({setting}, mean over seeds)",
    )


def _per_class(runs: list[RunInfo], setting: str, out: Path) -> Path | None:
    series = {}
    for name, label, learner in _series_names(runs):
        accs = [
            r.results["last"][learner]["test_per_class_acc"]
            for r in runs
            if r.label == label and r.results and learner in r.results["last"]
        ]
        if accs:
            series[name] = list(np.mean(np.asarray(accs, dtype=float), axis=0))
    if not series:
        return None
    classes = [str(c) for c in range(len(next(iter(series.values()))))]
    return figures.grouped_bars(
        classes,
        series,
        out / f"per_class_{_safe(setting)}.png",
        ylabel="test accuracy",
        title=f"per-class test accuracy, last epoch ({setting})",
    )


def _best_label(runs: list[RunInfo], exclude: str) -> str | None:
    scores = defaultdict(list)
    for r in runs:
        if r.results and r.label != exclude:
            scores[r.label].append(max(v["test_acc"] for v in r.results["last"].values()))
    return max(scores, key=lambda k: np.mean(scores[k])) if scores else None


def _confusions(
    runs: list[RunInfo], setting: str, out: Path, compare: Sequence[str] | None
) -> Path | None:
    done = [r for r in runs if r.results]
    if not done:
        return None
    seed = min(r.seed for r in done)
    first = [r for r in done if r.seed == seed]
    labels = [r.label for r in first]
    if compare:
        pair = [c for c in compare if c in labels]
    else:
        a = "ce" if "ce" in labels else labels[0]
        b = _best_label(first, a)
        pair = [a] + ([b] if b else [])
    mats, titles = [], []
    for lab in pair:
        r = next(x for x in first if x.label == lab)
        for learner, last in r.results["last"].items():  # type: ignore[union-attr]
            mats.append(np.asarray(last["test_confusion"]))
            name = lab if len(r.results["last"]) == 1 else f"{lab} {learner}"  # type: ignore[index]
            titles.append(f"{name}: acc {last['test_acc']:.3f}")
    if not mats:
        return None
    return figures.confusion_pair(
        mats,
        titles,
        out / f"confusion_{_safe(setting)}.png",
        suptitle=f"test confusion, last epoch ({setting}, seed {seed})",
    )


def _weights(run: RunInfo, out: Path) -> list[Path]:
    """One histogram figure per per-example weight the run saved (LFM-DR has both b and a)."""
    from lfm.apps.suspects import WEIGHT_KEYS

    path = run.dir / "per_example.npz"
    if not path.is_file():
        return []
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(arrays.get("index", []))
    keys = [k for k in WEIGHT_KEYS if k in arrays and arrays[k].shape == (n,)]
    return [
        figures.weight_histograms(
            arrays[key],
            arrays["label"],
            out / f"weights_{key}_{_safe(run.dir.name)}.png",
            noisy=arrays.get("noisy"),
            key=key,
            title=f"learned {key}: {run.label} ({run.setting})",
        )
        for key in keys
        if not np.isnan(arrays[key]).all()
    ]


def ablation_groups(
    runs: Sequence[RunInfo], extra: Sequence[Sequence[str]] = ()
) -> list[list[str]]:
    """Groups of labels to compare with bars: labels sharing one method, plus `extra` groups.

    Example
    -------
    >>> ablation_groups(runs)  # e.g. [['lfm', 'lfm-no-u', 'lfm-cosine']]
    """
    by_method: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        if r.results and r.label not in by_method[r.method]:  # failed labels have no bars
            by_method[r.method].append(r.label)
    groups = [labels for labels in by_method.values() if len(labels) > 1]
    labels = {r.label for r in runs}
    groups += [[g for g in grp if g in labels] for grp in extra]
    return [g for g in groups if len(g) > 1]


def _ablation(runs: list[RunInfo], group: list[str], out: Path, k: int) -> Path | None:
    settings = list(dict.fromkeys(r.setting for r in runs if r.label in group))
    learners = _learner_names(runs)
    series, errors = {}, {}
    for label in group:
        for learner in learners[label]:
            name = row_name(label, learner, len(learners[label]) > 1)
            means, stds = [], []
            for s in settings:
                vals = [
                    r.results["last"][learner]["test_acc"]
                    for r in runs
                    if r.label == label
                    and r.setting == s
                    and r.results
                    and learner in r.results["last"]
                ]
                m, sd = mean_std(vals) if vals else (np.nan, 0.0)
                means.append(m)
                stds.append(sd)
            series[name], errors[name] = means, stds
    if not series:
        return None
    return figures.grouped_bars(
        settings,
        series,
        out / f"ablation_{k}_{_safe(group[0])}.png",
        errors=errors,
        title=f"ablation: {', '.join(group)} (last epoch)",
    )


# -- html ---------------------------------------------------------------------------------------
def markdown_to_html(text: str) -> str:
    """The markdown subset ``table.md`` uses: headings, pipe tables, bullets, **bold**, `code`.

    Example
    -------
    >>> markdown_to_html("| a | b |\\n|---|---|\\n| **1** | 2 |")
    '<table>\\n<tr><th>a</th><th>b</th></tr>\\n<tr><td><b>1</b></td><td>2</td></tr>\\n</table>'
    """

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out: list[str] = []
    table: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
            rows = [f"<tr>{''.join(f'<th>{inline(c)}</th>' for c in cells[0])}</tr>"]
            rows += [f"<tr>{''.join(f'<td>{inline(c)}</td>' for c in r)}</tr>" for r in cells[2:]]
            out.append("<table>\n" + "\n".join(rows) + "\n</table>")
            table = []
        if line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}"""


def make_report(
    path: str | Path,
    out: str | Path | None = None,
    compare: Sequence[str] | None = None,
    groups: Sequence[Sequence[str]] = (),
    max_weight_figures: int = 40,
) -> Path:
    """Draw every figure the runs under `path` allow and write ``index.html``.

    Parameters
    ----------
    path : str or Path
        A bench folder (``lfm bench --out``) or a single run folder (``lfm train --out``).
    out : str or Path, optional
        Where the PNGs and ``index.html`` go (default: ``PATH/report``).
    compare : sequence of str, optional
        The two method labels whose confusion matrices are drawn side by side.
    groups : sequence of sequences of str
        Extra groups of labels to compare with bars (beyond the automatic ablation groups).
    max_weight_figures : int
        At most this many weight-histogram figures (one per run, first seed).

    Returns
    -------
    Path
        The ``index.html`` written.

    Example
    -------
    >>> make_report("bench/")  # bench/report/index.html
    """
    root = Path(path)
    runs = load_runs(root)
    if not runs:
        raise LFMError(
            f"no runs under {root}", "pass a folder written by `lfm bench` or `lfm train --out`"
        )
    dest = Path(out) if out else root / "report"
    dest.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(root)
    sections: list[tuple[str, list[Path]]] = []
    settings = list(dict.fromkeys(r.setting for r in runs if r.results))
    for title, fn in (("Accuracy over epochs", _curves), ("Per-class accuracy", _per_class)):
        figs = [fn([r for r in runs if r.setting == s], s, dest) for s in settings]
        sections.append((title, [f for f in figs if f]))
    figs = [_confusions([r for r in runs if r.setting == s], s, dest, compare) for s in settings]
    sections.append(("Confusion matrices", [f for f in figs if f]))
    first_seed = {}
    for r in runs:
        if r.results:
            first_seed[(r.label, r.setting)] = min(
                first_seed.get((r.label, r.setting), r.seed), r.seed
            )
    chosen = [r for r in runs if r.results and r.seed == first_seed[(r.label, r.setting)]]
    figs = []
    for r in chosen:
        if len(figs) >= max_weight_figures:
            break
        figs.extend(_weights(r, dest))
    sections.append(("Learned weights", [f for f in figs if f]))
    figs = [_ablation(runs, g, dest, k) for k, g in enumerate(ablation_groups(runs, groups))]
    sections.append(("Ablations", [f for f in figs if f]))
    tables = markdown_tables(rows)
    write_atomic(dest / "table.md", tables)
    body = [markdown_to_html(tables)]
    for title, figs in sections:
        if figs:
            body.append(f"<h2>{html.escape(title)}</h2>")
            body += [
                f'<figure><img src="{html.escape(f.name)}" alt="{html.escape(f.stem)}">'
                f"<figcaption>{html.escape(f.stem)}</figcaption></figure>"
                for f in figs
            ]
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>lfm report</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    index = dest / "index.html"
    write_atomic(index, page)
    return index
