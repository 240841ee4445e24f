"""Architecture search runners: DARTS, P-DARTS, LFM-DARTS and LFM-PDARTS over one stage plan.

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (`train_search.py`:
  weights SGD 0.025 cosine to 0.001, momentum 0.9, wd 3e-4, clip 5; alpha Adam 3e-4, betas
  (0.5, 0.999), wd 1e-3; half of the training set as validation; 8 cells, C = 16, 50 epochs).
- Chen et al., "Progressive Differentiable Architecture Search", ICCV 2019 (stages of 5, 11,
  17 cells; 8 -> 5 -> 3 candidates per edge; skip-connect dropout decaying within each stage;
  10 weights-only warm-up epochs per stage; at most 2 skip-connects in the final normal cell).
- Zhang et al., "Learning From Mistakes" (IEEE TAI 2025), Algorithm 1 applied with B = alpha.

DARTS is a P-DARTS with one stage. Each stage builds a fresh supernet over the surviving
candidates with fresh alphas (as P-DARTS does), trains it, then drops the weakest candidates
of every edge. The last stage's alphas give the genotype.

Order of one search iteration. DARTS (official code): alpha step first (unrolled at the
current weights), then the weight step at the new alpha. LFM (Algorithm 1): the virtual steps
W1', W2' of the hypergradient are the real steps (their gradients are reused, so each learner
costs one forward/backward on the training batch), then alpha, V and r step.

With an out folder, a checkpoint is written at the end of every epoch (stage plan position,
surviving ops, alphas, networks, optimizers, r, V, the validation stream, history, RNG) and a
later call with the same settings continues from it, to the same result as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lfm.data.types import DataBundle, Stream, iterate_batches
from lfm.errors import LFMError
from lfm.models import MODELS, create_model
from lfm.nas.genotypes import Genotype, derive_genotype, num_edges
from lfm.nas.hypergrad import (
    HVP_BACKENDS,
    LFMGrad,
    darts_alpha_grad,
    lfm_nas_grad,
    lfm_nas_grad_shared,
    sgd_view,
)
from lfm.nas.ops import PRIMITIVES
from lfm.nas.space1d import EDGES, OPS_1D
from lfm.nas.supernet import Supernet, batch_stats_only, image_input
from lfm.nas.supernet1d import Supernet1d, derive_arch
from lfm.registry import Registry
from lfm.train.checkpoint import (
    data_fingerprint,
    open_checkpoints,
    restore,
    rng_state,
    set_rng_state,
)
from lfm.train.progress import progress_bar
from lfm.train.runlock import run_folder_lock

ENCODERS = ("full", "shared")
# darts: the DARTS space (8 ops, 14-edge normal and reduction cells, a Genotype);
# cell1d: the 125 cells of lfm.nas.space1d on sequences (lfm.nas.supernet1d, an arch string)
SPACES = ("darts", "cell1d")
LFM_FORMS = ("paper", "authors")


@dataclass
class SearchConfig:
    """How to search. Defaults are the tiny CPU setting; `SEARCH_PRESETS` holds the papers'."""

    method: str = "darts"  # darts | pdarts | lfm-darts | lfm-pdarts (a name in SEARCHERS)
    layers: int = 3  # cells in the supernet (DARTS paper: 8); ignored by P-DARTS (stage_layers)
    C: int = 8  # initial channels (paper: 16); small so a CPU step takes well under a second
    epochs: int = 4  # search epochs per stage (DARTS: 50; P-DARTS: 25)
    batch_size: int = 32  # train and validation batch (DARTS: 64; P-DARTS: 96)
    steps_per_epoch: int | None = None  # cap on batches per epoch (None: one pass over train)
    order: int = 2  # 1 = first-order DARTS, 2 = second order (the unrolled hypergradient)
    # Mixed second derivatives: exact (forward over reverse) or fd (DARTS's finite differences).
    # exact by default: fd's eps = 0.01 / ||v|| crosses ReLU / max-pool kinks on small supernets
    # (off by a relative 0.7-2.3 in an outside check). On a CPU exact costs about fd's time per
    # step at the paper's size and 1.5-2x it at this tiny default (benchmarks/bench_nas_step.py).
    hvp: str = "exact"
    fd_scale: float = 0.01  # fd step eps = fd_scale / ||v|| (DARTS: 0.01)
    w_lr: float = 0.025  # weight SGD lr, cosine-annealed to w_lr_min per stage (DARTS)
    w_lr_min: float = 0.001  # DARTS's eta_min for the search
    w_momentum: float = 0.9  # DARTS
    w_wd: float = 3e-4  # DARTS
    grad_clip: float = 5.0  # DARTS clips weight gradients at norm 5
    arch_lr: float = 3e-4  # alpha Adam lr (DARTS 3e-4; P-DARTS 6e-4)
    arch_betas: tuple[float, float] = (0.5, 0.999)  # DARTS
    arch_wd: float = 1e-3  # DARTS
    # P-DARTS (used when the method is progressive)
    stage_layers: tuple[int, ...] = (2, 3, 4)  # cells per stage (paper: 5, 11, 17)
    stage_ops: tuple[int, ...] = (8, 5, 3)  # candidates per edge in each stage (paper: 8, 5, 3)
    skip_dropout: tuple[float, ...] = (0.0, 0.4, 0.7)  # initial skip dropout per stage (CIFAR-10)
    warmup_epochs: int = 1  # weights-only epochs at the start of each stage (P-DARTS: 10)
    max_skip: int | None = 2  # cap on skip-connects in the final normal cell (P-DARTS: 2)
    # LFM (used by lfm-darts and lfm-pdarts)
    encoder: str = "full"  # full: a trainable CNN V; shared: V = W1's body, W1/W2 share it
    encoder_model: str = "cnn"  # the `full` encoder's body: a name in lfm.models.MODELS
    encoder_dim: int = 32  # embedding size of the `full` encoder (a linear map of the body's)
    similarity: str = "dot"  # x_ij = softmax_j(sim(V(d_i), V(d_j))): dot | cosine | l2
    vr_lr: float = 3e-4  # Adam lr of V and r (the paper's stage-3 optimizer, as for alpha)
    r_init: float = 1.0  # initial r_j: a_i starts at sigmoid(sum_j x z u) > 0.5
    seed: int = 0  # everything random (init, batch order) derives from it
    space: str = "darts"  # a name in SPACES; cell1d needs 1-D inputs and e.g. encoder_model=cnn1d
    # paper: every term of dL_val/dalpha; authors: their NAS/darts-lfm/architect_lfm.py, where u
    # (and so a) sees a copy of alpha, so the du/dalpha term is missing (issue 12)
    lfm_form: str = "paper"

    def validate(self) -> None:
        """Raise LFMError naming the first bad field."""

        def bad(name: str, value: object, fix: str) -> LFMError:
            return LFMError(f"search.{name} = {value!r} is invalid", fix)

        if self.method not in SEARCHERS:
            raise bad("method", self.method, f"use one of {', '.join(SEARCHERS.names())}")
        if self.layers < 1:
            raise bad("layers", self.layers, "use >= 1 (paper: 8)")
        if self.C < 2 or self.C % 2:
            raise bad("C", self.C, "use an even number >= 2 (paper: 16)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "use a positive integer")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise bad("steps_per_epoch", self.steps_per_epoch, "use None or a positive integer")
        if self.order not in (1, 2):
            raise bad("order", self.order, "use 1 (first order) or 2 (second order)")
        if self.hvp not in HVP_BACKENDS:
            raise bad("hvp", self.hvp, f"use one of {HVP_BACKENDS}")
        for name in ("fd_scale", "w_lr", "arch_lr", "vr_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise bad(name, getattr(self, name), "use a positive number")
        if not 0 <= self.w_lr_min <= self.w_lr:
            raise bad("w_lr_min", self.w_lr_min, "use a value in [0, w_lr]")
        if not 0 <= self.w_momentum < 1:
            raise bad("w_momentum", self.w_momentum, "use a value in [0, 1), e.g. 0.9")
        if self.w_wd < 0 or self.arch_wd < 0:
            raise bad("w_wd/arch_wd", (self.w_wd, self.arch_wd), "use values >= 0")
        if not all(0 <= b < 1 for b in self.arch_betas) or len(self.arch_betas) != 2:
            raise bad("arch_betas", self.arch_betas, "use two values in [0, 1), e.g. (0.5, 0.999)")
        if self.space not in SPACES:
            raise bad("space", self.space, f"use one of {SPACES}")
        if self.lfm_form not in LFM_FORMS:
            raise bad("lfm_form", self.lfm_form, f"use one of {LFM_FORMS}")
        progressive = self.method.endswith("pdarts")  # DARTS has no warm-up epochs
        n = len(self.stage_layers)
        if n < 1 or len(self.stage_ops) != n or len(self.skip_dropout) != n:
            raise bad(
                "stage_layers/stage_ops/skip_dropout",
                (self.stage_layers, self.stage_ops, self.skip_dropout),
                "give one entry per stage to each",
            )
        if any(n_ < 1 for n_ in self.stage_layers):
            raise bad("stage_layers", self.stage_layers, "use positive cell counts")
        ops = (len(_space_ops(self)[0][0]), *self.stage_ops)
        bad_ops = any(b > a for a, b in zip(ops, ops[1:], strict=False)) or min(ops) < 1
        if bad_ops and (self.space == "darts" or progressive):  # cell1d's DARTS: stage_ops unused
            raise bad("stage_ops", self.stage_ops, f"use non-increasing counts in 1..{ops[0]}")
        if self.stage_ops[-1] < 2 and "none" in PRIMITIVES:
            raise bad("stage_ops", self.stage_ops, "keep >= 2 candidates in the last stage")
        if any(not 0 <= p < 1 for p in self.skip_dropout):
            raise bad("skip_dropout", self.skip_dropout, "use rates in [0, 1)")
        if self.warmup_epochs < 0 or (progressive and self.warmup_epochs >= self.epochs):
            raise bad(
                "warmup_epochs",
                self.warmup_epochs,
                f"use a value in [0, epochs = {self.epochs}), e.g. --set warmup_epochs=0",
            )
        if self.max_skip is not None and self.max_skip < 0:
            raise bad("max_skip", self.max_skip, "use None or a value >= 0 (P-DARTS: 2)")
        if self.encoder not in ENCODERS:
            raise bad("encoder", self.encoder, f"use one of {ENCODERS}")
        if self.similarity not in ("dot", "cosine", "l2"):
            raise bad("similarity", self.similarity, "use dot, cosine or l2")
        if self.encoder_dim < 1:
            raise bad("encoder_dim", self.encoder_dim, "use a positive integer")
        if self.encoder_model not in MODELS.names():
            raise bad(
                "encoder_model", self.encoder_model, f"use one of {', '.join(MODELS.names())}"
            )


SEARCH_PRESETS: dict[str, SearchConfig] = {
    # Liu et al. 2019, CIFAR-10 search (second order). LFM-DARTS uses the same settings.
    # hvp="fd": the papers' finite differences, kept so the presets run what DARTS ran.
    "darts-paper": SearchConfig(
        "darts", layers=8, C=16, epochs=50, batch_size=64, order=2, hvp="fd", warmup_epochs=0
    ),
    # Chen et al. 2019, CIFAR-10 search: batch 96, alpha lr 6e-4, 25 epochs per stage, first order.
    "pdarts-paper": SearchConfig(
        "pdarts",
        C=16,
        epochs=25,
        batch_size=96,
        order=1,
        hvp="fd",  # what the papers ran (it matters for LFM-PDARTS's second-order terms)
        arch_lr=6e-4,
        stage_layers=(5, 11, 17),
        stage_ops=(8, 5, 3),
        skip_dropout=(0.0, 0.4, 0.7),
        warmup_epochs=10,
        max_skip=2,
    ),
    # A couple of minutes on a 2-core CPU for 8x8 digits.
    "tiny": SearchConfig(),
}


@dataclass
class SearchResult:
    """A search's output: the genotype, the final alphas and per-epoch history."""

    genotype: Genotype | str  # an arch string of lfm.nas.space1d in the cell1d space
    alphas: tuple[torch.Tensor, torch.Tensor]  # last stage's (alpha_normal, alpha_reduce)
    normal_ops: list[list[str]]  # each edge's candidates in the last stage (alpha's columns)
    reduce_ops: list[list[str]]
    history: list[dict] = field(default_factory=list)


@dataclass
class _Stage:
    layers: int
    num_ops: int
    epochs: int
    warmup: int
    skip_p: float


# -------------------------------------------------------------------------------------- helpers


def nas_encoder(input_shape: tuple[int, ...], dim: int = 32, model: str = "cnn") -> nn.Module:
    """V for the `full` encoder mode: the body of registry model `model`, then Linear(-> dim)."""
    clf = create_model(model, 1, input_shape)  # its head is dropped: V ends in the projection
    v = nn.Sequential(clf.body, nn.Linear(clf.feature_dim, dim))  # (B, *input_shape) -> (B, dim)
    return batch_stats_only(v)  # a pure function of (params, batch), like the supernet


def drop_ops(alpha: torch.Tensor, edge_ops: list[list[str]], keep: int) -> list[list[str]]:
    """P-DARTS operation dropping: on every edge keep the `keep` candidates of largest alpha.

    `none` competes like any op here (P-DARTS's `get_min_k` for the intermediate stages); the
    final genotype never picks it. Kept ops stay in PRIMITIVES order.
    """
    out = []
    for e, ops in enumerate(edge_ops):
        # mutant pdarts-drop-reversed: `descending=True` -> `descending=False` | nas_space:drop_ops
        order = torch.argsort(alpha[e].detach().cpu(), descending=True, stable=True)[:keep]
        kept = sorted(order.tolist())
        if all(ops[k] == "none" for k in kept):  # never leave an edge with only `none`
            best = max((k for k in range(len(ops)) if ops[k] != "none"), key=lambda k: alpha[e, k])
            kept = sorted(kept[:-1] + [best]) if keep > 1 else [best]
        out.append([ops[k] for k in kept])
    return out


def _cosine_lr(cfg: SearchConfig, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(eta_min=w_lr_min) stepped per epoch, as DARTS."""
    return cfg.w_lr_min + (cfg.w_lr - cfg.w_lr_min) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def _sgd(params, cfg: SearchConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_wd)


def _set_grads(named: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
    for k, p in named.items():
        p.grad = grads[k].detach().clone() if k in grads else None


def _space_ops(cfg: SearchConfig) -> tuple[list[list[str]], list[list[str]]]:
    """Every edge's candidates (normal, reduce) in cfg.space; cell1d has no reduction cell."""
    if cfg.space == "cell1d":
        return [list(OPS_1D)] * len(EDGES), []
    return [list(PRIMITIVES)] * num_edges(), [list(PRIMITIVES)] * num_edges()


def _derive(cfg: SearchConfig, alphas, normal_ops, reduce_ops, max_skip=None) -> Genotype | str:
    """The genotype (darts) or the arch string (cell1d) of the alphas."""
    if cfg.space == "cell1d":
        return derive_arch(alphas[0], normal_ops, max_skip)
    return derive_genotype(*alphas, normal_ops, reduce_ops, max_skip_normal=max_skip)


def _plan(cfg: SearchConfig, progressive: bool) -> list[_Stage]:
    if not progressive:
        return [_Stage(cfg.layers, len(_space_ops(cfg)[0][0]), cfg.epochs, 0, 0.0)]
    return [
        _Stage(n, k, cfg.epochs, cfg.warmup_epochs, p)
        for n, k, p in zip(cfg.stage_layers, cfg.stage_ops, cfg.skip_dropout, strict=True)
    ]


# ----------------------------------------------------------------------------------- the search


class _Learners:
    """The networks, architecture and optimizers of one stage; `step` runs one iteration."""

    def __init__(self, cfg, bundle, stage, normal_ops, reduce_ops, lfm: bool, device, gen):
        self.cfg, self.lfm, self.device = cfg, lfm, device
        cell1d = cfg.space == "cell1d"
        shape = tuple(bundle.input_shape) if cell1d else image_input(bundle.input_shape)
        shared = lfm and cfg.encoder == "shared"

        def net(heads: int = 1) -> Supernet | Supernet1d:
            if cell1d:
                return Supernet1d(
                    cfg.C, bundle.num_classes, stage.layers, edge_ops=normal_ops, heads=heads
                ).to(device)
            return Supernet(
                cfg.C,
                bundle.num_classes,
                stage.layers,
                shape,
                normal_ops=normal_ops,
                reduce_ops=reduce_ops,
                heads=heads,
            ).to(device)

        self.net1 = net(2 if shared else 1)
        self.net2 = net() if lfm and not shared else None
        self.shared = shared
        an, ar = self.net1.new_alphas(gen)
        self.alphas = (an.to(device).requires_grad_(True), ar.to(device).requires_grad_(True))
        self.opt_a = torch.optim.Adam(
            self.alphas, lr=cfg.arch_lr, betas=cfg.arch_betas, weight_decay=cfg.arch_wd
        )
        self.opt1 = _sgd(self.net1.parameters(), cfg)
        self.opt2 = _sgd(self.net2.parameters(), cfg) if self.net2 is not None else None
        self.encoder: nn.Module | None = None
        self.r: torch.Tensor | None = None
        self.opt_vr: torch.optim.Adam | None = None
        if lfm:
            self.r = torch.full((len(bundle.val),), cfg.r_init, device=device, requires_grad=True)
            vr = [self.r]
            if not shared:
                self.encoder = nas_encoder(shape, cfg.encoder_dim, cfg.encoder_model).to(device)
                vr += list(self.encoder.parameters())
            self.opt_vr = torch.optim.Adam(vr, lr=cfg.vr_lr)

    def _parts(self) -> dict[str, nn.Module | torch.optim.Optimizer]:
        parts = {"net1": self.net1, "net2": self.net2, "encoder": self.encoder}
        parts |= {"opt_a": self.opt_a, "opt1": self.opt1, "opt2": self.opt2, "opt_vr": self.opt_vr}
        return {k: v for k, v in parts.items() if v is not None}

    def state_dict(self) -> dict:
        """Alphas, r, every network and every optimizer state, for checkpoints."""
        state = {k: v.state_dict() for k, v in self._parts().items()}
        state["alphas"] = [a.detach() for a in self.alphas]
        if self.r is not None:
            state["r"] = self.r.detach()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s output."""
        with torch.no_grad():
            pairs = list(zip(self.alphas, state["alphas"], strict=True))
            if self.r is not None:
                pairs.append((self.r, state["r"]))
            for t, saved in pairs:
                if t.shape != saved.shape:  # copy_ would broadcast a wrong shape silently
                    raise ValueError(f"shape {tuple(saved.shape)} != {tuple(t.shape)}")
                t.copy_(saved)
        for k, v in self._parts().items():
            v.load_state_dict(state[k])

    def set_lr(self, lr: float) -> None:
        for opt in (self.opt1, self.opt2):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr

    def set_skip_dropout(self, p: float) -> None:
        for n in (self.net1, self.net2):
            if n is not None:
                n.set_skip_dropout(p)

    def _real_step(self, net: nn.Module, opt, grads: dict[str, torch.Tensor]) -> None:
        named = dict(net.named_parameters())
        _set_grads(named, grads)
        nn.utils.clip_grad_norm_(
            [p for p in named.values() if p.grad is not None], self.cfg.grad_clip
        )
        # mutant search-real-step-skipped: drop | behaviour:search_step
        opt.step()

    def _weights_only(self, xt, yt) -> dict:
        """A plain weight step on CE (DARTS's weight step; P-DARTS warm-up; LFM warm-up, a = 1)."""
        a = tuple(t.detach() for t in self.alphas)
        stats = {}
        if self.shared:
            _, (o1, o2) = self.net1(xt, a, all_heads=True)
            loss = F.cross_entropy(o1, yt) + F.cross_entropy(o2, yt)
            logits = o2
        else:
            logits = self.net1(xt, a)
            loss = F.cross_entropy(logits, yt)
            if self.net2 is not None:
                logits = self.net2(xt, a)
                loss = loss + F.cross_entropy(logits, yt)
        for opt in (self.opt1, self.opt2):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for net, opt in ((self.net1, self.opt1), (self.net2, self.opt2)):
            if opt is not None:
                nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
                # mutant darts-weight-step-skipped: drop | behaviour:search_step
                opt.step()
        stats["train_loss"] = float(F.cross_entropy(logits, yt).detach())
        stats["train_acc"] = float((logits.argmax(1) == yt).float().mean())
        return stats

    def step(self, xt, yt, xv, yv, val_idx, arch: bool) -> dict:
        """One search iteration; `arch=False` is a weights-only (warm-up) iteration."""
        cfg = self.cfg
        if not arch:
            return self._weights_only(xt, yt)
        if not self.lfm:
            w = {k: p.detach() for k, p in self.net1.named_parameters()}
            g = darts_alpha_grad(
                self.net1,
                w,
                self.alphas,
                (xt, yt),
                (xv, yv),
                sgd_view(self.opt1, dict(self.net1.named_parameters())),
                cfg.order,
                cfg.hvp,
                cfg.fd_scale,
            )
            self.opt_a.zero_grad(set_to_none=True)
            for p, gr in zip(self.alphas, g.alphas, strict=True):
                # mutant darts-alpha-grad-sign: `gr.detach()` -> `-gr.detach()`
                #   | behaviour:search_step
                p.grad = gr.detach()
            # mutant darts-alpha-step-dropped: drop | behaviour:search_step
            self.opt_a.step()
            stats = self._weights_only(xt, yt)
            stats["val_loss"] = g.loss_val
            return stats
        if self.shared:
            named = dict(self.net1.named_parameters())
            g: LFMGrad = lfm_nas_grad_shared(
                self.net1,
                {k: p.detach() for k, p in named.items()},
                self.alphas,
                self.r[val_idx],
                (xt, yt),
                (xv, yv),
                sgd_view(self.opt1, named),
                cfg.hvp,
                cfg.similarity,
                cfg.fd_scale,
                u_alpha=cfg.lfm_form == "paper",
            )
            self._real_step(self.net1, self.opt1, g.g1 | g.g2)
        else:
            n1, n2 = dict(self.net1.named_parameters()), dict(self.net2.named_parameters())
            enc = dict(self.encoder.named_parameters())
            g = lfm_nas_grad(
                self.net1,
                {k: p.detach() for k, p in n1.items()},
                {k: p.detach() for k, p in n2.items()},
                self.alphas,
                self.r[val_idx],
                (xt, yt),
                (xv, yv),
                sgd_view(self.opt1, n1),
                sgd_view(self.opt2, n2),
                self.encoder,
                {k: p.detach() for k, p in enc.items()},
                cfg.hvp,
                cfg.similarity,
                cfg.fd_scale,
                u_alpha=cfg.lfm_form == "paper",
            )
            self._real_step(self.net1, self.opt1, g.g1)
            self._real_step(self.net2, self.opt2, g.g2)
            for k, p in enc.items():
                # mutant lfm-darts-v-grad-sign: `g.encoder[k].detach()` -> `-g.encoder[k].detach()`
                #   | behaviour:search_step
                p.grad = g.encoder[k].detach()
        # stage 3: alpha, V and r from the validation loss at W2'
        self.opt_a.zero_grad(set_to_none=True)
        for p, gr in zip(self.alphas, g.alphas, strict=True):
            # mutant lfm-darts-alpha-grad-sign: `gr.detach()` -> `-gr.detach()`
            #   | behaviour:search_step
            p.grad = gr.detach()
        # mutant lfm-darts-alpha-step-dropped: drop | behaviour:search_step
        self.opt_a.step()
        # mutant lfm-darts-r-grad-sign: `g.r.detach()` -> `-g.r.detach()` | behaviour:search_step
        self.r.grad = torch.zeros_like(self.r).index_put_((val_idx,), g.r.detach())
        # mutant lfm-darts-vr-step-dropped: drop | behaviour:search_step
        self.opt_vr.step()
        self.opt_vr.zero_grad(set_to_none=True)
        return {
            "train_loss": g.loss_train,
            "val_loss": g.loss_val,
            "a_mean": float(g.a.mean()),
            "u_mean": float(g.u.mean()),
        }

    @torch.no_grad()
    def val_accuracy(self, bundle: DataBundle, batch_size: int, max_batches: int = 4) -> float:
        """Accuracy of the learner whose validation loss drives alpha (W2; the net in DARTS)."""
        net, head = (
            (self.net2, 0) if self.net2 is not None else (self.net1, 1 if self.shared else 0)
        )
        net.eval()
        a = tuple(t.detach() for t in self.alphas)
        correct = total = 0
        for i, b in enumerate(
            iterate_batches(bundle.val, batch_size, device=self.device, shuffle=False)
        ):
            if i >= max_batches:
                break
            logits = net(bundle.inputs(b.x, False), a, head=head)
            correct += int((logits.argmax(1) == b.y).sum())
            total += len(b)
        net.train()
        return correct / max(total, 1)


def _search(
    bundle: DataBundle,
    cfg: SearchConfig,
    device: torch.device | str,
    progress: bool,
    progressive: bool,
    lfm: bool,
    out: Path | str | None = None,
    resume: bool = True,
) -> SearchResult:
    cfg.validate()
    if cfg.space == "darts":
        image_input(bundle.input_shape)
    if len(bundle.val) == 0:
        raise LFMError("search needs a validation split", "build the data with val_fraction=0.5")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    stages = _plan(cfg, progressive)  # a function of cfg, which the identity check covers
    # persistent validation iterator: one stream for the whole search (DARTS's next(valid_queue))
    val_stream = Stream(bundle.val, cfg.batch_size, device=device, seed=cfg.seed + 1)
    identity = {"search": asdict(cfg), "data": data_fingerprint(bundle)}
    ckpt, state = open_checkpoints(out, "search", identity, resume)  # the caller holds the lock
    normal_ops, reduce_ops = _space_ops(cfg)
    history: list[dict] = []
    learners: _Learners | None = None
    first_stage, first_epoch, elapsed = 0, 0, 0.0
    if state is not None:

        def load() -> None:
            nonlocal normal_ops, reduce_ops, learners, history, first_stage, first_epoch, elapsed
            first_stage, first_epoch = int(state["stage"]), int(state["epoch"])
            normal_ops, reduce_ops = state["normal_ops"], state["reduce_ops"]
            learners = _Learners(
                cfg, bundle, stages[first_stage], normal_ops, reduce_ops, lfm, device, gen
            )
            # mutant search-resume-loses-learners: drop | nas_resume
            learners.load_state_dict(state["learners"])
            val_stream.load_state_dict(state["val_stream"])
            history, elapsed = json.loads(state["history"]), float(state["seconds"])
            # after building the learners, whose initialisation drew from both generators
            gen.set_state(state["gen"])
            set_rng_state(state["rng"])

        restore(ckpt, "`lfm search`", load, progress)
    t0 = time.time() - elapsed
    n_batches = -(-len(bundle.train) // cfg.batch_size)
    if cfg.steps_per_epoch is not None:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    for s in range(first_stage, len(stages)):
        stage = stages[s]
        if s > first_stage or state is None:  # else the resumed stage's learners are loaded
            if learners is not None and stage.num_ops < len(normal_ops[0]):
                # P-DARTS: drop ops by the previous stage's alphas, then start a fresh supernet
                normal_ops = drop_ops(learners.alphas[0], normal_ops, stage.num_ops)
                reduce_ops = drop_ops(learners.alphas[1], reduce_ops, stage.num_ops)
            learners = _Learners(cfg, bundle, stage, normal_ops, reduce_ops, lfm, device, gen)
        for epoch in range(first_epoch if s == first_stage else 0, stage.epochs):
            learners.set_lr(_cosine_lr(cfg, epoch, stage.epochs))
            # P-DARTS: the skip dropout rate decays linearly to 0 over the stage
            learners.set_skip_dropout(stage.skip_p * (stage.epochs - epoch - 1) / stage.epochs)
            arch = epoch >= stage.warmup
            sums: dict[str, float] = {}
            bar = progress_bar(progress, n_batches, 0, f"{cfg.method} stage {s} epoch {epoch}")
            for i, b in enumerate(
                iterate_batches(
                    bundle.train,
                    cfg.batch_size,
                    device=device,
                    seed=cfg.seed,
                    epoch=epoch + 1000 * s,
                )
            ):
                if i >= n_batches:
                    break
                vb = next(val_stream)
                st = learners.step(
                    bundle.inputs(b.x, True), b.y, bundle.inputs(vb.x, True), vb.y, vb.idx, arch
                )
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            rec = {
                "stage": s,
                "layers": stage.layers,
                "epoch": epoch,
                "arch": arch,
                "lr": _cosine_lr(cfg, epoch, stage.epochs),
                "seconds": time.time() - t0,
            }
            rec |= {k: v / max(n_batches, 1) for k, v in sums.items()}
            rec["val_acc"] = learners.val_accuracy(bundle, cfg.batch_size)
            g = _derive(cfg, learners.alphas, normal_ops, reduce_ops)
            rec["genotype"] = g.to_dict() if isinstance(g, Genotype) else g
            history.append(rec)
            if progress:
                print(
                    f"[{cfg.method}] stage {s} epoch {epoch} loss {rec.get('train_loss', 0):.3f} "
                    f"val_acc {rec['val_acc']:.3f} ({rec['seconds']:.0f}s)",
                    flush=True,
                )
            if ckpt is not None:
                snapshot = {
                    "identity": json.dumps(identity),
                    "stage": s,
                    "epoch": epoch + 1,  # epochs of this stage done
                    "normal_ops": normal_ops,
                    "reduce_ops": reduce_ops,
                    "learners": learners.state_dict(),
                    "val_stream": val_stream.state_dict(),
                    "history": json.dumps(history),
                    "seconds": time.time() - t0,
                    "gen": gen.get_state(),
                    "rng": rng_state(),
                }
                ckpt.save(snapshot, len(history))
    genotype = _derive(
        cfg, learners.alphas, normal_ops, reduce_ops, cfg.max_skip if progressive else None
    )
    alphas = tuple(t.detach().cpu() for t in learners.alphas)
    return SearchResult(genotype, alphas, normal_ops, reduce_ops, history)


SEARCHERS: Registry[SearchResult] = Registry("search method")


def _searcher(progressive: bool, lfm: bool) -> Callable[..., SearchResult]:
    def search(
        bundle: DataBundle, cfg: SearchConfig, device="cpu", progress=False, out=None, resume=True
    ) -> SearchResult:
        with run_folder_lock(out):  # before its checkpoints are read or cleared
            return _search(bundle, cfg, device, progress, progressive, lfm, out, resume)

    return search


# DARTS is a P-DARTS with one stage; LFM adds the second learner (module docstring)
for _name, _help, _progressive, _lfm in (
    ("darts", "DARTS (Liu et al. 2019): one stage, first or second order", False, False),
    ("pdarts", "P-DARTS (Chen et al. 2019): progressive depth, op dropping", True, False),
    ("lfm-darts", "LFM applied to DARTS: alpha shared by learners W1 and W2", False, True),
    ("lfm-pdarts", "LFM applied to P-DARTS", True, True),
):
    SEARCHERS.register(_name, _help)(_searcher(_progressive, _lfm))


def run_search(
    bundle: DataBundle,
    cfg: SearchConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    *,
    out: Path | str | None = None,
    resume: bool = True,
) -> SearchResult:
    """Search an architecture on `bundle` (train split for weights, val split for alpha).

    With `out`, checkpoint each epoch into `out`/checkpoints/search and continue from the
    newest one there unless `resume` is False.
    """
    cfg.validate()
    return SEARCHERS.get(cfg.method)(bundle, cfg, device, progress, out=out, resume=resume)


def config_from_preset(name: str, **overrides) -> SearchConfig:
    """A preset from SEARCH_PRESETS with fields overridden (unknown fields raise LFMError)."""
    if name not in SEARCH_PRESETS:
        raise LFMError(f"unknown search preset {name!r}", f"use one of {', '.join(SEARCH_PRESETS)}")
    known = set(asdict(SEARCH_PRESETS[name]))
    unknown = set(overrides) - known
    if unknown:
        raise LFMError(
            f"unknown search option(s) {', '.join(sorted(unknown))}",
            f"known: {', '.join(sorted(known))}",
        )
    cfg = replace(SEARCH_PRESETS[name], **overrides)
    cfg.validate()
    return cfg
