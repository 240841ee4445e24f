"""Writing a file so that a reader sees the old file or the whole new one, never a part.

Every file a command writes (checkpoints, results, tables, genotypes, CSVs, figures, reports)
goes through `atomic_write_bytes` (temp file in the same folder, fsync, os.replace, fsync of
the folder), so a kill or a full disk mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# Test hook, not a setting: when set to a number of seconds, `atomic_write_bytes` sleeps that
# long between writing the temp file and renaming it, so that a test can SIGKILL a run inside
# the write window (tests/test_kill_resume.py). Unset in normal use.
SLOW_WRITE_ENV = "LFM_TEST_SLOW_CHECKPOINT"


def _test_pause() -> None:
    delay = os.environ.get(SLOW_WRITE_ENV)
    if delay:
        time.sleep(float(delay))


def _umask_mode() -> int:
    """The mode a plain write gives a new file: 0o666 less the process umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one.

    `mode`: the new file's permissions (None: mkstemp's 0o600, what checkpoints and results
    have always had). An OSError (a full disk, a read-only folder) names `path`: a failed
    `write` alone does not say which file it was writing, and the CLI prints the name.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _test_pause()
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write a whole output file (text as UTF-8) atomically: every file a command writes goes
    through here or `atomic_write_bytes`, so a kill or a full disk never leaves half a file.

    The file gets the permissions a plain write gives it (tables, genotypes and
    reports were world-readable under the usual umask before they were written atomically).
    """
    data = data.encode() if isinstance(data, str) else data
    atomic_write_bytes(Path(path), data, mode=_umask_mode())


def write_json(path: Path | str, obj: Any, **dumps: Any) -> None:
    """`json.dumps(obj, indent=1, **dumps)` written atomically."""
    write_atomic(path, json.dumps(obj, **{"indent": 1, **dumps}))


def write_figure(fig: Any, path: Path | str, **savefig: Any) -> None:
    """A matplotlib figure saved atomically (rendered in memory, in the format of the suffix)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    write_atomic(path, buf.getvalue())
