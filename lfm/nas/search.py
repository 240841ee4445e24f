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
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm.config import RunConfig, parse_value
from lfm.data.types import Batch, DataBundle, iterate_batches
from lfm.engine.functional import params_of
from lfm.engine.hypergrad import BACKENDS
from lfm.engine.virtual import EntryOptimizer, StepRule
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import METHOD_CHECKS
from lfm.models import MODELS, create_model
from lfm.models.split import rows
from lfm.nas.genotypes import Genotype, derive_genotype, num_edges
from lfm.nas.hypergrad import LFMGrad, darts_alpha_grad, lfm_nas_grad, lfm_nas_grad_shared
from lfm.nas.ops import PRIMITIVES
from lfm.nas.space1d import EDGES, OPS_1D
from lfm.nas.supernet import Supernet, batch_stats_only, image_input
from lfm.nas.supernet1d import Supernet1d, derive_arch
from lfm.registry import Registry
from lfm.train import distributed
from lfm.train.distributed import Part

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
    backend: str = "exact"
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
    vr_lr: float = 3e-4  # Adam lr of V and r (r: lazy per-entry Adam, as in data reweighting)
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
        if self.backend not in BACKENDS:
            raise bad("backend", self.backend, f"use one of {', '.join(BACKENDS.names())}")
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
    # backend="fd": the papers' finite differences, kept so the presets run what DARTS ran.
    "darts-paper": SearchConfig(
        "darts", layers=8, C=16, epochs=50, batch_size=64, order=2, backend="fd", warmup_epochs=0
    ),
    # Chen et al. 2019, CIFAR-10 search: batch 96, alpha lr 6e-4, 25 epochs per stage, first order.
    "pdarts-paper": SearchConfig(
        "pdarts",
        C=16,
        epochs=25,
        batch_size=96,
        order=1,
        backend="fd",  # what the papers ran (it matters for LFM-PDARTS's second-order terms)
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


def _norm(ts) -> float:
    """||(t_1, t_2, ...)|| as one vector (a hypergradient's size, for the metrics log)."""
    return float(torch.sqrt(sum((t.detach().float() ** 2).sum() for t in ts)))


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
        self.opt_r: EntryOptimizer | None = None
        self.opt_v: torch.optim.Adam | None = None
        if lfm:
            # r moves only on the validation entries a batch holds (lazy per-entry Adam, the
            # optimizer of r in data reweighting): a dense Adam would keep moving the others
            self.r = torch.full((len(bundle.val),), cfg.r_init, device=device)
            self.opt_r = EntryOptimizer(len(bundle.val), "adam", cfg.vr_lr, device=device)
            if not shared:
                self.encoder = nas_encoder(shape, cfg.encoder_dim, cfg.encoder_model).to(device)
                self.opt_v = torch.optim.Adam(self.encoder.parameters(), lr=cfg.vr_lr)

    def _parts(self) -> dict[str, nn.Module | torch.optim.Optimizer | EntryOptimizer]:
        parts = {"net1": self.net1, "net2": self.net2, "encoder": self.encoder}
        parts |= {"opt_a": self.opt_a, "opt1": self.opt1, "opt2": self.opt2}
        parts |= {"opt_v": self.opt_v, "opt_r": self.opt_r}
        return {k: v for k, v in parts.items() if v is not None}

    def state_dict(self) -> dict:
        """Alphas, r, every network and every optimizer state, for checkpoints."""
        state = {k: v.state_dict() for k, v in self._parts().items()}
        state["alphas"] = [a.detach() for a in self.alphas]
        if self.r is not None:
            state["r"] = self.r.detach()
        return state

    def _rule(self, net: nn.Module, opt: torch.optim.Optimizer) -> StepRule:
        """The learner's real update now (its SGD state and lr), clipping included."""
        return StepRule.of(opt, net, self.cfg.grad_clip)

    def _commit(self, net: nn.Module, opt: torch.optim.Optimizer, rule: StepRule, u) -> None:
        """Make the unrolled step the real one, and keep the torch optimizer's state true."""
        # mutant search-real-step-skipped: drop | behaviour:search_step
        rule.commit(net, u, opt)

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

    def _weights_only(self, xt, yt, part: Part) -> dict:
        """A plain weight step on CE (DARTS's weight step; P-DARTS warm-up; LFM warm-up, a = 1),
        on this process's rows of the training batch (xt, yt: the whole batch)."""
        a = tuple(t.detach() for t in self.alphas)
        xt, yt = part.local(xt), part.local(yt)

        def ce(logits: torch.Tensor) -> torch.Tensor:
            return part.mean(F.cross_entropy(logits, yt, reduction="none"))

        with rows(part):
            if self.shared:
                _, (o1, o2) = self.net1(xt, a, all_heads=True)
                loss = ce(o1) + ce(o2)
                logits = o2
            else:
                logits = self.net1(xt, a)
                loss = ce(logits)
                if self.net2 is not None:
                    logits = self.net2(xt, a)
                    loss = loss + ce(logits)
        for opt in (self.opt1, self.opt2):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        nets = [(n, o) for n, o in ((self.net1, self.opt1), (self.net2, self.opt2)) if o]
        shown = [ce(logits).detach(), (logits.argmax(1) == yt).sum().double() / part.total]
        # mutant search-warmup-grads-not-summed: `if part.split:` -> `if False:`
        #   | distributed_search:nodes
        if part.split:  # the global batch's gradients and logged values
            shown = distributed.sum_grads((p for n, _ in nets for p in n.parameters()), shown)
        for net, opt in nets:
            nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
            # mutant darts-weight-step-skipped: drop | behaviour:search_step
            opt.step()
        return {"train_loss": float(shown[0]), "train_acc": float(shown[1])}

    def step(self, xt, yt, xv, yv, val_idx, arch: bool, part: Part | None = None) -> dict:
        """One search iteration; `arch=False` is a weights-only (warm-up) iteration.

        (xt, yt) is the whole training batch, `part` the rows this process trains on (default
        all); (xv, yv) the validation batch, which every process evaluates whole.
        """
        cfg = self.cfg
        part = part or Part.whole(len(yt))
        if not arch:
            return self._weights_only(xt, yt, part)
        if not self.lfm:
            g = darts_alpha_grad(
                self.net1,
                params_of(self.net1),
                self.alphas,
                (xt, yt),
                (xv, yv),
                self._rule(self.net1, self.opt1),
                cfg.order,
                cfg.backend,
                cfg.fd_scale,
                part=part,
            )
            self.opt_a.zero_grad(set_to_none=True)
            for p, gr in zip(self.alphas, g.alphas, strict=True):
                # mutant darts-alpha-grad-sign: `gr.detach()` -> `-gr.detach()`
                #   | behaviour:search_step
                p.grad = gr.detach()
            # mutant darts-alpha-step-dropped: drop | behaviour:search_step
            self.opt_a.step()
            stats = self._weights_only(xt, yt, part)
            stats["val_loss"] = g.loss_val
            stats["hg_alpha"] = _norm(g.alphas)
            return stats
        if self.shared:
            rule = self._rule(self.net1, self.opt1)
            g: LFMGrad = lfm_nas_grad_shared(
                self.net1,
                params_of(self.net1),
                self.alphas,
                self.r[val_idx],
                (xt, yt),
                (xv, yv),
                rule,
                cfg.backend,
                cfg.similarity,
                cfg.fd_scale,
                u_alpha=cfg.lfm_form == "paper",
                part=part,
            )
            self._commit(self.net1, self.opt1, rule, g.step2)
        else:
            enc = dict(self.encoder.named_parameters())
            rule1, rule2 = self._rule(self.net1, self.opt1), self._rule(self.net2, self.opt2)
            g = lfm_nas_grad(
                self.net1,
                params_of(self.net1),
                params_of(self.net2),
                self.alphas,
                self.r[val_idx],
                (xt, yt),
                (xv, yv),
                rule1,
                rule2,
                self.encoder,
                {k: p.detach() for k, p in enc.items()},
                cfg.backend,
                cfg.similarity,
                cfg.fd_scale,
                u_alpha=cfg.lfm_form == "paper",
                part=part,
            )
            # W1' and W2' of the hypergradient are the real steps (Algorithm 1)
            self._commit(self.net1, self.opt1, rule1, g.step1)
            self._commit(self.net2, self.opt2, rule2, g.step2)
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
        # mutant lfm-darts-vr-step-dropped: drop | behaviour:search_step
        self.opt_r.step(self.r, val_idx, g.r.detach())
        if self.opt_v is not None:
            # mutant lfm-darts-v-step-dropped: drop | behaviour:search_step
            self.opt_v.step()
            self.opt_v.zero_grad(set_to_none=True)
        return {
            "train_loss": g.loss_train,
            "val_loss": g.loss_val,
            "hg_alpha": _norm(g.alphas),
            "hg_r": _norm([g.r]),
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


class _Bound(nn.Module):
    """A supernet with its current alphas bound in: `forward(x)` as every learner has it (so
    the Trainer evaluates a search's supernet like any model)."""

    def __init__(self, net: nn.Module, alphas: tuple[torch.Tensor, ...], head: int):
        super().__init__()
        self.net, self.alphas, self.head = net, alphas, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, tuple(a.detach() for a in self.alphas), head=self.head)


class SearchMethod(Method):
    """An architecture search as a method of the Trainer (one loop for both applications).

    The stage plan is a schedule over the Trainer's epochs: DARTS has one stage; P-DARTS
    several, and at the first step of each later stage the weakest candidates of every edge
    are dropped by the last stage's alphas and a fresh supernet starts (as P-DARTS does).
    Within a stage the weights' lr follows DARTS's per-epoch cosine, P-DARTS's skip dropout
    decays linearly, and warm-up epochs train the weights alone. Each step takes the
    validation stream's next batch for alpha (DARTS's `next(valid_queue)`).
    """

    command = "`lfm search`"
    checkpoint_folder = "checkpoints/search"  # an evaluation can share the folder

    def __init__(self, name: str, progressive: bool, lfm: bool, config: SearchConfig | None = None):
        self.name, self.progressive, self.lfm, self.cfg = name, progressive, lfm, config

    def setup(self, ctx: Context) -> None:
        """The stage plan, the first stage's supernet(s), alphas and optimizers."""
        if self.cfg is None:
            self.cfg = search_config(self.name, ctx.options)
        cfg = self.cfg
        if cfg.space == "darts":
            image_input(ctx.bundle.input_shape)
        self.bundle, self.device = ctx.bundle, ctx.device
        self.stages = _plan(cfg, self.progressive)
        planned = sum(st.epochs for st in self.stages)
        if ctx.total_steps != planned * ctx.steps_per_epoch:
            raise LFMError(
                f"the run has {ctx.total_steps // ctx.steps_per_epoch} epochs but the {self.name} "
                f"search plans {planned}",
                f"run it with lfm search (or pass --epochs {planned})",
            )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.normal_ops, self.reduce_ops = _space_ops(cfg)
        self.stage = 0
        self.learners = self._build()
        self.records: list[dict] = []
        self._sums: dict[str, float] = {}
        self._n = 0

    def _build(self) -> _Learners:
        return _Learners(
            self.cfg,
            self.bundle,
            self.stages[self.stage],
            self.normal_ops,
            self.reduce_ops,
            self.lfm,
            self.device,
            self.gen,
        )

    def _where(self, epoch: int) -> tuple[int, int]:
        """(stage, epoch within it) of a global epoch."""
        for s, st in enumerate(self.stages):
            if epoch < st.epochs:
                return s, epoch
            epoch -= st.epochs
        return len(self.stages) - 1, self.stages[-1].epochs - 1

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One search iteration (weights only in a warm-up epoch)."""
        s, epoch = self._where(ctx.epoch)
        if s != self.stage:  # P-DARTS: drop ops by the last stage's alphas, start afresh
            self.normal_ops = drop_ops(
                self.learners.alphas[0], self.normal_ops, self.stages[s].num_ops
            )
            self.reduce_ops = drop_ops(
                self.learners.alphas[1], self.reduce_ops, self.stages[s].num_ops
            )
            self.stage = s
            self.learners = self._build()
        stage = self.stages[s]
        lr = _cosine_lr(self.cfg, epoch, stage.epochs)
        self.learners.set_lr(lr)
        # P-DARTS: the skip dropout rate decays linearly to 0 over the stage
        self.learners.set_skip_dropout(stage.skip_p * (stage.epochs - epoch - 1) / stage.epochs)
        vb = next(ctx.val_stream)
        inputs = self.bundle.inputs
        # under torchrun every process holds the whole batch (augmented as one process would)
        # and trains on its own rows of it (`lfm.nas.hypergrad`)
        part = distributed.part_of(batch)
        x, y = part.gather(batch.x), part.gather(batch.y)
        st = self.learners.step(
            inputs(x, True), y, inputs(vb.x, True), vb.y, vb.idx, epoch >= stage.warmup, part
        )
        for k, v in st.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        return st | {"lr": lr, "stage": float(s)}

    def on_epoch_end(self, ctx: Context) -> None:
        """The epoch's record: its means, the supernet's validation accuracy, the genotype."""
        s, epoch = self._where(ctx.epoch - 1)
        stage = self.stages[s]
        rec = {
            "stage": s,
            "layers": stage.layers,
            "epoch": epoch,
            "arch": epoch >= stage.warmup,
            "lr": _cosine_lr(self.cfg, epoch, stage.epochs),
        }
        rec |= {k: v / max(self._n, 1) for k, v in self._sums.items()}
        rec["val_acc"] = self.learners.val_accuracy(self.bundle, self.cfg.batch_size)
        g = _derive(self.cfg, self.learners.alphas, self.normal_ops, self.reduce_ops)
        rec["genotype"] = g.to_dict() if isinstance(g, Genotype) else g
        self.records.append(rec)
        self._sums, self._n = {}, 0

    def models(self) -> dict[str, nn.Module]:
        """The supernet whose validation loss drives alpha (W2 in LFM), with alpha bound."""
        L = self.learners
        net, head = (L.net2, 0) if L.net2 is not None else (L.net1, 1 if L.shared else 0)
        return {"supernet": _Bound(net, L.alphas, head)}

    def result(self) -> SearchResult:
        """The genotype (P-DARTS's cap on skip-connects applied), final alphas, history."""
        max_skip = self.cfg.max_skip if self.progressive else None
        genotype = _derive(
            self.cfg, self.learners.alphas, self.normal_ops, self.reduce_ops, max_skip
        )
        alphas = tuple(t.detach().cpu() for t in self.learners.alphas)
        return SearchResult(genotype, alphas, self.normal_ops, self.reduce_ops, self.records)

    def results(self) -> dict:
        """results.json's `search` entry: the genotype, alphas, candidates, epoch records."""
        r = self.result()
        return {
            "genotype": r.genotype.to_dict() if isinstance(r.genotype, Genotype) else r.genotype,
            "alphas": [a.tolist() for a in r.alphas],
            "normal_ops": r.normal_ops,
            "reduce_ops": r.reduce_ops,
            "history": r.history,
        }

    def identity(self) -> dict[str, dict]:
        """Every search setting must match for a checkpoint to be continued."""
        return {"search": asdict(self.cfg)}

    def state_dict(self) -> dict:
        """Stage, candidates, learners, the alpha generator and the epoch records."""
        return {
            "stage": self.stage,
            "normal_ops": self.normal_ops,
            "reduce_ops": self.reduce_ops,
            "learners": self.learners.state_dict(),
            "gen": self.gen.get_state(),
            "records": json.dumps(self.records),
            "sums": json.dumps([self._sums, self._n]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s output (after `setup` with the same settings)."""
        self.stage = int(state["stage"])
        self.normal_ops, self.reduce_ops = state["normal_ops"], state["reduce_ops"]
        self.learners = self._build()
        # mutant search-resume-loses-learners: drop | nas_resume
        self.learners.load_state_dict(state["learners"])
        self.gen.set_state(state["gen"])  # after building, whose initialisation drew from it
        self.records = json.loads(state["records"])
        self._sums, self._n = json.loads(state["sums"])


SEARCHERS: Registry[Method] = Registry("search method")

# DARTS is a P-DARTS with one stage; LFM adds the second learner (module docstring)
for _name, _help, _progressive, _lfm in (
    ("darts", "DARTS (Liu et al. 2019): one stage, first or second order", False, False),
    ("pdarts", "P-DARTS (Chen et al. 2019): progressive depth, op dropping", True, False),
    ("lfm-darts", "LFM applied to DARTS: alpha shared by learners W1 and W2", False, True),
    ("lfm-pdarts", "LFM applied to P-DARTS", True, True),
):

    def _factory(name=_name, progressive=_progressive, lfm=_lfm) -> SearchMethod:
        return SearchMethod(name, progressive, lfm)

    SEARCHERS.register(_name, _help)(_factory)
    METHODS.register(_name, f"architecture search: {_help}")(_factory)
    METHOD_CHECKS[_name] = lambda options, name=_name: search_config(name, options)


def search_config(method: str, options: dict) -> SearchConfig:
    """The SearchConfig a run's method options describe: `preset` (default tiny) with fields
    overridden (strings from the command line are parsed by the field's type)."""
    opts = dict(options)
    preset = opts.pop("preset", "tiny")
    hints = typing.get_type_hints(SearchConfig)
    for k, v in list(opts.items()):
        if isinstance(v, str) and k in hints and hints[k] is not str:
            opts[k] = parse_value(v)
        if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple:
            opts[k] = tuple(v)
    return config_from_preset(preset, **(opts | {"method": method}))


def run_config(cfg: SearchConfig, **run: Any) -> RunConfig:
    """The Trainer's RunConfig of search `cfg` (its epochs are the stage plan's total).

    run: RunConfig fields (out, device, data, precision, max_steps, checkpoint_every, ...).
    """
    stages = _plan(cfg, cfg.method.endswith("pdarts"))
    base = dict(
        method=cfg.method,
        epochs=sum(s.epochs for s in stages),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        steps_per_epoch=cfg.steps_per_epoch,
        method_options={k: v for k, v in asdict(cfg).items() if k != "method"},
    )
    return RunConfig(**(base | run))


def run_search(
    bundle: DataBundle,
    cfg: SearchConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    *,
    out: Path | str | None = None,
    resume: bool = True,
    **run: Any,
) -> SearchResult:
    """Search an architecture on `bundle` (train split for weights, val split for alpha).

    The search runs on the Trainer: with `out`, it checkpoints each epoch into
    `out`/checkpoints/search and continues from the newest one there unless `resume` is False,
    logs every step to `out`/metrics.jsonl and writes `out`/results.json. run: other RunConfig
    fields (max_steps, checkpoint_every, precision, tensorboard, eval_every).

    Example
    -------
    >>> res = run_search(bundle, SearchConfig(method="lfm-darts"))
    >>> res.genotype.normal
    """
    from lfm.train.trainer import Trainer

    cfg.validate()
    method = SEARCHERS.create(cfg.method)
    method.cfg = cfg
    rc = run_config(
        cfg,
        device=str(device),
        progress=progress,
        out=None if out is None else str(out),
        resume=resume,
        **run,
    )
    Trainer(rc, bundle=bundle, method=method).run()
    return method.result()


def config_from_preset(name: str, **overrides) -> SearchConfig:
    """A preset from SEARCH_PRESETS with fields overridden (unknown fields raise LFMError)."""
    if name not in SEARCH_PRESETS:
        raise LFMError(f"unknown search preset {name!r}", f"use one of {', '.join(SEARCH_PRESETS)}")
    known = set(asdict(SEARCH_PRESETS[name]))
    unknown = set(overrides) - known
    if "hvp" in unknown:
        raise LFMError("search option `hvp` was renamed", "use backend=exact or backend=fd")
    if unknown:
        raise LFMError(
            f"unknown search option(s) {', '.join(sorted(unknown))}",
            f"known: {', '.join(sorted(known))}",
        )
    cfg = replace(SEARCH_PRESETS[name], **overrides)
    cfg.validate()
    return cfg
