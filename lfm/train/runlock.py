"""One run per run folder: an OS file lock held for the run's life, and a write probe.

`run_folder_lock(out)` takes an exclusive `fcntl.flock` on `out/.lfm.lock` before anything in
the folder is read or deleted, and holds it until the block ends. The kernel drops the lock when
the process dies, so `kill -9` leaves no stale lock to clean up; the file itself stays (removing
it would let a third process lock a fresh inode while a second still waits on the old one). A
second process that finds the folder locked gets an LFMError at once naming the holder's pid,
before it touches anything. The lock is re-entrant within one process (`lfm dr` holds OUT while
each trainer holds OUT/<method>, and `lfm train` holds OUT in the CLI and the trainer). Under
torchrun only rank 0 takes it: every rank works on the same folder, one run.

Taking the lock also probes the folder (create, write, fsync, rename, remove a small file), so
that a read-only, full or forbidden folder fails with one line before any training.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lfm.errors import LFMError

LOCK_NAME = ".lfm.lock"
_PROBE = ".lfm-probe"
# realpath -> [file descriptor, depth] of the locks this process holds
_HELD: dict[str, list[int]] = {}

# The errors of a folder that cannot take our files, and what to do about each.
FS_ERRORS: dict[int, str] = {
    errno.EROFS: "pass --out a folder on a writable file system",
    errno.EACCES: "pass --out a folder you may write to, or change its permissions",
    errno.EPERM: "pass --out a folder you may write to, or change its permissions",
    errno.ENOSPC: "free disk space and run the same command again (it continues from the last "
    "good checkpoint), or pass --out a folder on another disk",
    errno.EDQUOT: "free disk space (you are over quota) and run the same command again (it "
    "continues from the last good checkpoint), or pass --out a folder on another disk",
    errno.ENAMETOOLONG: "pass a shorter --out (at most 255 bytes per folder name)",
}


def fs_error(e: OSError) -> LFMError | None:
    """The one-line LFMError for a file-system fault in FS_ERRORS (None for any other error)."""
    if e.errno not in FS_ERRORS:
        return None
    where = e.filename if e.filename is not None else "a file"
    what = os.strerror(e.errno).lower()
    return LFMError(f"cannot write {where}: {what}", FS_ERRORS[e.errno])


def _probe_write(path: Path, data: bytes) -> None:
    """Create `path`, write and fsync `data`: the first half of the probe (a test hook)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(folder: Path | str) -> None:
    """Create, write, fsync, rename and remove a small file in `folder`; an FS fault is an
    LFMError naming the folder and the fix (any other OSError propagates)."""
    folder = Path(folder)
    tmp, final = folder / f"{_PROBE}.{os.getpid()}.tmp", folder / f"{_PROBE}.{os.getpid()}"
    try:
        try:
            _probe_write(tmp, b"lfm checks that it can write here\n")
            os.replace(tmp, final)
        finally:
            for p in (tmp, final):
                if os.path.lexists(p):
                    os.unlink(p)
    except OSError as e:
        err = fs_error(OSError(e.errno, e.strerror, str(folder)))
        if err is None:
            raise
        raise err from None


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes just after locking: wait a bit)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


@contextmanager
def run_folder_lock(folder: Path | str | None, flag: str = "--out") -> Iterator[None]:
    """Hold the exclusive lock of run folder `folder` (created if missing) for the block.

    Raises LFMError at once when another process holds it, and when `folder` is a file or
    cannot be written (the probe). `flag` is the option that named the folder, for the fix.
    `folder` None (a run that writes nothing) holds nothing.
    """
    from lfm.train import distributed

    if folder is None or not distributed.is_main():  # rank 0 holds the folder for every rank
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LFMError(
            f"{flag} {str(folder)!r} is a file, not a folder",
            "pass a folder path (it is created if missing)",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = fs_error(e)
        if err is None:
            raise
        raise err from None
    key = os.path.realpath(folder)
    if key in _HELD:  # this process holds it already (an outer command's lock)
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # named by the folder: the lock file is ours, the folder the user's
        err = fs_error(OSError(e.errno, e.strerror, str(folder)))
        if err is None:
            raise
        raise err from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise LFMError(
            f"run folder {folder} is in use by process {pid}",
            f"wait for it, or pass another {flag}",
        ) from None
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            err = fs_error(OSError(e.errno, e.strerror, str(folder)))
            if err is None:
                raise
            raise err from None
        probe_writable(folder)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


def holds(folder: Path | str) -> bool:
    """True when this process holds the lock of `folder`."""
    return os.path.realpath(folder) in _HELD
