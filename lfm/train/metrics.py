"""`metrics.jsonl`: one JSON line per training step and per evaluation, in the run folder;
with `tensorboard=True` the same scalars also go to TensorBoard event files in `tensorboard/`.

Step lines hold the global step, the epoch (fractional), the learning rate and every scalar the
method logged (under torchrun these are already the global batch's, `distributed.global_logs`);
evaluation lines add each learner's validation and test accuracy. Only rank 0 writes.

A killed run resumes from its last checkpoint: the lines written after it describe steps that
will be taken again, so `open` keeps exactly the lines up to the resumed step (rewriting the file
atomically) and every step appears once in the finished log. Lines are flushed as they are
written, so the log can be followed (`tail -f`) while the run trains. TensorBoard's event
files cannot be cut, so a resumed run opens its writer with `purge_step` at the resumed step:
TensorBoard then drops the events a killed run wrote after it.

Example
-------
>>> import json
>>> rows = [json.loads(line) for line in open("runs/x/metrics.jsonl")]
>>> [r["L_val"] for r in rows if r["kind"] == "step"][:3]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from lfm.errors import LFMError
from lfm.train.atomic import write_atomic

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def _summary_writer(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the tensorboard package
        raise LFMError(
            "--tensorboard needs the tensorboard package, which is not installed",
            'install it with pip install "lfm[tensorboard]" (or pip install tensorboard)',
        ) from e
    return SummaryWriter(str(folder), purge_step=purge_step or None)


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in `values` (nested dicts flattened to a/b names)."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out |= _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class MetricsLog:
    """Appends JSON lines to `folder`/metrics.jsonl; a no-op when `folder` is None.

    tensorboard: also write every number of every line as a TensorBoard scalar named
    `kind/key` at the line's `step`, under `folder`/tensorboard.
    """

    def __init__(self, folder: Path | None, tensorboard: bool = False):
        self.path = None if folder is None else Path(folder) / METRICS
        self.tensorboard = tensorboard
        self._file: IO[str] | None = None
        self._tb: Any = None

    def open(self, resumed_step: int) -> None:
        """Start writing after the first `resumed_step` steps (0: a fresh run, no old lines)."""
        if self.path is None:
            return
        kept: list[str] = []
        if resumed_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                step = row.get("step", 0)
                # a step line carries the step it took; an evaluation line, the steps done
                done = step + 1 if row.get("kind") == "step" else step
                if done <= resumed_step:
                    kept.append(line)
        write_atomic(self.path, "".join(f"{line}\n" for line in kept).encode())
        self._file = self.path.open("a")
        if self.tensorboard:
            self._tb = _summary_writer(self.path.parent / TENSORBOARD, resumed_step)

    def write(self, kind: str, **values: Any) -> None:
        """One line: {"kind": kind, **values}."""
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(values.get("step", 0))
            rest = {k: v for k, v in values.items() if k != "step"}
            for name, v in _scalars(rest, f"{kind}/").items():
                self._tb.add_scalar(name, v, step)

    def close(self) -> None:
        """Close the file (the lines are already flushed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
