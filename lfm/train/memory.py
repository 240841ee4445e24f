"""Peak resident memory of a stretch of code on a CPU (Linux /proc), for the benchmarks.

Writing 5 to /proc/self/clear_refs resets the process's peak resident set (VmHWM) to its
current size, so VmHWM read later minus VmRSS read at the reset is how far the stretch grew
the process. Memory the allocator holds free for reuse would hide that growth, so `start()`
first hands it back to the system (glibc's malloc_trim). Allocator caching still counts, so
the figure is indicative, not exact; where /proc does not allow it, the meter reports None.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # KiB -> MiB
    raise OSError(key)


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading may then be too low
        pass


class PeakRSS:
    """`start()` before the code, `growth()` after: peak resident-set growth in MiB, or None."""

    def __init__(self):
        self.base: float | None = None

    def start(self) -> None:
        """Return freed memory, reset the peak to the current resident set, remember its size."""
        _trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status("VmRSS")
        except OSError:
            self.base = None

    def growth(self) -> float | None:
        """MiB the peak rose above the resident set at `start()` (None without /proc)."""
        if self.base is None:
            return None
        try:
            return _status("VmHWM") - self.base
        except OSError:
            return None
