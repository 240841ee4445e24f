"""Checkpoints that survive being killed: written atomically, loaded without running code.

A checkpoint is a nested dict of tensors, numbers, strings, lists and tuples, so
`torch.load(weights_only=True)` can read it and a tampered file cannot execute anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfm.data.types import DataBundle
from lfm.errors import LFMError
from lfm.train.atomic import (  # noqa: F401 - re-exported: the checkpoint writer's helpers
    SLOW_WRITE_ENV,
    atomic_write_bytes,
    write_atomic,
    write_figure,
    write_json,
)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
# mkstemp's name for a temp file of `atomic_write_bytes`: ".<target name>.<8 random chars>.tmp"
_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def remove_temp_files(folder: Path, target: re.Pattern[str] | None = None) -> list[Path]:
    """Delete temp files that a killed `atomic_write_bytes` left in `folder` (only its own).

    `target` limits this to temp files of matching final names. Call it only where no other
    process is writing to `folder` at the same time (one run per run folder).
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _TEMP.match(p.name)
            if m and p.is_file() and (target is None or target.match(m.group("target"))):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temp file, fsync and rename."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class CorruptCheckpoint(LFMError):
    """A checkpoint file that is not a whole archive (truncated, emptied, overwritten)."""


def safe_load(path: Path) -> Any:
    """Load a checkpoint with `weights_only=True`; a file that is not one is a clear error.

    A file that is not a complete zip archive (what `torch.save` writes) is CorruptCheckpoint:
    damaged, so `CheckpointDir.latest` may fall back to an older one. A whole archive that
    `weights_only` refuses (it asks to run code) is a plain LFMError: someone made that file,
    and the run stops rather than step around it.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise LFMError(f"checkpoint {path} does not exist", "check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals and junk bytes raise many types; all mean "bad"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not zipfile.is_zipfile(path):
            raise CorruptCheckpoint(
                f"checkpoint {path} is corrupt ({first[:160]})",
                "delete it to start over (pass --no-resume), or move it out of the folder to "
                "resume from the one before",
            ) from e
        raise LFMError(
            f"checkpoint {path} is corrupt or not a plain-data checkpoint ({first[:160]})",
            "move it out of the folder to resume from the one before, or pass --no-resume to "
            "start over",
        ) from e


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch RNG states as plain data."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointDir:
    """`ckpt-<step>.pt` files in one folder; the newest complete one is the resume point."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Existing checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def remove_temp_files(self) -> list[Path]:
        """Delete the temp files of checkpoint writes that a kill interrupted."""
        return remove_temp_files(self.folder, _NAME)

    def clear(self) -> None:
        """Delete every checkpoint (and temp file) here: a run that starts over owns the folder."""
        self.remove_temp_files()
        for p in self.paths():
            p.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write a checkpoint for `step` atomically and drop all but the newest `keep`."""
        path = self.folder / f"ckpt-{step:09d}.pt"
        self.remove_temp_files()
        atomic_torch_save(state, path)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self, read_only: bool = False) -> dict[str, Any] | None:
        """The newest checkpoint that loads, or None when there is none.

        A corrupt one (truncated by hand, a disk fault) is renamed `<name>.corrupt`, kept for
        inspection, with one warning line, and the next older one is tried: the run continues
        from the newest good state instead of stopping. Under torchrun rank 0 alone renames
        and warns; the other ranks skip the same files. `read_only` (a reader of another
        run's folder, e.g. `lfm suspects`, which holds no lock) changes nothing in the folder.
        """
        from lfm.train import distributed

        if not read_only:  # a killed write leaves only a temp file, never a partial ckpt
            self.remove_temp_files()
        for path in reversed(self.paths()):
            try:
                return safe_load(path)
            except CorruptCheckpoint as e:
                if read_only or not path.exists():  # skip it (rank 0 may have renamed it)
                    continue
                older = [p for p in self.paths() if p != path]
                if distributed.is_main():
                    bad = path.with_name(path.name + ".corrupt")
                    os.replace(path, bad)
                    then = f"resuming from {older[-1].name}" if older else "starting over"
                    print(
                        f"lfm: warning: {e.problem}; kept as {bad.name}, {then}",
                        file=sys.stderr,
                        flush=True,
                    )
        return None


# ------------------------------------------------ identity checks for runs outside the Trainer


def data_fingerprint(bundle: DataBundle) -> dict:
    """What identifies a data bundle in a checkpoint: name, shapes, sizes and a label hash."""
    h = hashlib.sha256()
    for split in (bundle.train, bundle.val, bundle.test):
        for t in (split.y, split.origin):
            h.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return {
        "name": bundle.name,
        "num_classes": bundle.num_classes,
        "input_shape": list(bundle.input_shape),
        "sizes": [len(bundle.train), len(bundle.val), len(bundle.test)],
        "labels": h.hexdigest()[:16],
    }


def open_checkpoints(
    out: Path | str | None, command: str, identity: dict[str, dict], resume: bool
) -> tuple[CheckpointDir | None, dict | None]:
    """The checkpoints of `lfm <command>` under `out`, and the state to resume (None: start).

    `identity` maps a section name (e.g. "search", "data") to the settings that must match for
    a checkpoint to be continued; a difference is an LFMError naming the field.
    """
    if out is None:
        return None, None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LFMError(f"--out {str(out)!r} is a file, not a folder", "pass a folder path")
    ckpt = CheckpointDir(out / "checkpoints" / command)
    state = ckpt.latest() if resume else None
    if state is None:
        # starting over: a stale checkpoint with a later epoch would be resumed next time
        ckpt.clear()
        return ckpt, None
    path = ckpt.paths()[-1]
    try:
        saved = json.loads(state["identity"])
    except (KeyError, TypeError, ValueError):
        saved = None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise LFMError(
            f"checkpoint {path} is not a checkpoint of `lfm {command}`",
            "delete it, or use a new --out folder",
        )
    check_identity(saved, identity, ckpt.folder)
    return ckpt, state


def check_identity(saved: dict[str, dict], identity: dict[str, dict], folder: Path) -> None:
    """LFMError naming the first field whose value differs between a checkpoint's identity
    (`saved`, as it was written) and this run's (`identity`), section by section."""
    mine = json.loads(json.dumps(identity))  # tuples -> lists, as the saved copy has them
    for section, fields in mine.items():
        then = saved.get(section) or {}
        for k in sorted(fields.keys() | then.keys()):
            if fields.get(k) != then.get(k):
                raise LFMError(
                    f"the checkpoint in {folder} was made with a different {section}.{k} "
                    f"({then.get(k)!r} then, {fields.get(k)!r} now)",
                    "run the same command as before to resume, pass --no-resume (API: "
                    "resume=False) to start over, or use a new --out folder",
                )


def restore(ckpt: CheckpointDir, what: str, load: Callable[[], Any], progress: bool) -> None:
    """Run `load` (which reads the newest checkpoint into the run); a malformed file is an
    LFMError saying it is not a checkpoint of `what` (e.g. "`lfm search`")."""
    path = ckpt.paths()[-1]
    try:
        load()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        # plain data, but not what this code writes: tampered, or another program's file
        raise LFMError(
            f"checkpoint {path} is not a checkpoint of {what} ({type(e).__name__}: {str(e)[:120]})",
            "delete it to start over, or use a new --out folder",
        ) from None
    if progress:
        print(f"lfm: resuming from {path}", file=sys.stderr, flush=True)
