"""One loop for every method: data order, schedule, evaluation, checkpoints, results.

Model selection uses the validation set only: each epoch's validation accuracy picks the
"selected" epoch; the test set is reported at the last epoch and at that epoch, never used
to choose anything.

Under `torchrun` (`lfm.train.distributed`) every rank runs this loop on its part of each global
batch; all ranks evaluate (the models are identical, and no collective is needed), only rank 0
prints and writes results and checkpoints, and every rank resumes from the same checkpoint.
`precision="bf16"` runs each method step under bf16 autocast (evaluation stays fp32).
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lfm.config import RunConfig
from lfm.data.types import Batch, DataBundle, Split, Stream, iterate_batches
from lfm.device import resolve_device, seed_everything
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.reweighter import Reweighter
from lfm.train import distributed
from lfm.train.checkpoint import (
    CheckpointDir,
    atomic_write_bytes,
    check_identity,
    data_fingerprint,
    remove_temp_files,
    restore,
    rng_state,
    set_rng_state,
)
from lfm.train.evaluate import evaluate
from lfm.train.metrics import MetricsLog
from lfm.train.optim import lr_factor_fn
from lfm.train.progress import progress_bar
from lfm.train.runlock import run_folder_lock

RESULTS = "results.json"
PER_EXAMPLE = "per_example.npz"
# Run folders of this process's trainers, so an interrupted command can say whether a checkpoint
# exists to resume from (`lfm.cli.main`), wherever the folder was set (flag or YAML).
RUN_FOLDERS: list[Path] = []
_OUTPUTS = re.compile(rf"^({re.escape(RESULTS)}|{re.escape(PER_EXAMPLE)})$")


def training_split(bundle: DataBundle, train_on: str) -> Split:
    """The data a method trains on: train, the clean validation set, or both."""
    if train_on == "train":
        return bundle.train
    if train_on == "val":
        return bundle.val
    if train_on == "train+val":
        return Split.concat(bundle.train, bundle.val)
    raise ValueError(f"unknown train_on {train_on!r}")


def check_bundle(bundle: DataBundle) -> None:
    """Refuse labels outside [0, C) and NaN / inf inputs (cheap; user-given data included)."""
    c = bundle.num_classes
    for name in ("train", "val", "test"):
        split: Split = getattr(bundle, name)
        for what, y in (("labels", split.y), ("clean labels", split.y_true)):
            if y is None or len(y) == 0:
                continue
            if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                raise LFMError(
                    f"the {name} {what} are {y.dtype}, not integers",
                    "give class indices as an int64 tensor",
                )
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= c:
                raise LFMError(
                    f"the {name} split has {what} outside [0, {c}) (range [{lo}, {hi}])",
                    f"give labels 0..{c - 1}, or set num_classes to the number of classes",
                )
        x = split.x
        if split.streaming:
            continue  # inputs read on demand: checking them here would read the whole set
        if x.dtype.is_floating_point and len(x) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.dim() > 1 else -1
            raise LFMError(
                f"the {name} data hold NaN or inf values ({bad} examples affected)",
                "clean or drop those examples before training",
            )


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process peak, a ceiling on what the run needed.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _select_on_validation(history: list[dict], name: str) -> dict:
    """The epoch with the best validation accuracy of learner `name` (first one on ties)."""
    best = max(history, key=lambda h: (h["val"][name], -h["epoch"]))
    return {"epoch": best["epoch"], "val_acc": best["val"][name], "test_acc": best["test"][name]}


def checked_factory(
    factory: Callable[[], nn.Module], bundle: DataBundle
) -> Callable[[], nn.Module]:
    """`factory`, refused if it is a module instance, whose first model's width is checked.

    A model with more outputs than classes trains silently (cross-entropy accepts any width
    >= the largest label), and a module given as the factory fails deep inside with
    `forward() missing 'x'`; both are caught here with the fix named.
    """
    if isinstance(factory, nn.Module):
        raise LFMError(
            f"model_factory is a {type(factory).__name__} instance, but a function that builds "
            "a fresh model is expected (every learner, and every resume, needs its own)",
            f"pass model_factory=lambda: {type(factory).__name__}(...) instead of the instance",
        )
    if not callable(factory):
        raise LFMError(
            f"model_factory is a {type(factory).__name__}, not a function that builds a model",
            "pass model_factory=lambda: MyNet(...)",
        )
    checked = False

    def build() -> nn.Module:
        nonlocal checked
        model = factory()
        if not isinstance(model, nn.Module):
            raise LFMError(
                f"model_factory returned a {type(model).__name__}, not a torch nn.Module",
                "return the model from the factory, e.g. lambda: MyNet(...)",
            )
        if not checked:
            check_output_width(model, bundle)
            checked = True
        return model

    return build


def check_output_width(model: nn.Module, bundle: DataBundle) -> None:
    """Refuse a model whose output is not (B, num_classes) on two training examples."""
    split = bundle.train if len(bundle.train) else bundle.val
    if len(split) == 0:
        return
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was = model.training
    model.eval()  # no BatchNorm statistics updated, no dropout drawn: the run is unchanged
    try:
        with torch.no_grad():
            out = model(bundle.inputs(split.x[:2].to(device), train=False))
    finally:
        model.train(was)
    c = bundle.num_classes
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != c:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LFMError(
            f"the model's output is {shape} for a batch of 2, but the data set has {c} classes, "
            f"so it must be (2, {c})",
            f"give the model {c} outputs (its last layer's out_features = num_classes)",
        )


# DataConfig fields that change how examples are read (streamed or in memory, by how many
# workers), not which examples or their order: a run may resume with other values of them.
_READING_ONLY = ("memory_budget_mb", "loader_workers")


class Trainer:
    """Runs `method` under `cfg`; `bundle` and `model_factory` may be given by API users."""

    def __init__(
        self,
        cfg: RunConfig,
        bundle: DataBundle | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        method: Method | None = None,
    ):
        # a method given as an object brings its own options, which the registry cannot check
        cfg.validate(options=method is None)
        self.cfg = cfg
        self.device = distributed.init(resolve_device(cfg.device))
        seed_everything(cfg.seed)
        if bundle is None:
            from lfm.data.build import build_data

            bundle = build_data(cfg.data)
        check_bundle(bundle)
        self.bundle = bundle
        self.method = method if method is not None else METHODS.create(cfg.method)
        self.out = Path(cfg.out) if cfg.out else None
        if self.out is not None:
            RUN_FOLDERS.append(self.out)
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise LFMError(
                f"--out {str(self.out)!r} is a file, not a folder",
                "pass a folder path (it is created if missing)",
            )
        if model_factory is None:
            from lfm.models import create_model

            def model_factory() -> nn.Module:
                return create_model(
                    cfg.model.name,
                    bundle.num_classes,
                    bundle.input_shape,
                    **cfg.model.kwargs,
                    **({"weights": cfg.model.weights} if cfg.model.weights else {}),
                )

        factory = checked_factory(model_factory, bundle)
        self.split = training_split(bundle, self.method.train_on)
        if len(self.split) == 0:
            raise LFMError("the training split is empty", "check --val-per-class and --imbalance")
        world = distributed.world_size()
        if world > 1:
            short = len(self.split) % cfg.batch_size
            if cfg.batch_size % world or 0 < short < world:
                raise LFMError(
                    f"--batch-size {cfg.batch_size} cannot be split over {world} processes"
                    + (f" (each pass ends with a batch of {short})" if 0 < short < world else ""),
                    f"use a batch size divisible by {world} whose last batch per pass has at "
                    f"least {world} examples, or fewer processes",
                )
        if len(bundle.val) == 0:
            raise LFMError(
                "the validation set is empty, and model selection (and LFM) needs it",
                "pass --val-per-class 1 or more, or --val-fraction",
            )
        # An epoch is one pass over the TRAINING set for every method, so a method that trains
        # on the small clean set alone (ce-clean) gets the same number of steps as the others
        # and cycles over its own data several times per epoch.
        per_epoch = len(self.split) if self.method.epoch_is_a_pass else len(bundle.train)
        spe = max(1, math.ceil(per_epoch / cfg.batch_size))
        if cfg.steps_per_epoch is not None:
            spe = min(spe, cfg.steps_per_epoch)
        total = spe * cfg.epochs
        self.ctx = Context(
            bundle=bundle,
            device=self.device,
            new_model=lambda: factory().to(self.device),
            val_stream=Stream(bundle.val, cfg.batch_size, device=self.device, seed=cfg.seed + 1),
            steps_per_epoch=spe,
            total_steps=total,
            lr_factor=lr_factor_fn(cfg.optim, spe, total),
            optim=cfg.optim,
            seed=cfg.seed,
            options=dict(cfg.method_options),
            precision=cfg.precision,
            compile=cfg.compile,
        )
        if cfg.compile and not self.method.compiles and distributed.is_main():
            print(
                f"lfm: info: --compile applies to the plain methods; {self.method.name} runs "
                "uncompiled (it calls the model through torch.func)",
                file=sys.stderr,
            )
        self.method.setup(self.ctx)
        # the public step (lfm.Reweighter) is the one every run takes, CLI and API alike
        self.reweighter = Reweighter.from_context(self.method, self.ctx)
        self.history: list[dict] = []
        self._last_eval: tuple[dict, dict] | None = None
        self._logs: dict[str, float] = {}  # the last step's; checkpointed, epoch records use them
        self.train_seconds = 0.0
        # The cost of each earlier process that trained this run (a resumed run has several):
        # {"from_step", "to_step", "train_seconds", "peak_mem_mb"}, as of its last checkpoint.
        # This process's segment is `_segment()`; results report every segment, never only
        # the last process's peak as the run's.
        self.segments: list[dict[str, Any]] = []
        self._seg_start: tuple[int, float] | None = None  # (step, train_seconds) at its start
        self.ckpt = (
            CheckpointDir(self.out / self.method.checkpoint_folder, cfg.keep_checkpoints)
            if self.out
            else None
        )
        self._fingerprint = data_fingerprint(bundle)  # hashes the labels: once, not per save
        self.metrics = MetricsLog(self.out if distributed.is_main() else None, cfg.tensorboard)
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
        )

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole run: method, position, history, RNG."""
        return {
            "method": self.method.state_dict(),
            "step": self.ctx.step,
            "epoch": self.ctx.epoch,
            "val_stream": self.ctx.val_stream.state_dict(),
            "history": json.dumps(self.history),
            "logs": json.dumps({k: float(v) for k, v in self._logs.items()}),
            "train_seconds": self.train_seconds,
            "segments": json.dumps(self.segments + ([self._segment()] if self._seg_start else [])),
            "rng": rng_state(),
            "config": json.dumps(asdict(self.cfg)),
            "identity": json.dumps(self._identity()),
        }

    def _identity(self) -> dict[str, dict]:
        """The method's settings and the data's fingerprint: what a resume must match."""
        return self.method.identity() | {"data": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from `state_dict`'s output."""
        if "identity" in state:  # checkpoints from before it was saved have none
            check_identity(json.loads(state["identity"]), self._identity(), self.ckpt.folder)
        saved = json.loads(state["config"])
        mine = json.loads(json.dumps(asdict(self.cfg)))
        for cfg in (saved, mine):  # how the data is read leaves what is learned unchanged
            for how in _READING_ONLY:
                cfg.get("data", {}).pop(how, None)
        for key in ("method", "data", "model", "batch_size", "seed"):
            if saved.get(key) != mine.get(key):
                raise LFMError(
                    f"the checkpoint in {self.out} was made with a different {key!r}",
                    "use a new --out folder, or run the same command as before to resume",
                )
        if int(state["epoch"]) > self.cfg.epochs:
            raise LFMError(
                f"the checkpoint in {self.out} is at epoch {int(state['epoch'])}, past the "
                f"{self.cfg.epochs} epochs asked for",
                "pass the same --epochs as before (or more), or use a new --out folder",
            )
        # mutant trainer-resume-skips-method: drop | train:resumes kill_resume
        self.method.load_state_dict(state["method"])
        self.ctx.step, self.ctx.epoch = int(state["step"]), int(state["epoch"])
        self.ctx.val_stream.load_state_dict(state["val_stream"])
        self.history = json.loads(state["history"])
        self._logs = json.loads(state.get("logs", "{}"))
        self.train_seconds = float(state["train_seconds"])
        step = int(state["step"])
        # a checkpoint from before segments were recorded: the earlier processes' cost is unknown
        unknown = [{"from_step": 0, "to_step": step, "train_seconds": None, "peak_mem_mb": None}]
        self.segments = json.loads(state["segments"]) if "segments" in state else unknown
        set_rng_state(state["rng"])

    def _segment(self) -> dict[str, Any]:
        """This process's stretch of the run so far: steps, training seconds, peak memory."""
        step0, seconds0 = self._seg_start or (self.ctx.step, self.train_seconds)
        return {
            "from_step": step0,
            "to_step": self.ctx.step,
            "train_seconds": round(self.train_seconds - seconds0, 3),
            "peak_mem_mb": round(_peak_memory_mb(self.device), 1),
        }

    def save_checkpoint(self) -> None:
        """Write a checkpoint for the current step (rank 0 only, when there is an out folder)."""
        if self.ckpt is not None and distributed.is_main():
            self.ckpt.save(self.state_dict(), self.ctx.step)

    def try_resume(self) -> bool:
        """Load the newest checkpoint in the out folder, if any."""
        if self.ckpt is None or not self.cfg.resume:
            return False
        state = self.ckpt.latest()
        if state is None:
            return False
        restore(self.ckpt, self.method.command, lambda: self.load_state_dict(state), progress=False)
        return True

    # -- the loop ------------------------------------------------------------------------
    def evaluate_all(self, split: Split) -> dict[str, dict]:
        """Metrics of every learner of the method on `split`."""
        return {
            n: evaluate(m, self.bundle, split, self.device) for n, m in self.method.models().items()
        }

    def _batches(self, start: int, stop: int) -> Iterator[Batch]:
        """Batches for global steps [start, stop): passes over the method's split, in the order
        that is a pure function of (seed, pass), so a resumed run sees the same batches."""
        per_pass = max(1, math.ceil(len(self.split) / self.cfg.batch_size))
        if self.cfg.steps_per_epoch is not None:
            per_pass = min(per_pass, self.cfg.steps_per_epoch)
        # Every rank: the same global batch, its own part (only that part is read, which
        # matters when a streamed split decodes it from disk).
        part = (distributed.world_size(), distributed.rank()) if distributed.active() else None
        step = start
        while step < stop:
            p, k = divmod(step, per_pass)
            for batch in iterate_batches(
                self.split,
                self.cfg.batch_size,
                device=self.device,
                seed=self.cfg.seed,
                epoch=p,
                start=k,
                part=part,
            ):
                yield batch
                step += 1
                if step >= stop:
                    return

    def _record(self, epoch: float, logs: dict[str, float]) -> None:
        """Evaluate every learner on validation and test and append to the history."""
        val, test = self.evaluate_all(self.bundle.val), self.evaluate_all(self.bundle.test)
        self.history.append(
            {
                "epoch": epoch,
                "step": self.ctx.step,
                "train": {k: float(v) for k, v in logs.items()},
                "val": {n: m["acc"] for n, m in val.items()},
                "test": {n: m["acc"] for n, m in test.items()},
            }
        )
        rec = self.history[-1]
        self.metrics.write("eval", step=rec["step"], epoch=epoch, val=rec["val"], test=rec["test"])
        self._last_eval = (val, test)

    def run(self) -> dict:
        """Train to the end (resuming if a checkpoint exists) and return the results.

        The out folder is locked for the run (`lfm.train.runlock`) before its checkpoints are
        read or cleared: a second run on the folder stops at once and touches nothing.
        """
        with run_folder_lock(self.out):
            return self._run()

    def _run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        resumed = self.try_resume()
        distributed.check_same(ctx.step, "the step to resume from")
        distributed.barrier()  # every rank has read the checkpoint before rank 0 may clear it
        if not resumed and self.ckpt is not None and distributed.is_main():
            # Starting over (--no-resume, or nothing to resume): a stale checkpoint of an older
            # run with a later step would otherwise outlive ours and be resumed next time.
            self.ckpt.clear()
        self.reweighter.sync()
        self.metrics.open(ctx.step)  # keeps the lines of the steps the checkpoint holds
        self._seg_start = (ctx.step, self.train_seconds)
        spe = ctx.steps_per_epoch
        show = cfg.progress and distributed.is_main()
        bar = progress_bar(show, ctx.total_steps, ctx.step, f"{self.method.name}")
        while ctx.epoch < cfg.epochs:
            stopping = False
            t0 = time.perf_counter()
            for batch in self._batches(ctx.step, (ctx.epoch + 1) * spe):
                lr, step = ctx.learner_lr("W1"), ctx.step
                with self.autocast:  # the step advances ctx.step
                    logs = self._logs = self.reweighter.step(batch.x, batch.y, batch.idx)
                # a method with its own schedule (a search) logs its lr itself
                row = {"step": step, "epoch": step / spe, "lr": lr} | logs
                self.metrics.write("step", **row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.3g}" for k, v in list(logs.items())[:3]}, refresh=False
                    )
                stopping = bool(cfg.max_steps and ctx.step >= cfg.max_steps)
                if stopping or (cfg.checkpoint_every and ctx.step % cfg.checkpoint_every == 0):
                    self.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                if stopping:
                    break
            self.train_seconds += time.perf_counter() - t0
            if stopping and ctx.step < (ctx.epoch + 1) * spe:
                # Stopped mid-epoch: evaluate for the results, but leave the epoch open so
                # that a later run resumes inside it.
                self._record(ctx.epoch + (ctx.step - ctx.epoch * spe) / spe, self._logs)
                break
            ctx.epoch += 1
            self.method.on_epoch_end(ctx)
            if ctx.epoch % cfg.eval_every == 0 or ctx.epoch == cfg.epochs or stopping:
                self._record(ctx.epoch, self._logs)
            self.save_checkpoint()
            if stopping:
                break
        if bar is not None:
            bar.close()
        self.metrics.close()  # every line is flushed as written: a crash loses none
        results = self.finish(resumed)
        distributed.barrier()  # files are written before any rank goes on (bench skips on them)
        return results

    def finish(self, resumed: bool) -> dict:
        """Assemble the results, write results.json and per_example.npz."""
        if not self.history:
            raise LFMError(
                "the run ended before its first evaluation", "train for at least one epoch"
            )
        if self._last_eval is None:  # resumed a finished run: nothing evaluated in this process
            self._last_eval = (
                self.evaluate_all(self.bundle.val),
                self.evaluate_all(self.bundle.test),
            )
        val, test = self._last_eval
        # the held-out selection set (DataConfig.select_per_class), at the last epoch only:
        # it chooses among methods, which the last epoch's learners are
        sel = self.bundle.select
        held = self.evaluate_all(sel) if sel is not None and len(sel) else None
        names = list(self.method.models())
        segments = [*self.segments, self._segment()]
        if self.segments and self.segments[-1]["to_step"] == self.ctx.step:
            segments = self.segments  # resumed a finished run: this process trained nothing
        peaks = [s["peak_mem_mb"] for s in segments]
        results = {
            "status": "complete",
            "method": self.method.label,
            "dataset": self.bundle.name,
            "seed": self.cfg.seed,
            "config": asdict(self.cfg),
            "data": self.bundle.info,
            "history": self.history,
            "last": {
                n: {
                    "epoch": self.history[-1]["epoch"],
                    "val_acc": val[n]["acc"],
                    "test_acc": test[n]["acc"],
                    "test_per_class_acc": test[n]["per_class_acc"],
                    "test_confusion": test[n]["confusion"],
                }
                | ({} if held is None else {"select_acc": held[n]["acc"]})
                for n in names
            },
            "selected": {n: _select_on_validation(self.history, n) for n in names},
            "timing": {
                "train_seconds": round(self.train_seconds, 3),
                "sec_per_iter": self.train_seconds / max(self.ctx.step, 1),
                "steps": self.ctx.step,
                # the run's peak: the highest of its processes' (None: one of them unknown)
                "peak_mem_mb": None if None in peaks else max(peaks),
                "device": str(self.device),
                "resumed": resumed,
                "segments": segments,
                "processes": distributed.world_size(),
                "precision": self.cfg.precision,
            },
        }
        extra = self.method.results()
        if extra:
            results[self.method.name] = extra
        if self.out is not None and distributed.is_main():
            self.write(results)
        return results

    def write(self, results: dict) -> None:
        """results.json and the per-example arrays, both written atomically."""
        remove_temp_files(self.out, _OUTPUTS)  # what killed writes of these files left behind
        atomic_write_bytes(self.out / RESULTS, json.dumps(results, indent=1).encode())
        arrays = {k: np.asarray(v) for k, v in self.method.per_example().items()}
        train = self.bundle.train
        arrays.update(
            index=np.arange(len(train)), origin=train.origin.numpy(), label=train.y.numpy()
        )
        if train.y_true is not None:
            arrays.update(true_label=train.y_true.numpy(), noisy=train.noisy.numpy())
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(self.out / PER_EXAMPLE, buf.getvalue())


def train(cfg: RunConfig, **kwargs) -> dict:
    """Build everything `cfg` names, train, and return the results dict."""
    return Trainer(cfg, **kwargs).run()
