"""Train a searched genotype from scratch and report its test accuracy (DARTS's `train.py`).

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (CIFAR evaluation: 20
  cells, C = 36, batch 96, 600 epochs, SGD 0.025 cosine to 0, momentum 0.9, wd 3e-4, clip 5,
  auxiliary weight 0.4, cutout 16, drop-path 0.2 ramped linearly with the epoch).
- LFM paper, Section IV-A: the evaluation network is trained on train + validation (the
  search's two halves) and tested on the test set; we report the last epoch, never a test pick.

With an out folder, a checkpoint is written at the end of every epoch and a later call with the
same settings continues from it, to the same result as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lfm.data.types import DataBundle, Split, iterate_batches
from lfm.errors import LFMError
from lfm.nas.evalnet import NetworkCIFAR, count_params, cutout
from lfm.nas.genotypes import Genotype
from lfm.train.checkpoint import (
    data_fingerprint,
    open_checkpoints,
    restore,
    rng_state,
    set_rng_state,
)
from lfm.train.progress import progress_bar
from lfm.train.runlock import run_folder_lock


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


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, bundle: DataBundle, split: Split, batch_size: int, device
) -> float:
    """Top-1 accuracy of `model` (eval mode) on `split`."""
    model.eval()
    correct = 0
    for b in iterate_batches(split, batch_size, device=device, shuffle=False):
        correct += int((model(bundle.inputs(b.x, False))[0].argmax(1) == b.y).sum())
    model.train()
    return correct / max(len(split), 1)


def run_evaluate(
    bundle: DataBundle,
    genotype: Genotype,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    *,
    out: Path | str | None = None,
    resume: bool = True,
) -> dict:
    """Train `genotype` as a NetworkCIFAR from scratch on train + val; return test accuracy etc.

    With `out`, checkpoint each epoch into `out`/checkpoints/evaluate and continue from the
    newest one there unless `resume` is False.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = NetworkCIFAR(
        genotype, cfg.C, bundle.num_classes, cfg.layers, cfg.auxiliary, bundle.input_shape
    ).to(device)
    data = Split.concat(bundle.train, bundle.val) if cfg.train_on == "train+val" else bundle.train
    if len(data) == 0:
        raise LFMError("evaluation has no training data", "check the data bundle's splits")
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = -(-len(data) // cfg.batch_size)
    if cfg.steps_per_epoch is not None:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    identity = {
        "evaluate": asdict(cfg),
        "genotype": genotype.to_dict(),
        "data": data_fingerprint(bundle),
    }
    with run_folder_lock(out):  # before its checkpoints are read or cleared
        ckpt, state = open_checkpoints(out, "evaluate", identity, resume)
        history: list[dict] = []
        start, elapsed = 0, 0.0
        if state is not None:

            def load() -> None:
                nonlocal history, start, elapsed
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                gen.set_state(state["gen"])
                history, start = json.loads(state["history"]), int(state["epoch"])
                elapsed = float(state["seconds"])
                set_rng_state(state["rng"])  # drop-path masks

            restore(ckpt, "`lfm evaluate`", load, progress)
        t0 = time.time() - elapsed
        for epoch in range(start, cfg.epochs):
            lr = (
                cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
            )  # cosine to 0, per epoch
            for g in opt.param_groups:
                g["lr"] = lr
            model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs  # DARTS's linear ramp
            tot = correct = seen = 0
            bar = progress_bar(progress, n_batches, 0, f"evaluate epoch {epoch}")
            for i, b in enumerate(
                iterate_batches(data, cfg.batch_size, device=device, seed=cfg.seed, epoch=epoch)
            ):
                if i >= n_batches:
                    break
                x = bundle.inputs(b.x, True)
                if cfg.cutout > 0:
                    x = cutout(x, cfg.cutout, gen)
                logits, aux = model(x)
                loss = F.cross_entropy(logits, b.y)
                if aux is not None:
                    loss = loss + cfg.auxiliary_weight * F.cross_entropy(aux, b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                tot += float(loss.detach()) * len(b)
                correct += int((logits.argmax(1) == b.y).sum())
                seen += len(b)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            rec = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": tot / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "seconds": time.time() - t0,
            }
            history.append(rec)
            if progress:
                print(
                    f"[evaluate] epoch {epoch} loss {rec['train_loss']:.3f} "
                    f"acc {rec['train_acc']:.3f} ({rec['seconds']:.0f}s)",
                    flush=True,
                )
            if ckpt is not None:
                snapshot = {
                    "identity": json.dumps(identity),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "gen": gen.get_state(),
                    "rng": rng_state(),
                    "history": json.dumps(history),
                    "seconds": time.time() - t0,
                }
                ckpt.save(snapshot, epoch + 1)
        test_acc = evaluate_accuracy(model, bundle, bundle.test, cfg.batch_size, device)
        return {
            "test_acc": test_acc,  # last epoch (no test-set model selection)
            "params": count_params(model),  # DARTS's count: the auxiliary head excluded
            "params_with_aux": count_params(model, include_auxiliary=True),
            "history": history,
            "genotype": genotype.to_dict(),
        }
