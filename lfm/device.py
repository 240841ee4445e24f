"""Device and seeding: chosen at run time, never hard-wired."""

from __future__ import annotations

import random

import numpy as np
import torch

from lfm.errors import LFMError, shown


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LFMError(
            f"device {shown(name)} asked for but no CUDA GPU is visible", "use --device cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LFMError(f"unknown device {shown(name)}", "use auto, cpu, cuda or cuda:N") from e


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g
