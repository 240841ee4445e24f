"""The progress bar every long-running command shows on stderr (tqdm; none when disabled)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar over `total` steps starting at `initial`, or None when `enabled` is False."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
