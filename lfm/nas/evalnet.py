"""The evaluation networks: a genotype stacked into a deep network and trained from scratch.

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (`model.py`: `Cell`,
  `NetworkCIFAR`, `NetworkImageNet`, the auxiliary heads; `utils.py`: `Cutout`, `drop_path`).
- DeVries & Taylor, "Improved Regularization of CNNs with Cutout", 2017 (cutout length 16).
- Larsson et al., "FractalNet", ICLR 2017 (drop-path).

CIFAR: 20 cells, C = 36, auxiliary head (loss weight 0.4) after the cell at 2/3 depth,
cutout 16, drop-path probability ramped linearly from 0 to 0.2 over training.
ImageNet (mobile setting, < 600M multiply-adds): 14 cells, C = 48, three stride-2 stem convs.
Parameter counts follow DARTS's `count_parameters_in_MB`: the auxiliary head is excluded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lfm.models.split import bernoulli_rows, global_batch_norm
from lfm.nas.genotypes import Genotype
from lfm.nas.ops import FactorizedReduce, Identity, ReLUConvBN, make_op
from lfm.nas.supernet import image_input, reduction_layers


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole examples of a branch with probability `drop_prob`; rescale the rest."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = bernoulli_rows(x, keep, (x.shape[0], 1, 1, 1))  # the whole batch's, under torchrun
    return x / keep * mask  # (B, C, H, W)


def cutout(
    x: torch.Tensor, length: int = 16, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero one length x length square per image at a uniform random centre (clipped at borders).

    x: (B, C, H, W) float, already normalised as in DARTS; returns a new tensor.
    """
    if length <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=generator).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    # the square covers [c - length//2, c + length//2) like DARTS's Cutout (np.clip of y1, y2)
    inside = (
        (ys >= cy - length // 2) & (ys < cy + length // 2)
        & (xs >= cx - length // 2) & (xs < cx + length // 2)
    )  # (B, H, W)  # fmt: skip
    return x * (~inside).unsqueeze(1).to(x.dtype)


class EvalCell(nn.Module):
    """A discrete cell built from one half of a genotype."""

    def __init__(
        self, genotype: Genotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool
    ):
        super().__init__()
        self.preprocess0 = (
            FactorizedReduce(c_pp, c, affine=True)
            if reduction_prev
            else ReLUConvBN(c_pp, c, 1, 1, 0, affine=True)
        )
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=True)
        cell, concat = (
            (genotype.reduce, genotype.reduce_concat)
            if reduction
            else (genotype.normal, genotype.normal_concat)
        )
        self.reduction = reduction
        self.steps = len(cell) // 2
        self.concat = list(concat)
        self.multiplier = len(concat)
        self.indices = [j for _, j in cell]
        self.ops = nn.ModuleList(
            make_op(op, c, 2 if reduction and j < 2 else 1, affine=True) for op, j in cell
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        """(B, C_pp, H, W), (B, C_p, H, W) -> (B, multiplier * C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob)  # identity edges are never dropped (DARTS)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 maps after the cell at 2/3 depth (DARTS)."""

    def __init__(self, c: int, num_classes: int, spatial: int = 8):
        super().__init__()
        # DARTS pools 8x8 -> 2x2 with a 5x5 window, stride 3; other sizes use an adaptive pool
        pool = (
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
            if spatial == 8
            else nn.AdaptiveAvgPool2d(2)
        )
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            pool,  # (B, c, 8, 8) -> (B, c, 2, 2)
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),  # -> (B, 768, 1, 1)
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on the 14x14 maps of the ImageNet network (DARTS; no BN after conv2)."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),  # 14x14 -> 5x5
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),  # -> 4x4
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1),  # DARTS flattens a 768-vector; pooling keeps that size
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """DARTS's CIFAR evaluation network; `forward` returns (logits, aux_logits or None)."""

    def __init__(
        self,
        genotype: Genotype,
        C: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        auxiliary: bool = True,
        input_shape: Sequence[int] = (3, 32, 32),
        stem_multiplier: int = 3,
    ):
        super().__init__()
        c_in, h, _ = image_input(input_shape)
        self.layers, self.drop_path_prob = layers, 0.0
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )  # (B, c_in, H, W) -> (B, 3C, H, W)
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        red = reduction_layers(layers)
        self.aux_pos = 2 * layers // 3
        reduction_prev = False
        c_aux, side = None, h
        for i in range(layers):
            reduction = i in red
            if reduction:
                c_curr *= 2
                side = (side + 1) // 2
            cell = EvalCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_pos:
                c_aux, aux_side = c_p, side
        self.auxiliary_head = (
            AuxiliaryHeadCIFAR(c_aux, num_classes, aux_side) if auxiliary and c_aux else None
        )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        global_batch_norm(self)  # under torchrun, statistics of the global batch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, c_in, H, W) -> logits (B, classes), aux logits (B, classes) in training."""
        aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_pos and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), aux


class NetworkImageNet(nn.Module):
    """DARTS's ImageNet mobile-setting network (14 cells, C = 48 by default), 224x224 inputs."""

    def __init__(
        self,
        genotype: Genotype,
        C: int = 48,
        num_classes: int = 1000,
        layers: int = 14,
        auxiliary: bool = True,
    ):
        super().__init__()
        self.layers, self.drop_path_prob = layers, 0.0
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),  # 224 -> 112
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),  # 112 -> 56
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),  # 56 -> 28
            nn.BatchNorm2d(C),
        )
        c_pp, c_p, c_curr = C, C, C
        self.cells = nn.ModuleList()
        red = reduction_layers(layers)
        self.aux_pos = 2 * layers // 3
        reduction_prev = True  # stem0 output is twice stem1's resolution
        c_aux = None
        for i in range(layers):
            reduction = i in red
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_pos:
                c_aux = c_p
        self.auxiliary_head = AuxiliaryHeadImageNet(c_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)  # 7x7 at 224 input, as DARTS's AvgPool2d(7)
        self.classifier = nn.Linear(c_p, num_classes)
        global_batch_norm(self)  # under torchrun, statistics of the global batch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, 3, 224, 224) -> logits (B, classes), aux logits in training."""
        aux = None
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_pos and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), aux


def count_params(model: nn.Module, include_auxiliary: bool = False) -> int:
    """Parameters as DARTS reports them (`count_parameters_in_MB`): the auxiliary head left out."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_auxiliary or "auxiliary" not in name
    )
