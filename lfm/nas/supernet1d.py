"""A supernet over the 1-D cell space of `lfm.nas.space1d`: one MixedOp per edge, alpha outside.

References:
- Dong and Yang, "NAS-Bench-201", ICLR 2020: a search supernet shares one cell's alpha across
  every cell of the network (the cell topology is searched, the macro-structure is fixed), and
  a cell is derived by the argmax op of every edge, `none` included.
- Liu et al., "DARTS", ICLR 2019 (`model_search.py`): MixedOp = sum_k softmax(alpha)_k op_k(x);
  parameter-free pooling followed by a BatchNorm without affine weights.

The macro-structure is `CellNet1d`'s (the network the ground-truth table trains): a stem conv,
`STAGES` stages of cells with a residual stride-2 block between stages, BatchNorm -> ReLU ->
global pooling, then one linear head per learner. The calling convention is
`lfm.nas.supernet.Supernet`'s, so the DARTS and LFM hypergradients of `lfm.nas.hypergrad` run on
it unchanged: `forward(x, alphas, head=0, all_heads=False)` with `alphas = (alpha_cell (3, k),
alpha_reduce (0, k))`. The second entry has no rows (this space has no searched reduction cell);
it exists so that code written for (normal, reduce) pairs needs no branch, and its gradient is
an empty tensor.

`path` (one op index per edge) runs a single architecture through the shared weights, as random
search with weight sharing (Li and Talwalkar, UAI 2019) trains and ranks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lfm.errors import LFMError
from lfm.models.split import dropout, global_batch_norm
from lfm.nas.ops import Identity, make_op
from lfm.nas.space1d import EDGES, NODES, OPS_1D, _Reduce, arch_string
from lfm.nas.supernet import Alphas, arch_slots, batch_stats_only

STAGES = 3  # CellNet1d's default: the table's networks have 3 stages


class MixedOp1d(nn.Module):
    """One edge: sum_k w_k * op_k(x) over the edge's candidates; (B, C, L) -> (B, C, L)."""

    def __init__(self, c: int, ops: Sequence[str]):
        super().__init__()
        self.names = list(ops)
        self.ops = nn.ModuleList()
        for name in self.names:
            op = make_op(name, c, 1, affine=False, dim=1)
            if "pool" in name:
                # DARTS: pooling has no weights to rescale its output, so it gets its own BN
                op = nn.Sequential(op, nn.BatchNorm1d(c, affine=False))
            self.ops.append(op)
        self.skip_dropout = 0.0  # P-DARTS dropout after the parameter-free skip-connect

    def _run(self, k: int, x: torch.Tensor) -> torch.Tensor:
        y = self.ops[k](x)
        if self.skip_dropout > 0 and self.training and isinstance(self.ops[k], Identity):
            y = dropout(y, self.skip_dropout)
        return y

    def forward(self, x: torch.Tensor, w: torch.Tensor | None, k: int | None = None):
        """Weights w (k,) mix every candidate; or candidate `k` alone (a sampled path)."""
        if k is not None:
            # mutant path-runs-first-op: `self._run(k, x)` -> `self._run(0, x)`
            #   | nas_space_search:one_hot
            return self._run(k, x)
        out = None
        for i, name in enumerate(self.names):
            if name == "none" and len(self.names) > 1:
                continue  # w_none * 0 adds nothing, but w_none still dilutes the others
            y = w[i] * self._run(i, x)
            out = y if out is None else out + y
        return out if out is not None else x.mul(0.0)


class SearchCell1d(nn.Module):
    """Node j = sum over i < j of MixedOp_(i, j)(node i); the last node is the output."""

    def __init__(self, c: int, edge_ops: Sequence[Sequence[str]]):
        super().__init__()
        self.edges = nn.ModuleList(MixedOp1d(c, ops) for ops in edge_ops)

    def forward(self, x, weights: torch.Tensor | None, path: Sequence[int] | None = None):
        """x (B, C, L), weights (E, k) or `path` (E op indices) -> (B, C, L)."""
        nodes, e = [x], 0
        for j in range(1, NODES):
            s = 0
            for i in range(j):
                w = None if weights is None else weights[e + i]
                s = s + self.edges[e + i](nodes[i], w, None if path is None else path[e + i])
            nodes.append(s)
            e += j
        return nodes[-1]


class Supernet1d(nn.Module):
    """The search network of the 1-D cell space (module docstring).

    `layers` cells in all, spread over `STAGES` stages (layers // STAGES each, at least one):
    layers = 3 is the table's network. `edge_ops` lists each edge's candidates (all of OPS_1D by
    default; P-DARTS narrows them). `heads` > 1: LFM parameter sharing (one head per learner).

    Example
    -------
    >>> net = Supernet1d(8, 10, 3)
    >>> a = net.new_alphas()
    >>> net(torch.randn(4, 40), a).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int = 3,
        *,
        edge_ops: Sequence[Sequence[str]] | None = None,
        heads: int = 1,
    ):
        super().__init__()
        if layers < 1 or C < 2:
            raise LFMError(
                f"the 1-D supernet needs layers >= 1 and C >= 2, got layers={layers}, C={C}",
                "use e.g. layers=3, C=8",
            )
        self.edge_ops = [list(o) for o in (edge_ops or [OPS_1D] * len(EDGES))]
        if len(self.edge_ops) != len(EDGES) or len({len(o) for o in self.edge_ops}) != 1:
            raise LFMError(f"edge_ops must list {len(EDGES)} edges with equally many candidates")
        self.C, self.num_classes, self.layers = C, num_classes, layers
        per_stage = max(1, layers // STAGES)
        c = C
        self.stem = nn.Sequential(nn.Conv1d(1, c, 3, padding=1, bias=False), nn.BatchNorm1d(c))
        blocks: list[nn.Module] = []
        for s in range(STAGES):
            if s > 0:
                blocks.append(_Reduce(c, 2 * c))  # (B, c, L) -> (B, 2c, ceil(L/2))
                c *= 2
            blocks += [SearchCell1d(c, self.edge_ops) for _ in range(per_stage)]
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = c
        self.post = nn.Sequential(nn.BatchNorm1d(c), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for _ in range(heads))
        global_batch_norm(batch_stats_only(self))
        arch_slots(self)

    @property
    def num_ops(self) -> tuple[int, int]:
        """Candidates per edge (cell, reduce): alpha's widths (both the same; reduce has 0 rows)."""
        k = len(self.edge_ops[0])
        return k, k

    def new_alphas(self, generator: torch.Generator | None = None, scale: float = 1e-3) -> Alphas:
        """Fresh logits, 1e-3 * N(0, 1) as DARTS: (alpha_cell (E, k), alpha_reduce (0, k))."""
        k = self.num_ops[0]
        return scale * torch.randn(len(EDGES), k, generator=generator), torch.zeros(0, k)

    def set_skip_dropout(self, p: float) -> None:
        """Dropout rate after every skip-connect (P-DARTS)."""
        for m in self.modules():
            if isinstance(m, MixedOp1d):
                m.skip_dropout = p

    def features(
        self, x: torch.Tensor, alphas: Alphas | None, path: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Pooled body features (B, feature_dim) under softmax(alpha_cell), or one `path`."""
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        w = None if path is not None else F.softmax(alphas[0], dim=-1)  # (E, k)
        h = self.stem(x)  # (B, C, L)
        for b in self.blocks:
            h = b(h, w, path) if isinstance(b, SearchCell1d) else b(h)
        return self.post(h).flatten(1)  # (B, feature_dim)

    def forward(
        self,
        x: torch.Tensor,
        alphas: Alphas | None = None,
        head: int = 0,
        all_heads: bool = False,
        path: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, num_classes) of head `head`; with `all_heads`, (features, [logits per head])
        from one body pass. `path` (one candidate index per edge) replaces alphas; without
        either, the ARCH buffers `functional_call` passed (`lfm.nas.supernet`)."""
        if alphas is None and path is None:
            alphas = (self.alpha_normal, self.alpha_reduce)
        f = self.features(x, alphas, path)
        if all_heads:
            return f, [h(f) for h in self.heads]
        return self.heads[head](f)


def derive_arch(
    alpha: torch.Tensor, edge_ops: Sequence[Sequence[str]], max_skip: int | None = None
) -> str:
    """The cell of alpha_cell (E, k): the argmax candidate of every edge, as an arch string.

    `none` competes like any op (NAS-Bench-201's derivation; the table scores such cells).
    `max_skip` (P-DARTS) caps skip-connects: while there are too many, the chosen skip-connect
    with the smallest weight falls back to its edge's next-best candidate.

    Example
    -------
    >>> a = torch.tensor([[0.0, 2, 0, 0, 0], [0, 0, 0, 3, 0], [1, 0, 0, 0, 0]])
    >>> derive_arch(a, [list(OPS_1D)] * 3)
    '|skip_connect~0|+|sep_conv_3x3~0|none~1|'
    """
    w = torch.softmax(alpha.detach().float().cpu(), dim=-1).clone()  # (E, k)
    while True:
        ops = [edge_ops[e][int(w[e].argmax())] for e in range(len(edge_ops))]
        skips = [e for e, op in enumerate(ops) if op == "skip_connect"]
        if max_skip is None or len(skips) <= max_skip:
            return arch_string(tuple(ops))
        e = min(skips, key=lambda e: float(w[e].max()))
        w[e, list(edge_ops[e]).index("skip_connect")] = -1.0  # below every softmax weight


def arch_log_prob(alpha: torch.Tensor, edge_ops: Sequence[Sequence[str]], ops: Sequence[str]):
    """sum over edges of log softmax(alpha)[edge, op]: the supernet's score of one cell.

    -inf when an op was dropped from its edge (P-DARTS): the search cannot choose that cell.
    """
    lp = torch.log_softmax(alpha.detach().float().cpu(), dim=-1)  # (E, k)
    total = 0.0
    for e, op in enumerate(ops):
        if op not in edge_ops[e]:
            return float("-inf")
        total += float(lp[e, list(edge_ops[e]).index(op)])
    return total
