"""The report's figures, each a function from plain data to one PNG (matplotlib, Agg backend).

Every function takes already-loaded numbers (lists, arrays, dicts), so it can be called on
anything, not just a bench folder; `lfm.apps.report` decides what to draw.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lfm.train.atomic import write_figure  # noqa: E402

DPI = 90


def _colour(k: int) -> tuple:
    """The k-th of 20 distinct colours."""
    return plt.get_cmap("tab20")(k % 20)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_figure(fig, path, dpi=DPI, bbox_inches="tight")  # keep legends placed outside the axes
    plt.close(fig)
    return path


def confusion_pair(
    matrices: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, suptitle: str = ""
) -> Path:
    """Row-normalised confusion matrices side by side (the paper's Fig. 6 layout).

    Parameters
    ----------
    matrices : sequence of (C, C) arrays
        Counts; row = true class, column = predicted class.
    titles : sequence of str
        One title per matrix (e.g. method names with their accuracy).
    path : str or Path
        The PNG to write.
    suptitle : str
        A title over all panels (e.g. the setting).

    Returns
    -------
    Path
        `path`.

    Example
    -------
    >>> confusion_pair([np.eye(3) * 5, np.ones((3, 3))], ["ce", "l2rw"], "cm.png")
    """
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, cm, title in zip(axes[0], matrices, titles, strict=True):
        cm = np.asarray(cm, dtype=float)
        norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if len(cm) <= 12:  # numbers stay legible only for few classes
            for i in range(len(cm)):
                for j in range(len(cm)):
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.set_layout_engine("none")
    write_figure(fig, path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    errors: Mapping[str, Sequence[float]] | None = None,
    ylabel: str = "test accuracy",
    title: str = "",
) -> Path:
    """Bars of several series over the same groups (per-class accuracy, ablations, ...).

    Parameters
    ----------
    groups : sequence of str
        The x-axis groups (classes, settings).
    series : mapping name -> values
        One bar per group for each name, values aligned with `groups` (NaN = no bar).
    path : str or Path
        The PNG to write.
    errors : mapping name -> values, optional
        Error-bar half-heights (e.g. std over seeds).
    ylabel, title : str
        Axis label and title.

    Returns
    -------
    Path
        `path`.

    Example
    -------
    >>> grouped_bars(["0", "1"], {"ce": [0.9, 0.8], "l2rw": [0.92, 0.85]}, "bars.png")
    """
    names = list(series)
    x = np.arange(len(groups))
    width = 0.8 / max(len(names), 1)
    # about 0.12 inch per bar, kept between a readable 6 and a screen-wide 14 inches
    bars = len(groups) * max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.12 * bars + 3)), 3.8))
    for k, name in enumerate(names):
        err = None if errors is None else errors.get(name)
        ax.bar(
            x + (k - (len(names) - 1) / 2) * width,
            series[name],
            width,
            yerr=err,
            label=name,
            capsize=2,
            color=_colour(k),
        )
    ax.set_xticks(x)
    ax.set_xticklabels(
        groups,
        rotation=30 if max(map(len, groups), default=0) > 6 else 0,
        ha="right" if max(map(len, groups), default=0) > 6 else "center",
    )
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05 if ylabel.endswith("accuracy") else None)
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def weight_histograms(
    weights: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    noisy: np.ndarray | None = None,
    title: str = "",
    key: str = "weight",
) -> Path:
    """Learned weights: histogram by clean / noisy label, and their spread per (given) class.

    Parameters
    ----------
    weights : (N,) array
        One weight per training example; NaN (never seen) is left out.
    labels : (N,) int array
        The given (possibly noisy) labels.
    path : str or Path
        The PNG to write.
    noisy : (N,) bool array, optional
        The noisy-label mask; without it the left panel is one histogram.
    title, key : str
        Title, and the name of the weight for the axis.

    Returns
    -------
    Path
        `path`.

    Example
    -------
    >>> weight_histograms(np.random.rand(100), np.arange(100) % 10, "w.png", np.arange(100) < 30)
    """
    w = np.asarray(weights, dtype=float)
    ok = ~np.isnan(w)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    lo, hi = (float(w[ok].min()), float(w[ok].max())) if ok.any() else (0.0, 1.0)
    if hi - lo < 1e-9:  # all weights equal (e.g. nothing dropped yet): give the bar some width
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 40)
    if noisy is not None:
        nz = np.asarray(noisy, bool)
        for mask, name in ((ok & ~nz, "clean"), (ok & nz, "noisy")):
            if mask.any():  # a clean setting has no noisy examples to draw
                a.hist(w[mask], bins=bins, alpha=0.6, label=f"{name} ({mask.sum()})", density=True)
        a.legend(fontsize=8)
    else:
        a.hist(w[ok], bins=bins, alpha=0.8)
    a.set_xlabel(key)
    a.set_ylabel("density")
    a.set_title("by label quality" if noisy is not None else "all training examples", fontsize=10)
    classes = np.unique(labels)
    data = [w[ok & (labels == c)] for c in classes]
    b.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False)
    b.set_xticks(np.arange(1, len(classes) + 1))
    b.set_xticklabels([str(c) for c in classes], fontsize=7)
    b.set_xlabel("given class")
    b.set_ylabel(key)
    b.set_title("by class", fontsize=10)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    ylabel: str = "test accuracy",
    title: str = "",
) -> Path:
    """Lines y over x per name (accuracy over epochs per method).

    Example
    -------
    >>> curves({"ce": ([1, 2, 3], [0.5, 0.7, 0.8])}, "curves.png")
    """
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, (name, (x, y)) in enumerate(series.items()):
        # tab20 gives each of up to 20 lines its own colour; a second learner (W2) is dashed
        ax.plot(
            x,
            y,
            marker="o" if len(x) < 15 else None,
            ms=3,
            label=name,
            color=_colour(k),
            linestyle="--" if name.endswith("W2") else "-",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    # outside the axes, so the legend never hides a curve
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)
