"""Genotypes: the discrete cells a search returns, the published ones, and how they are derived.

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019: `genotypes.py` (DARTS_V1
  is the first-order result, DARTS_V2 the second-order one) and `model_search.genotype()`.
- Chen et al., "Progressive Differentiable Architecture Search", ICCV 2019: the PDARTS genotype
  and the cap on skip-connects in the normal cell (`delete_min_sk_prob` in `train_search.py`).

A cell has two inputs (node 0 = output of the cell two back, node 1 = the previous cell) and
`steps` = 4 intermediate nodes 2..5. Intermediate node i has one edge from every earlier node,
so the supernet cell has 2 + 3 + 4 + 5 = 14 edges, in this order. A genotype keeps two incoming
edges per intermediate node: `normal[2k], normal[2k+1]` are (op, input node) of node k + 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lfm.errors import LFMError
from lfm.nas.ops import PRIMITIVES

STEPS = 4  # intermediate nodes per cell (DARTS)


def num_edges(steps: int = STEPS) -> int:
    """Edges of a supernet cell with `steps` intermediate nodes (14 for 4)."""
    return sum(2 + i for i in range(steps))


@dataclass
class Genotype:
    """Two discrete cells: `normal`/`reduce` list (op, input node), two per intermediate node."""

    normal: list[tuple[str, int]]
    normal_concat: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    reduce: list[tuple[str, int]] = field(default_factory=list)
    reduce_concat: list[int] = field(default_factory=lambda: [2, 3, 4, 5])

    def __post_init__(self):
        self.normal = [(str(op), int(j)) for op, j in self.normal]
        self.reduce = [(str(op), int(j)) for op, j in self.reduce]
        self.normal_concat = [int(i) for i in self.normal_concat]
        self.reduce_concat = [int(i) for i in self.reduce_concat]
        self.validate()

    def validate(self) -> None:
        """Raise LFMError if an op is unknown or an edge reads a node that does not exist yet."""
        for name, cell, concat in (
            ("normal", self.normal, self.normal_concat),
            ("reduce", self.reduce, self.reduce_concat),
        ):
            if len(cell) == 0 or len(cell) % 2:
                raise LFMError(
                    f"genotype {name} cell has {len(cell)} edges",
                    "give two (op, input) pairs per intermediate node",
                )
            for k, (op, j) in enumerate(cell):
                if op not in PRIMITIVES or op == "none":
                    known = ", ".join(p for p in PRIMITIVES if p != "none")
                    raise LFMError(
                        f"genotype {name} cell uses unknown op {op!r}", f"use one of {known}"
                    )
                if not 0 <= j < 2 + k // 2:
                    raise LFMError(
                        f"genotype {name} edge {k} reads node {j}, which does not exist before "
                        f"node "
                        f"{2 + k // 2}",
                        "input indices of node i must be in 0..i-1 (0, 1 are the cell inputs)",
                    )
            steps = len(cell) // 2
            if not concat or any(not 0 <= i < 2 + steps for i in concat):
                raise LFMError(
                    f"genotype {name}_concat {concat} is invalid",
                    f"list node indices in 0..{1 + steps}",
                )

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Genotype:
        """Inverse of `to_dict`; raises LFMError on missing keys or bad entries."""
        missing = {"normal", "normal_concat", "reduce", "reduce_concat"} - set(d)
        if missing:
            raise LFMError(
                f"genotype is missing {', '.join(sorted(missing))}",
                "save genotypes with Genotype.save or lfm search",
            )
        try:
            return cls(
                [tuple(e) for e in d["normal"]],
                list(d["normal_concat"]),
                [tuple(e) for e in d["reduce"]],
                list(d["reduce_concat"]),
            )
        except (TypeError, ValueError) as e:
            raise LFMError(f"genotype entries are malformed ({e})", "use [op, input] pairs") from e

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        from lfm.train.atomic import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        """Read a JSON genotype file (or the name of a built-in genotype, e.g. DARTS_V2)."""
        if str(path) in GENOTYPES:
            return GENOTYPES[str(path)]
        p = Path(path)
        if not p.is_file():
            raise LFMError(
                f"genotype file {str(path)!r} not found",
                f"pass a JSON file written by lfm search, or one of {', '.join(GENOTYPES)}",
            )
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LFMError(
                f"genotype file {str(path)!r} is not JSON ({e})",
                "pass a genotype.json written by lfm search, or DARTS_V1, DARTS_V2, PDARTS",
            ) from e
        return cls.from_dict(d)

    def count(self, op: str, cell: str = "normal") -> int:
        """How many edges of `cell` use `op`."""
        return sum(o == op for o, _ in (self.normal if cell == "normal" else self.reduce))


_C = [2, 3, 4, 5]
# Liu et al. 2019, first-order DARTS on CIFAR-10 (3.3M params, 3.00% error).
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=_C,
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=_C,
)  # fmt: skip
# Liu et al. 2019, second-order DARTS on CIFAR-10 (3.3M params, 2.76% error).
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=_C,
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=_C,
)  # fmt: skip
# Chen et al. 2019, P-DARTS on CIFAR-10 (3.4M params, 2.50% error).
PDARTS = Genotype(
    normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    normal_concat=_C,
    reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    reduce_concat=_C,
)  # fmt: skip

GENOTYPES: dict[str, Genotype] = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "PDARTS": PDARTS}


def derive_cell(
    weights: torch.Tensor, edge_ops: Sequence[Sequence[str]], steps: int = STEPS
) -> list[tuple[str, int]]:
    """Discretise one cell as DARTS does: per node, the top-2 edges by strongest non-none op.

    weights: (E, k) op weights (softmax of alpha) over the k candidates `edge_ops[e]` of edge e.
    An edge's strength is its largest non-`none` weight, its op that argmax; ties keep the lower
    index (Python's stable sort), as in the DARTS code.
    """
    w = weights.detach().float().cpu()
    cell: list[tuple[str, int]] = []
    start = 0
    for i in range(steps):
        n = 2 + i  # incoming edges of node i + 2
        best: list[tuple[float, str]] = []
        for e in range(start, start + n):
            cands = [(float(w[e, k]), op) for k, op in enumerate(edge_ops[e]) if op != "none"]
            if not cands:  # only `none` left on this edge: it can never be picked
                best.append((float("-inf"), "none"))
                continue
            top = max(cands, key=lambda t: t[0])  # first max wins on ties
            best.append(top)
        order = sorted(range(n), key=lambda j: -best[j][0])[:2]
        for j in order:
            if best[j][1] == "none":
                raise LFMError(
                    f"node {i + 2} has fewer than two edges with a non-none candidate",
                    "keep at least one non-none op on every edge when dropping operations",
                )
            cell.append((best[j][1], j))
        start += n
    return cell


def derive_genotype(
    alpha_normal: torch.Tensor,
    alpha_reduce: torch.Tensor,
    normal_ops: Sequence[Sequence[str]] | None = None,
    reduce_ops: Sequence[Sequence[str]] | None = None,
    max_skip_normal: int | None = None,
    steps: int = STEPS,
) -> Genotype:
    """The genotype of architecture logits alpha (E, k); `*_ops` name each edge's k candidates.

    `max_skip_normal` (P-DARTS: 2) caps skip-connects in the normal cell: while there are too
    many, the chosen skip-connect with the smallest weight is zeroed and the cell re-derived,
    so that edge falls back to its next-best op or loses its place to another edge.
    """
    e = num_edges(steps)
    normal_ops = normal_ops or [list(PRIMITIVES)] * e
    reduce_ops = reduce_ops or [list(PRIMITIVES)] * e
    wn = torch.softmax(alpha_normal.detach().float().cpu(), dim=-1)  # (E, k)
    wr = torch.softmax(alpha_reduce.detach().float().cpu(), dim=-1)
    normal = derive_cell(wn, normal_ops, steps)
    if max_skip_normal is not None:
        if max_skip_normal < 0:
            raise LFMError(f"max_skip_normal must be >= 0, got {max_skip_normal}", "use e.g. 2")
        wn = wn.clone()
        while sum(op == "skip_connect" for op, _ in normal) > max_skip_normal:
            # edge index (in the 14) of every chosen skip-connect, and its weight
            chosen = []
            start = 0
            for i in range(steps):
                for op, j in normal[2 * i : 2 * i + 2]:
                    if op == "skip_connect":
                        k = list(normal_ops[start + j]).index("skip_connect")
                        chosen.append((float(wn[start + j, k]), start + j, k))
                start += 2 + i
            _, edge, k = min(chosen)
            wn[edge, k] = 0.0
            normal = derive_cell(wn, normal_ops, steps)
    reduce = derive_cell(wr, reduce_ops, steps)
    concat = list(range(2, 2 + steps))
    return Genotype(normal, concat, reduce, list(concat))


def plot_genotype(genotype: Genotype, path: str | Path) -> None:
    """Draw the normal and reduction cells side by side into an image file (PNG) with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, (title, cell, concat) in zip(
        axes,
        (("normal cell", genotype.normal, genotype.normal_concat),
         ("reduction cell", genotype.reduce, genotype.reduce_concat)),
        strict=True,
    ):  # fmt: skip
        steps = len(cell) // 2
        # node positions: inputs on the left, intermediate nodes in a staggered column, output right
        pos = {0: (0.0, 0.75), 1: (0.0, 0.25)}
        for i in range(steps):
            pos[2 + i] = (1.0 + 0.9 * i, 0.85 - 0.7 * i / max(steps - 1, 1))
        out = (2.0 + 0.9 * steps, 0.5)
        # $...$: matplotlib renders TeX-like subscripts only inside math mode (else literal "_{")
        names = {0: "$c_{k-2}$", 1: "$c_{k-1}$"} | {2 + i: str(i) for i in range(steps)}
        box = {"boxstyle": "round,pad=0.4", "fc": "#dfe9f7", "ec": "#23527c"}
        for k, (op, j) in enumerate(cell):
            dst = 2 + k // 2
            (x0, y0), (x1, y1) = pos[j], pos[dst]
            ax.annotate(
                "", xy=(x1, y1), xytext=(x0, y0),
                arrowprops={"arrowstyle": "->", "color": "#555", "shrinkA": 18, "shrinkB": 18,
                            "connectionstyle": f"arc3,rad={0.15 if k % 2 else -0.15}"},
            )  # fmt: skip
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + (0.03 if k % 2 else -0.03), op, fontsize=8,
                    ha="center", va="center", color="#8b0000",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
        for i in concat:
            ax.annotate("", xy=out, xytext=pos[i],
                        arrowprops={"arrowstyle": "->", "color": "#bbb", "shrinkA": 18,
                                    "shrinkB": 22})  # fmt: skip
        for n, (x, y) in pos.items():
            ax.text(x, y, names[n], ha="center", va="center", fontsize=11, bbox=box)
        ax.text(*out, "$c_{k}$", ha="center", va="center", fontsize=11,
                bbox=box | {"fc": "#f7e3c8"})  # fmt: skip
        ax.set_title(title)
        ax.set_xlim(-0.4, out[0] + 0.4)
        ax.set_ylim(-0.05, 1.05)
        ax.axis("off")
    fig.tight_layout()
    from lfm.train.atomic import write_figure

    write_figure(fig, path, dpi=120)
    plt.close(fig)
