"""A small NAS-Bench-201-style cell space on sequences, small enough to train every member.

Reference: Dong and Yang, "NAS-Bench-201: Extending the Scope of Reproducible Neural
Architecture Search", ICLR 2020: a cell is a DAG whose nodes are feature maps and whose every
edge carries one operation; node j is the sum of its incoming edges; the last node is the
cell's output. NAS-Bench-201 has 4 nodes (6 edges) and 5 operations, 15,625 cells. On a 2-core
CPU that is out of reach, so this space keeps 3 nodes (edges 0->1, 0->2, 1->2) and five of the
DARTS operations in 1-D (`lfm.nas.ops`, dim=1): 5^3 = 125 cells, each trainable in seconds on
MNIST-1D, with parameter-free operations (none, skip, pooling) beside convolutions so that
collapse to parameter-free cells can be seen.

Architecture strings follow NAS-Bench-201's: `|op~0|+|op~0|op~1|` lists node 1's incoming
edge (from node 0), then node 2's (from nodes 0 and 1).

The network (`CellNet1d`): a stem conv, then `stages` stages of `cells` cells each, with a
residual stride-2 block between stages that doubles the channels (as NAS-Bench-201's), global
average pooling and a linear classifier. (B, L) or (B, 1, L) inputs.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from lfm.nas.ops import ReLUConvBN, make_op

OPS_1D: tuple[str, ...] = (
    "none",
    "skip_connect",
    "avg_pool_3x3",
    "sep_conv_3x3",
    "dil_conv_3x3",
)
NODES = 3  # node 0 is the cell's input; node 2 its output
EDGES: tuple[tuple[int, int], ...] = tuple((i, j) for j in range(1, NODES) for i in range(j))


def arch_string(ops: tuple[str, ...]) -> str:
    """The NAS-Bench-201 string of a cell given one op per edge, in `EDGES` order.

    Example
    -------
    >>> arch_string(("skip_connect", "sep_conv_3x3", "none"))
    '|skip_connect~0|+|sep_conv_3x3~0|none~1|'
    """
    if len(ops) != len(EDGES) or any(op not in OPS_1D for op in ops):
        raise ValueError(f"a cell has {len(EDGES)} ops from {OPS_1D}, got {ops}")
    nodes, k = [], 0
    for j in range(1, NODES):
        nodes.append("|" + "|".join(f"{ops[k + i]}~{i}" for i in range(j)) + "|")
        k += j
    return "+".join(nodes)


def parse_arch(arch: str) -> tuple[str, ...]:
    """One op per edge, in `EDGES` order, from a NAS-Bench-201 string (ValueError if malformed).

    Example
    -------
    >>> parse_arch("|skip_connect~0|+|sep_conv_3x3~0|none~1|")
    ('skip_connect', 'sep_conv_3x3', 'none')
    """
    parts = arch.split("+")
    ops: list[str] = []
    if len(parts) != NODES - 1:
        raise ValueError(f"{arch!r} has {len(parts)} nodes after the input, not {NODES - 1}")
    for j, part in enumerate(parts, start=1):
        edges = [e for e in part.strip("|").split("|") if e]
        if len(edges) != j:
            raise ValueError(f"node {j} of {arch!r} has {len(edges)} inputs, not {j}")
        for i, edge in enumerate(edges):
            op, _, src = edge.partition("~")
            if op not in OPS_1D or src != str(i):
                raise ValueError(f"edge {edge!r} of {arch!r}: want OP~{i}, OP one of {OPS_1D}")
            ops.append(op)
    return tuple(ops)


def all_archs() -> list[str]:
    """Every cell of the space (125), in a fixed order."""
    return [arch_string(ops) for ops in itertools.product(OPS_1D, repeat=len(EDGES))]


class Cell1d(nn.Module):
    """One cell: node j = sum over i < j of op_(i, j)(node i); the last node is the output."""

    def __init__(self, arch: str, c: int):
        super().__init__()
        self.ops = nn.ModuleList(make_op(op, c, 1, affine=True, dim=1) for op in parse_arch(arch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes, k = [x], 0
        for j in range(1, NODES):
            nodes.append(sum(self.ops[k + i](nodes[i]) for i in range(j)))  # (B, C, L)
            k += j
        return nodes[-1]


class _Reduce(nn.Module):
    """Residual stride-2 block that doubles the channels (NAS-Bench-201's ResNet block)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.a = ReLUConvBN(c_in, c_out, 3, 2, 1, affine=True, dim=1)
        self.b = ReLUConvBN(c_out, c_out, 3, 1, 1, affine=True, dim=1)
        self.skip = nn.Sequential(nn.AvgPool1d(2, 2, ceil_mode=True), nn.Conv1d(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.skip(x)  # (B, c_out, ceil(L/2))


class CellNet1d(nn.Module):
    """The network of one cell of the space: stem, stages of cells with reductions, classifier.

    Example
    -------
    >>> net = CellNet1d("|skip_connect~0|+|sep_conv_3x3~0|none~1|", num_classes=10)
    >>> net(torch.randn(8, 40)).shape
    torch.Size([8, 10])
    """

    def __init__(
        self, arch: str, num_classes: int = 10, c: int = 16, stages: int = 3, cells: int = 1
    ):
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv1d(1, c, 3, padding=1, bias=False), nn.BatchNorm1d(c))
        layers: list[nn.Module] = []
        for s in range(stages):
            if s > 0:
                layers.append(_Reduce(c, 2 * c))
                c *= 2
            layers += [Cell1d(arch, c) for _ in range(cells)]
        self.cells = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm1d(c), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        out = self.head(self.cells(self.stem(x))).flatten(1)  # (B, C_last)
        return self.classifier(out)  # (B, num_classes)
