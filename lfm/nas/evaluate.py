"""Train a searched genotype from scratch and report its test accuracy (DARTS's `train.py`).

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (CIFAR evaluation: 20
  cells, C = 36, batch 96, 600 epochs, SGD 0.025 cosine to 0, momentum 0.9, wd 3e-4, clip 5,
  auxiliary weight 0.4, cutout 16, drop-path 0.2 ramped linearly with the epoch).
- LFM paper, Section IV-A: the evaluation network is trained on train + validation (the
  search's two halves) and tested on the test set; we report the last epoch, never a test pick.

The training runs on the Trainer (`EvalMethod`), so it has what every run has: checkpoints at
each epoch's end (and every --checkpoint-every steps), exact resume, --max-steps, bf16,
metrics.jsonl and results.json. An epoch here is one pass over train + validation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm.config import RunConfig
from lfm.data.types import Batch, DataBundle
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import METHOD_CHECKS
from lfm.models.split import rows
from lfm.nas.evalnet import NetworkCIFAR, count_params, cutout
from lfm.nas.genotypes import Genotype
from lfm.train import distributed


@dataclass
class EvalConfig:
    """How to train the evaluation network. Defaults are tiny CPU settings; see EVAL_PRESETS."""

    layers: int = 6  # cells (paper: 20)
    C: int = 16  # initial channels (paper: 36)
    epochs: int = 10  # paper: 600
    batch_size: int = 64  # paper: 96
    steps_per_epoch: int | None = None  # cap on batches per epoch (None: one full pass)
    lr: float = 0.025  # SGD lr, cosine-annealed to 0 over training (DARTS)
    momentum: float = 0.9  # DARTS
    weight_decay: float = 3e-4  # DARTS
    grad_clip: float = 5.0  # DARTS
    auxiliary: bool = True  # auxiliary head at 2/3 depth (DARTS)
    auxiliary_weight: float = 0.4  # DARTS
    cutout: int = 0  # cutout square side (paper: 16 for 32x32 CIFAR; 0 = off, sensible at 8x8)
    drop_path: float = 0.2  # final drop-path probability, ramped linearly from 0 (DARTS)
    train_on: str = "train+val"  # train+val (the protocol) or train
    seed: int = 0  # init, batch order, cutout and drop-path masks

    def validate(self) -> None:
        """Raise LFMError naming the first bad field."""
        for name in ("layers", "C", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise LFMError(
                    f"evaluate.{name} must be >= 1, got {getattr(self, name)}",
                    "use a positive integer (paper: 20 cells, C 36, 600 epochs, batch 96)",
                )
        if self.C % 2:
            raise LFMError(f"evaluate.C must be even, got {self.C}", "use e.g. 36")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise LFMError(
                f"evaluate.steps_per_epoch must be >= 1, got {self.steps_per_epoch}",
                "use None (one full pass) or a positive integer",
            )
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise LFMError(
                    f"evaluate.{name} must be > 0, got {getattr(self, name)}",
                    "use a positive number (DARTS: lr 0.025, grad_clip 5)",
                )
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.auxiliary_weight < 0:
            raise LFMError(
                "evaluate.momentum must be in [0, 1), weight_decay and auxiliary_weight >= 0",
                "use 0.9, 3e-4, 0.4",
            )
        if self.cutout < 0:
            raise LFMError(f"evaluate.cutout must be >= 0, got {self.cutout}", "use 16 or 0")
        if not 0 <= self.drop_path < 1:
            raise LFMError(
                f"evaluate.drop_path must be in [0, 1), got {self.drop_path}", "use 0.2 or 0"
            )
        if self.train_on not in ("train+val", "train"):
            raise LFMError(
                f"evaluate.train_on {self.train_on!r} is unknown", "use train+val or train"
            )


EVAL_PRESETS: dict[str, EvalConfig] = {
    # Liu et al. 2019 CIFAR-10 / CIFAR-100 evaluation.
    "darts-paper": EvalConfig(layers=20, C=36, epochs=600, batch_size=96, cutout=16),
    "tiny": EvalConfig(),
}


class _Logits(nn.Module):
    """The network's main logits (NetworkCIFAR also returns the auxiliary head's)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class EvalMethod(Method):
    """Training a genotype's evaluation network from scratch, as a method of the Trainer:
    DARTS's `train.py` (SGD with per-epoch cosine to 0, auxiliary loss, clipping, cutout,
    drop-path ramped linearly with the epoch) on train + validation."""

    name = "nas-evaluate"
    command = "`lfm evaluate`"
    epoch_is_a_pass = True  # an epoch is one pass over train + val, as in DARTS

    def __init__(self, genotype: Genotype | None = None, config: EvalConfig | None = None):
        self.genotype, self.cfg = genotype, config
        self.train_on = "train+val" if config is None else config.train_on

    def setup(self, ctx: Context) -> None:
        """The network (seeded by the config), its SGD and the cutout generator."""
        if self.cfg is None:  # a run that names the method: its options hold both
            self.genotype, self.cfg = eval_options(ctx.options)
            self.train_on = self.cfg.train_on
        cfg, b = self.cfg, ctx.bundle
        torch.manual_seed(cfg.seed)
        self.model = NetworkCIFAR(
            self.genotype, cfg.C, b.num_classes, cfg.layers, cfg.auxiliary, b.input_shape
        ).to(ctx.device)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.bundle = b
        self.records: list[dict] = []
        self._sums = [0.0, 0, 0]  # loss * n, correct, seen in this epoch

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """One SGD step on the main + auxiliary loss."""
        cfg, epoch = self.cfg, ctx.epoch
        lr = self._lr(epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs  # DARTS's linear ramp
        # under torchrun: augment the whole batch as one process would, train on this
        # process's rows (BatchNorm and drop-path over the global batch), sum the gradients
        part = distributed.part_of(batch)
        x = self.bundle.inputs(part.gather(batch.x), True)
        if cfg.cutout > 0:
            x = cutout(x, cfg.cutout, self.gen)
        x, y = part.local(x), batch.y
        with rows(part):
            logits, aux = self.model(x)
        loss = part.mean(F.cross_entropy(logits, y, reduction="none"))
        if aux is not None:
            loss = loss + cfg.auxiliary_weight * part.mean(
                F.cross_entropy(aux, y, reduction="none")
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        shown = [loss.detach(), (logits.argmax(1) == y).sum().double()]
        # mutant evaluate-grads-not-summed: `if part.split:` -> `if False:`
        #   | distributed_search:evaluate
        if part.split:
            shown = distributed.sum_grads(self.model.parameters(), shown)
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        # mutant evaluate-step-dropped: drop | nas_search:evaluate
        self.opt.step()
        mean_loss, correct, n = float(shown[0]), int(shown[1]), part.total
        self._sums = [self._sums[0] + mean_loss * n, self._sums[1] + correct, self._sums[2] + n]
        return {"loss": mean_loss, "train_acc": correct / max(n, 1), "lr": lr}

    def on_epoch_end(self, ctx: Context) -> None:
        """The epoch's record: lr, mean training loss and accuracy."""
        tot, correct, seen = self._sums
        e = ctx.epoch - 1
        rec = {"epoch": e, "lr": self._lr(e), "train_loss": tot / max(seen, 1)}
        self.records.append(rec | {"train_acc": correct / max(seen, 1)})
        self._sums = [0.0, 0, 0]

    def _lr(self, epoch: int) -> float:
        """DARTS's per-epoch cosine from lr to 0."""
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.cfg.epochs))

    def models(self) -> dict[str, nn.Module]:
        """The evaluation network (main logits)."""
        return {"model": _Logits(self.model)}

    def identity(self) -> dict[str, dict]:
        """The evaluation settings and the genotype must match to resume."""
        return {"evaluate": asdict(self.cfg), "genotype": self.genotype.to_dict()}

    def results(self) -> dict[str, Any]:
        """Parameters (DARTS's count, auxiliary head excluded), genotype, epoch records."""
        return {
            "params": count_params(self.model),
            "params_with_aux": count_params(self.model, include_auxiliary=True),
            "genotype": self.genotype.to_dict(),
            "history": self.records,
        }

    def state_dict(self) -> dict[str, Any]:
        """Network, optimizer, cutout generator, records."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "records": self.records,
            "sums": self._sums,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.records, self._sums = list(state["records"]), list(state["sums"])


def run_evaluate(
    bundle: DataBundle,
    genotype: Genotype,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    *,
    out: Path | str | None = None,
    resume: bool = True,
    **run: Any,
) -> dict:
    """Train `genotype` as a NetworkCIFAR from scratch on train + val; return test accuracy etc.

    Runs on the Trainer, in the run folder `out`/evaluate: it checkpoints each epoch there and
    continues from the newest checkpoint unless `resume` is False, and writes metrics.jsonl and
    results.json there. run: other RunConfig fields (max_steps, precision, ...).
    The test accuracy is the last epoch's (no test-set model selection).
    """
    from lfm.train.trainer import Trainer

    cfg.validate()
    method = EvalMethod(genotype, cfg)
    rc = RunConfig(
        method=EvalMethod.name,
        method_options=asdict(cfg) | {"genotype": genotype.to_dict()},
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        steps_per_epoch=cfg.steps_per_epoch,
        device=str(device),
        progress=progress,
        # its own run folder inside `out`, so that a search's files there stay as they are
        out=None if out is None else str(Path(out) / "evaluate"),
        resume=resume,
        eval_every=cfg.epochs,  # the test set is read once, at the end
        **run,
    )
    res = Trainer(rc, bundle=bundle, method=method).run()
    extra = res[method.name]
    return {
        "test_acc": res["last"]["model"]["test_acc"],  # last epoch (no test-set selection)
        "params": extra["params"],
        "params_with_aux": extra["params_with_aux"],
        "history": extra["history"],
        "genotype": extra["genotype"],
    }


def eval_options(options: dict[str, Any]) -> tuple[Genotype, EvalConfig]:
    """The genotype (a name, a genotype.json path or its dict) and EvalConfig a run's method
    options describe: `preset` (default tiny) with fields overridden."""
    from lfm.config import parse_value

    opts = dict(options)
    if "genotype" not in opts:
        raise LFMError("nas-evaluate needs a genotype", "pass --opt genotype=DARTS_V2 (or a path)")
    g = opts.pop("genotype")
    genotype = Genotype.from_dict(g) if isinstance(g, dict) else Genotype.load(str(g))
    base = EVAL_PRESETS[opts.pop("preset", "tiny")]
    fields = asdict(base)
    unknown = set(opts) - set(fields)
    if unknown:
        raise LFMError(
            f"unknown evaluate option(s) {', '.join(sorted(unknown))}",
            f"known: {', '.join(sorted(fields))}",
        )
    for k, v in opts.items():
        fields[k] = parse_value(v) if isinstance(v, str) and not isinstance(fields[k], str) else v
    cfg = EvalConfig(**fields)
    cfg.validate()
    return genotype, cfg


METHODS.register(EvalMethod.name, "train a genotype's evaluation network (DARTS's train.py)")(
    EvalMethod
)
METHOD_CHECKS[EvalMethod.name] = eval_options
