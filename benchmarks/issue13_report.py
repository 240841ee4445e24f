"""Issue 13: the development grid's tables, the validation-only choice, and the diagnosis.

Reads the `lfm bench` folders that `benchmarks/issue13_grid.sh` writes (one per setting) and
prints Markdown:

1. per setting, every method and learner: held-out selection accuracy (`select_acc`: clean
   examples no method trained or meta-trained on, `--select-per-class`), last-epoch test
   accuracy, and the AUROC of the learned weights against the injected-noise mask (low weight
   = suspect); mean ± sample std over seeds;
2. the choice among the LFM-DR (variant, learner) pairs, on held-out accuracy only (the rule is
   `choose`'s docstring), and then, on test accuracy, whether the chosen pair meets the issue's
   target (never more than 1 point below CE; best or within one std of the best in most);
3. the diagnosis: W2 under imbalance (a, r and W2's accuracy by class), b under heavy noise
   (fraction of clean / noisy examples switched off, by epoch), L2RW's collapse (its zero
   weights and test accuracy by epoch), with PNG figures when `--figures DIR` is given.

    python benchmarks/issue13_report.py evidence/issue13 --figures docs/figures/issue13
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dr_variants import auroc  # noqa: E402  (the same AUROC as section 1's tables)

# the LFM-DR pairs the choice is made among (bench labels of issue13_grid.sh)
LFM_LABELS = ("lfm-w1-val", "cand-a", "cand-ab", "cand-abw", "cand-a-slow")
PRESET_OF = {
    "lfm-w1-val": "w1-val",
    "cand-a": "w1-val-a-norm",
    "cand-ab": "w1-val-a-norm-b-norm",
    "cand-abw": "w1-val-a-norm-b-norm-warm",
    "cand-a-slow": "w1-val-a-norm-slow-b",
}
OFF = 0.1  # an example is "switched off" when its stage-1 weight w_i is below this
SETTING_ORDER = (
    "mnist1d-flip0.4",
    "mnist1d-uniform0.4",
    "mnist1d-imb50",
    "mnist1d-imb10-flip0.2",
    "digits-flip0.4",
)


def mean_std(vals: list[float], digits: int = 3) -> str:
    """'m ± s' (sample std over seeds), or '-'."""
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{np.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def load_runs(folder: Path | list[Path]) -> list[dict]:
    """Every complete run of a bench folder (or of several, one setting's): spec, results
    and per-example arrays."""
    runs = []
    folders = folder if isinstance(folder, list) else [folder]
    for d in sorted(d for f in folders if (f / "runs").is_dir() for d in (f / "runs").iterdir()):
        if not (d / "results.json").is_file():
            continue
        res = json.loads((d / "results.json").read_text())
        if res.get("status") != "complete":
            continue
        pe = d / "per_example.npz"
        arrays = dict(np.load(pe)) if pe.is_file() else {}
        runs.append({"spec": json.loads((d / "run.json").read_text()), "res": res, "pe": arrays})
    return runs


def weight_of(label: str, pe: dict, res: dict) -> np.ndarray | None:
    """The stage-1 weight w_i each example gets: b (or b / mean(b) when b is batch-normalised)
    for LFM-DR; L2RW / MW-Net / small-loss: their recorded weight."""
    if "b" in pe:
        b = pe["b"].astype(float)
        mode = res["config"]["method_options"].get("preset", "")
        return b / b.mean() if "b-norm" in mode else b
    return pe.get("weight")


def cells(folder: Path | list[Path]) -> dict[str, dict[str, list[float]]]:
    """(method [learner]) -> lists over seeds of select / test accuracy and AUROCs."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in load_runs(folder):
        label, res, pe = run["spec"]["label"], run["res"], run["pe"]
        for learner, last in res["last"].items():
            name = label if learner in ("model", "W") else f"{label} {learner}"
            c = out[name]
            c["select"].append(last.get("select_acc", float("nan")))
            c["test"].append(last["test_acc"])
            if learner in ("model", "W", "W1") and "noisy" in pe and pe["noisy"].any():
                w = weight_of(label, pe, res)
                if w is not None:
                    c["auroc_w"].append(auroc(-w.astype(float), pe["noisy"]))
                if "a" in pe:
                    c["auroc_a"].append(auroc(-pe["a"].astype(float), pe["noisy"]))
    return out


def table(name: str, c: dict[str, dict[str, list[float]]]) -> str:
    """One setting's Markdown table; the best mean per accuracy column in bold."""
    rows = sorted(c, key=lambda k: (k.split()[0] in LFM_LABELS, k))
    best_s = max(np.nanmean(c[k]["select"]) for k in rows)
    best_t = max(np.mean(c[k]["test"]) for k in rows)
    lines = [
        f"#### {name}\n",
        "| method | seeds | held-out acc (choice) | test acc (last) | AUROC of b / weight "
        "| AUROC of a |",
        "|---|---|---|---|---|---|",
    ]
    for k in rows:
        s, t = mean_std(c[k]["select"]), mean_std(c[k]["test"])
        s = f"**{s}**" if np.nanmean(c[k]["select"]) == best_s else s
        t = f"**{t}**" if np.mean(c[k]["test"]) == best_t else t
        lines.append(
            f"| {k} | {len(c[k]['test'])} | {s} | {t} | {mean_std(c[k].get('auroc_w', []))} | "
            f"{mean_std(c[k].get('auroc_a', []))} |"
        )
    return "\n".join(lines) + "\n"


def choose(grid: dict[str, dict[str, dict[str, list[float]]]]) -> tuple[str, list[str]]:
    """The validation-only rule, fixed before the grid ran: among the LFM-DR (variant, learner)
    pairs, the one whose worst setting is least below CE in held-out accuracy (max over pairs
    of min over settings of mean select_acc(pair) - mean select_acc(ce)); pairs within 0.005
    of that are split by their mean held-out accuracy over the settings. Test accuracy is not
    read. Returns the pair and the lines that show the computation."""
    pairs = [f"{lab} {ln}" for lab in LFM_LABELS for ln in ("W1", "W2")]
    # a setting still running, with no LFM-DR run yet, cannot take part
    grid = {k: c for k, c in grid.items() if any(p in c for p in pairs)}
    score = {}
    lines = [
        "| pair | " + " | ".join(grid) + " | worst | mean held-out acc |",
        "|---" * (len(grid) + 3) + "|",
    ]
    for p in pairs:
        gaps, accs = [], []
        for c in grid.values():
            if p not in c or "ce" not in c:
                break
            gaps.append(float(np.nanmean(c[p]["select"]) - np.nanmean(c["ce"]["select"])))
            accs.append(float(np.nanmean(c[p]["select"])))
        else:
            score[p] = (min(gaps), float(np.mean(accs)))
            lines.append(
                f"| {p} | "
                + " | ".join(f"{g:+.3f}" for g in gaps)
                + f" | {min(gaps):+.3f} | {np.mean(accs):.3f} |"
            )
    top = max(v[0] for v in score.values())
    near = [p for p, v in score.items() if v[0] >= top - 0.005]
    return max(near, key=lambda p: score[p][1]), lines


def target(grid: dict[str, dict[str, dict[str, list[float]]]], pair: str) -> list[str]:
    """On test accuracy, after the choice: the pair against CE and against the best method
    (within one std: best mean - pair mean <= the larger of the two stds)."""
    lines = [
        "| setting | pair test acc | ce | pair - ce | best method | best | within one std |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in grid.items():
        if pair not in c:  # still running
            continue
        m = {k: float(np.mean(v["test"])) for k, v in c.items()}
        sd = {
            k: float(np.std(v["test"], ddof=1)) if len(v["test"]) > 1 else 0.0 for k, v in c.items()
        }
        best = max(m, key=m.get)
        ok = m[best] - m[pair] <= max(sd[best], sd[pair])
        lines.append(
            f"| {name} | {mean_std(c[pair]['test'])} | {mean_std(c['ce']['test'])} | "
            f"{m[pair] - m['ce']:+.3f} | {best} | {m[best]:.3f} | {'yes' if ok else 'no'} |"
        )
    return lines


# ------------------------------------------------------------------------------- diagnosis


def _val_labels(res: dict) -> np.ndarray:
    """The run's clean validation labels (rebuilt: the split is a pure function of its config)."""
    from lfm.data.build import build_data
    from lfm.data.config import DataConfig

    return build_data(DataConfig(**res["data"]["config"])).val.y.numpy()


def w2_imbalance(folder: Path, figures: Path | None) -> list[str]:
    """a, r and W2's test accuracy by class (classes from largest to smallest)."""
    runs = load_runs(folder)
    counts = np.array(runs[0]["res"]["data"]["train_class_counts"])
    order = np.argsort(-counts)
    by: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        lab, res, pe = run["spec"]["label"], run["res"], run["pe"]
        if lab not in ("ce", "lfm-w1-val", "cand-a"):
            continue
        for learner, last in res["last"].items():
            by[f"{lab} {learner}"]["acc"].append(np.array(last["test_per_class_acc"]))
        if "a" in pe:
            y = pe["label"]
            by[lab]["a"].append(np.array([np.nanmean(pe["a"][y == k]) for k in range(len(counts))]))
            yv = _val_labels(res)
            by[lab]["r"].append(np.array([pe["r"][yv == k].mean() for k in range(len(counts))]))
            if "a_history" in pe:
                ah = pe["a_history"].astype(float)
                by[lab]["a_hist"].append(
                    np.array([[np.nanmean(row[y == k]) for k in range(len(counts))] for row in ah])
                )
            by[lab]["a_mean"].append(np.array([h["train"]["a_mean"] for h in res["history"]]))
    head = " | ".join(f"c{k} ({counts[k]})" for k in order)
    lines = [f"| {folder.name}: by class (train count) | {head} |", "|---" * (len(order) + 1) + "|"]

    def row(name: str, vals: list[np.ndarray]) -> None:
        v = np.mean(vals, axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{v[k]:.2f}" for k in order) + " |")

    for key in ("ce model", "lfm-w1-val W1", "lfm-w1-val W2", "cand-a W2"):
        if by[key]["acc"]:
            row(f"test acc, {key}", by[key]["acc"])
    for lab in ("lfm-w1-val", "cand-a"):
        if by[lab]["a"]:
            row(f"mean last a, {lab}", by[lab]["a"])
            row(f"mean r, {lab}", by[lab]["r"])
    if by["lfm-w1-val"]["a_mean"]:
        am = np.mean(by["lfm-w1-val"]["a_mean"], axis=0)
        lines.append(
            "\n`lfm-w1-val`: batch mean of a (last step of epochs 1, 5, 10, ..., last): "
            + ", ".join(f"{am[i]:.3f}" for i in [0, 4, 9, 14, 19, len(am) - 1] if i < len(am))
        )
    if figures is not None and by["lfm-w1-val"]["a_hist"]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lfm.train.atomic import write_figure

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, lab in zip(axes, ("lfm-w1-val", "cand-a"), strict=True):
            if not by[lab]["a_hist"]:  # not run yet
                continue
            ah = np.mean(by[lab]["a_hist"], axis=0)  # (epochs, classes)
            for j, k in enumerate(order):
                ax.plot(
                    np.arange(1, len(ah) + 1),
                    ah[:, k],
                    color=plt.cm.viridis(j / len(order)),
                    label=f"class {k} (n={counts[k]})",
                )
            ax.set_title(f"{folder.name}: mean a by class, {lab}")
            ax.set_xlabel("epoch")
        axes[0].set_ylabel("a (last value of each example)")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        write_figure(fig, figures / f"{folder.name}-a-by-class.png", dpi=110)
        plt.close(fig)
    return lines


def b_switch_off(folder: Path, figures: Path | None, extra: tuple[Path, ...] = ()) -> list[str]:
    """Fraction of clean and of noisy examples whose stage-1 weight is below OFF, by epoch
    (runs of `folder` and of the same setting's folders under `extra`)."""
    runs = load_runs([folder] + [e / folder.name for e in extra])
    curves: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        lab, res, pe = run["spec"]["label"], run["res"], run["pe"]
        if "b_history" not in pe or "noisy" not in pe:
            continue
        bh = pe["b_history"].astype(float)
        if "b-norm" in res["config"]["method_options"].get("preset", ""):
            bh = bh / bh.mean(axis=1, keepdims=True)
        noisy = pe["noisy"].astype(bool)
        curves[lab]["clean"].append((bh[:, ~noisy] < OFF).mean(axis=1))
        curves[lab]["noisy"].append((bh[:, noisy] < OFF).mean(axis=1))
        # how far b moves the rest: mean weight, and the share of clean ones below one half
        curves[lab]["w_clean"].append(bh[-1, ~noisy].mean())
        curves[lab]["w_noisy"].append(bh[-1, noisy].mean())
        curves[lab]["half_clean"].append((bh[-1, ~noisy] < 0.5).mean())
    lines = [
        f"| {folder.name}: w < {OFF} | clean, epoch 1 | clean, epoch 5 | clean, last | "
        "noisy, epoch 1 | noisy, epoch 5 | noisy, last | first epoch > 10% of clean off | "
        "mean w clean / noisy, last | clean with w < 0.5, last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab in sorted(curves):
        c, n = np.array(curves[lab]["clean"]), np.array(curves[lab]["noisy"])
        first = []
        for s in c:
            hit = np.nonzero(s > 0.1)[0]
            first.append(str(hit[0] + 1) if len(hit) else "never")
        lines.append(
            f"| {lab} | {mean_std(list(c[:, 0]))} | {mean_std(list(c[:, 4]))} | "
            f"{mean_std(list(c[:, -1]))} | {mean_std(list(n[:, 0]))} | {mean_std(list(n[:, 4]))} | "
            f"{mean_std(list(n[:, -1]))} | {', '.join(first)} | "
            f"{mean_std(curves[lab]['w_clean'], 2)} / {mean_std(curves[lab]['w_noisy'], 2)} | "
            f"{mean_std(curves[lab]['half_clean'])} |"
        )
    if figures is not None and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lfm.train.atomic import write_figure

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, lab in enumerate(sorted(curves)):
            for kind, ls in (("clean", "-"), ("noisy", "--")):
                v = np.mean(curves[lab][kind], axis=0)
                ax.plot(np.arange(1, len(v) + 1), v, ls, color=f"C{i}", label=f"{lab}, {kind}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"fraction with w < {OFF}")
        ax.set_title(f"{folder.name}: examples switched off by b (mean of seeds)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        write_figure(fig, figures / f"{folder.name}-b-switched-off.png", dpi=110)
        plt.close(fig)
    return lines


def l2rw_collapse(folder: Path, figures: Path | None) -> list[str]:
    """L2RW: fraction of zero weights (clean / noisy; by class where imbalanced) and test
    accuracy, by epoch, beside CE's test accuracy."""
    runs = load_runs(folder)
    z: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        lab, res, pe = run["spec"]["label"], run["res"], run["pe"]
        acc = np.array([h["test"][next(iter(h["test"]))] for h in res["history"]])
        z[f"test {lab}"].append(acc)
        # accuracy on the clean meta set it trains its weights on
        z[f"val {lab}"].append(np.array([h["val"][next(iter(h["val"]))] for h in res["history"]]))
        if lab != "l2rw" or "weight_history" not in pe:
            continue
        wh = pe["weight_history"].astype(float)  # (epochs, n), NaN = not yet seen
        zero = np.where(np.isnan(wh), np.nan, wh == 0)
        noisy = pe["noisy"].astype(bool) if "noisy" in pe else np.zeros(wh.shape[1], bool)
        z["clean"].append(np.nanmean(zero[:, ~noisy], axis=1))
        if noisy.any():
            z["noisy"].append(np.nanmean(zero[:, noisy], axis=1))
        y = pe["label"]
        counts = np.bincount(y)
        small = np.argsort(counts)[:3]
        z["smallest3"].append(np.nanmean(zero[:, np.isin(y, small)], axis=1))
        z["largest"].append(np.nanmean(zero[:, y == np.argmax(counts)], axis=1))
    if not z["clean"]:
        return []
    ep = [0, 4, 9, len(z["clean"][0]) - 1]
    lines = [
        f"| {folder.name}: L2RW, by epoch | " + " | ".join(f"epoch {i + 1}" for i in ep) + " |",
        "|---" * (len(ep) + 1) + "|",
    ]
    for key, name in (
        ("clean", "zero weight, clean examples"),
        ("noisy", "zero weight, noisy examples"),
        ("smallest3", "zero weight, 3 smallest classes"),
        ("largest", "zero weight, largest class"),
        ("val l2rw", "meta-set (validation) acc, l2rw"),
        ("test l2rw", "test acc, l2rw"),
        ("test ce", "test acc, ce"),
    ):
        if z.get(key):
            v = np.array(z[key])
            lines.append(f"| {name} | " + " | ".join(mean_std(list(v[:, i]), 2) for i in ep) + " |")
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lfm.train.atomic import write_figure

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, ls in (("clean", "-"), ("noisy", "--"), ("smallest3", ":")):
            if z.get(key):
                v = np.mean(z[key], axis=0)
                ax.plot(np.arange(1, len(v) + 1), v, ls, color="C0", label=f"zero weight, {key}")
        for key, col in (("test l2rw", "C1"), ("test ce", "C2")):
            v = np.mean(z[key], axis=0)
            ax.plot(
                np.arange(1, len(v) + 1), v, color=col, label=key.replace("test ", "test acc, ")
            )
        ax.set_xlabel("epoch")
        ax.set_title(f"{folder.name}: L2RW (mean of seeds)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        write_figure(fig, figures / f"{folder.name}-l2rw.png", dpi=110)
        plt.close(fig)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print the tables, the choice, the target check and the diagnosis."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the folder issue13_grid.sh wrote")
    p.add_argument(
        "--extra", type=Path, action="append", default=[], help="more runs of the same settings"
    )
    p.add_argument("--figures", type=Path, default=None, help="write PNG figures here")
    p.add_argument("--no-diagnosis", action="store_true")
    a = p.parse_args(argv)
    folders = [a.root / s for s in SETTING_ORDER if (a.root / s / "runs").is_dir()]
    grid = {f.name: cells([f] + [e / f.name for e in a.extra]) for f in folders}
    grid = {k: v for k, v in grid.items() if v}  # a setting still running has no runs yet
    for name, c in grid.items():
        print(table(name, c))
    pair, lines = choose(grid)
    print("Held-out accuracy minus CE's, per setting (the choice reads only this):\n")
    print("\n".join(lines))
    print(f"\nChosen: **{pair}** (preset `{PRESET_OF[pair.split()[0]]}`).\n")
    print("Target, on test accuracy (read after the choice):\n")
    print("\n".join(target(grid, pair)) + "\n")
    if a.no_diagnosis:
        return
    for f in folders:
        if "imb" in f.name:
            print("\n".join(w2_imbalance(f, a.figures)) + "\n")
    for f in folders:
        if "flip" in f.name or "uniform" in f.name:
            print("\n".join(b_switch_off(f, a.figures, tuple(a.extra))) + "\n")
    for f in folders:
        out = l2rw_collapse(f, a.figures)
        if out:
            print("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
