"""`metrics.jsonl`: one JSON line per training step and per evaluation, in the run folder.

Step lines hold the global step, the epoch (fractional), the learning rate and every scalar the
method logged (under torchrun these are already the global batch's, `distributed.global_logs`);
evaluation lines add each learner's validation and test accuracy. Only rank 0 writes.

A killed run resumes from its last checkpoint: the lines written after it describe steps that
will be taken again, so `open` keeps exactly the lines up to the resumed step (rewriting the file
atomically) and every step appears once in the finished log. Lines are flushed as they are
written, so the log can be followed (`tail -f`) while the run trains.

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

from lfm.train.atomic import write_atomic

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends JSON lines to `folder`/metrics.jsonl; a no-op when `folder` is None."""

    def __init__(self, folder: Path | None):
        self.path = None if folder is None else Path(folder) / METRICS
        self._file: IO[str] | None = None

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

    def write(self, kind: str, **values: Any) -> None:
        """One line: {"kind": kind, **values}."""
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (the lines are already flushed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
