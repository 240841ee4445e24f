"""The DARTS supernet: cells of MixedOps whose op weights are softmax(alpha), alpha held outside.

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (`model_search.py`).
- Chen et al., "Progressive Differentiable Architecture Search", ICCV 2019 (per-edge candidate
  lists after operation dropping; dropout after skip-connect).

The architecture logits are not parameters of the module: `forward(x, alphas)` takes
`alphas = (alpha_normal, alpha_reduce)`, each (14, k), so that the bilevel code treats the
module's weights (W) and alpha (B) as separate arguments of a pure function
(`torch.func.functional_call(net, weights, (x, alphas))`).

BatchNorm always uses the statistics of the batch it sees (no running statistics), as DARTS's
search network does in training mode. That keeps the network a pure function of
(weights, alphas, batch): no buffers are mutated inside `torch.func` transforms, and the
finite-difference and exact hypergradients see exactly the same normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lfm.errors import LFMError
from lfm.models.base import image_shape
from lfm.models.split import dropout, global_batch_norm
from lfm.nas.genotypes import STEPS, num_edges
from lfm.nas.ops import PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN, make_op

Alphas = tuple[torch.Tensor, torch.Tensor]  # (alpha_normal (E, k), alpha_reduce (E, k))
# The names under which a supernet reads alphas that are not passed to `forward`: empty
# buffers, filled by `functional_call` (the engine's `Upper.arch`), so a supernet is a module
# of x alone there, as every learner of the trilevel iteration is.
ARCH = ("alpha_normal", "alpha_reduce")


def arch_slots(net: nn.Module) -> None:
    """Register the empty, non-persistent ARCH buffers on `net` (state_dict is unchanged)."""
    for name in ARCH:
        net.register_buffer(name, None, persistent=False)


def arch_of(alphas: Alphas) -> dict[str, torch.Tensor]:
    """`alphas` by their ARCH names (an `Upper.arch`)."""
    return dict(zip(ARCH, alphas, strict=True))


def batch_stats_only(module: nn.Module) -> nn.Module:
    """Make every BatchNorm in `module` normalise with batch statistics, keeping no buffers."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return module


class MixedOp(nn.Module):
    """One edge: sum_k w_k * op_k(x) over the edge's candidate ops."""

    def __init__(self, c: int, stride: int, ops: Sequence[str]):
        super().__init__()
        self.names = list(ops)
        self.ops = nn.ModuleList()
        for name in self.names:
            op = make_op(name, c, stride, affine=False)
            if "pool" in name:
                # DARTS: pooling has no weights to rescale its output, so it gets its own BN
                op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
            self.ops.append(op)
        self.skip_dropout = 0.0  # P-DARTS dropout after the parameter-free skip-connect

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), w: (k,) op weights -> (B, C, H/stride, W/stride)."""
        out = None
        for k, (name, op) in enumerate(zip(self.names, self.ops, strict=True)):
            if name == "none" and len(self.names) > 1:
                continue  # w_none * 0 adds nothing (its gradient w.r.t. w_none is 0 as well)
            y = op(x)
            if self.skip_dropout > 0 and self.training and isinstance(op, Identity):
                y = dropout(y, self.skip_dropout)
            out = w[k] * y if out is None else out + w[k] * y
        return out


class SearchCell(nn.Module):
    """A cell of the supernet: two pre-processed inputs, `steps` nodes, all 14 mixed edges."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        c_pp: int,
        c_p: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
        edge_ops: Sequence[Sequence[str]],
    ):
        super().__init__()
        self.reduction = reduction
        self.steps, self.multiplier = steps, multiplier
        # the cell two back is twice the resolution when the previous cell reduced
        self.preprocess0 = (
            FactorizedReduce(c_pp, c, affine=False)
            if reduction_prev
            else ReLUConvBN(c_pp, c, 1, 1, 0, affine=False)
        )
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        e = 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1  # only edges from the inputs reduce
                self.edges.append(MixedOp(c, stride, edge_ops[e]))
                e += 1

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """s0, s1: the cells two back and one back; weights (E, k) -> (B, mult*C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]  # each (B, C, H, W)
        offset = 0
        for _ in range(self.steps):
            s = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


def reduction_layers(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells: at 1/3 and 2/3 of the depth (DARTS)."""
    return layers // 3, 2 * layers // 3


def image_input(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Check that examples are images (C, H, W); 1-D signals get an LFMError naming the fix."""
    return image_shape(
        input_shape,
        "the DARTS search space",
        "reshape signals to (C, 1, L) (e.g. MNIST-1D (40,) -> (1, 1, 40)) in the data "
        "layer's prepare function, or use a data set of images",
    )


class Supernet(nn.Module):
    """The DARTS search network: stem -> `layers` cells -> global pool -> linear head(s).

    `heads` > 1 adds classifier heads on the same body (LFM parameter sharing: W1 and W2 share
    the stem and cells and own one head each). `normal_ops` / `reduce_ops` list each edge's
    candidate ops (all 8 by default; P-DARTS narrows them stage by stage).
    """

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        input_shape: Sequence[int] = (3, 32, 32),
        *,
        steps: int = STEPS,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        normal_ops: Sequence[Sequence[str]] | None = None,
        reduce_ops: Sequence[Sequence[str]] | None = None,
        heads: int = 1,
    ):
        super().__init__()
        c_in, _, _ = image_input(input_shape)
        if layers < 1 or C < 2 or C % 2:
            raise LFMError(
                f"supernet needs layers >= 1 and an even C >= 2, got layers={layers}, C={C}",
                "use e.g. layers=8, C=16 (the paper) or layers=3, C=8 (CPU)",
            )
        e = num_edges(steps)
        self.normal_ops = [list(o) for o in (normal_ops or [PRIMITIVES] * e)]
        self.reduce_ops = [list(o) for o in (reduce_ops or [PRIMITIVES] * e)]
        for name, ops in (("normal_ops", self.normal_ops), ("reduce_ops", self.reduce_ops)):
            if len(ops) != e or len({len(o) for o in ops}) != 1:
                raise LFMError(f"{name} must list {e} edges with equally many candidates each")
        self.C, self.num_classes, self.layers, self.steps = C, num_classes, layers, steps
        self.input_shape = tuple(input_shape)
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, c_curr, 3, padding=1, bias=False),  # (B, c_in, H, W) -> (B, 3C, H, W)
            nn.BatchNorm2d(c_curr),
        )
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        red = reduction_layers(layers)
        reduction_prev = False
        for i in range(layers):
            reduction = i in red
            if reduction:
                c_curr *= 2  # halve H, W and double channels
            cell = SearchCell(
                steps,
                multiplier,
                c_pp,
                c_p,
                c_curr,
                reduction,
                reduction_prev,
                self.reduce_ops if reduction else self.normal_ops,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.feature_dim = c_p
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleList(nn.Linear(c_p, num_classes) for _ in range(heads))
        global_batch_norm(batch_stats_only(self))
        arch_slots(self)

    @property
    def num_ops(self) -> tuple[int, int]:
        """Candidates per edge (normal, reduce): the width k of alpha_normal, alpha_reduce."""
        return len(self.normal_ops[0]), len(self.reduce_ops[0])

    def new_alphas(self, generator: torch.Generator | None = None, scale: float = 1e-3) -> Alphas:
        """Fresh architecture logits, 1e-3 * N(0, 1) as DARTS initialises them."""
        e = num_edges(self.steps)
        kn, kr = self.num_ops
        an = scale * torch.randn(e, kn, generator=generator)
        ar = scale * torch.randn(e, kr, generator=generator)
        return an, ar

    def set_skip_dropout(self, p: float) -> None:
        """Dropout rate after every stride-1 skip-connect (P-DARTS)."""
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.skip_dropout = p

    def features(self, x: torch.Tensor, alphas: Alphas) -> torch.Tensor:
        """Pooled body features, (B, feature_dim)."""
        wn = F.softmax(alphas[0], dim=-1)  # (E, k)
        wr = F.softmax(alphas[1], dim=-1)
        s0 = s1 = self.stem(x)  # (B, 3C, H, W)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, wr if cell.reduction else wn)
        return self.global_pooling(s1).flatten(1)  # (B, feature_dim)

    def forward(
        self, x: torch.Tensor, alphas: Alphas | None = None, head: int = 0, all_heads: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, num_classes) of head `head`; with `all_heads`, (features, [logits per head])
        from one body pass (a `forward` option so that `functional_call` can reach it).
        alphas None: the ARCH buffers `functional_call` passed."""
        if alphas is None:
            alphas = (self.alpha_normal, self.alpha_reduce)
        f = self.features(x, alphas)
        if all_heads:
            return f, [h(f) for h in self.heads]
        return self.heads[head](f)
