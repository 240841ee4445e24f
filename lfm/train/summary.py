"""Plain-text tables of run results, for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def results_rows(results: dict) -> list[dict]:
    """One row per learner of a run: last-epoch and validation-selected accuracies."""
    rows = []
    for name, last in results["last"].items():
        sel = results["selected"][name]
        label = results["method"] if len(results["last"]) == 1 else f"{results['method']} {name}"
        rows.append(
            {
                "method": label,
                "test_last": last["test_acc"],
                "val_last": last["val_acc"],
                "test_sel": sel["test_acc"],
                "sel_epoch": sel["epoch"],
                "sec_per_iter": results["timing"]["sec_per_iter"],
            }
        )
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(
            [format(r[k], f) if isinstance(r[k], int | float) else str(r[k]) for k, _, f in columns]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        # names left-aligned, numbers right-aligned
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs)

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


RUN_COLUMNS = (
    ("method", "method", ""),
    ("test_last", "test acc (last)", ".4f"),
    ("val_last", "val acc (last)", ".4f"),
    ("test_sel", "test acc (val-selected)", ".4f"),
    ("sel_epoch", "selected epoch", "g"),
    ("sec_per_iter", "s/iter", ".4f"),
)


def runs_table(all_results: Sequence[dict]) -> str:
    """The terminal table for one or more runs, side by side."""
    rows = [row for res in all_results for row in results_rows(res)]
    return format_table(rows, RUN_COLUMNS)
