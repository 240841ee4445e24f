"""Seeded index splits: k per class, a random fraction, a stratified fraction.

Every function is pure: it returns sorted int64 index tensors and draws only from a
private generator seeded by its argument, so a split never depends on (or disturbs)
global random state.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from lfm.errors import LFMError


def derive_seed(seed: int, tag: str) -> int:
    """An independent seed for one named random step (val split, subsample, noise, ...)."""
    # crc32 is stable across processes (python's hash() is salted), so runs are reproducible.
    return (int(seed) * 1_000_003 + zlib.crc32(tag.encode())) % (2**63)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with `seed`."""
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    return g


def as_labels(y: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
    """Labels as a 1-D int64 CPU tensor."""
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    return t.reshape(-1).to(torch.int64).cpu()


def take_per_class(
    y: torch.Tensor | np.ndarray,
    k: int,
    seed: int,
    num_classes: int | None = None,
    flag: str = "--val-per-class",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take `k` random examples of every class; return (idx_taken, idx_rest), both sorted.

    `num_classes` makes a class with no examples at all an error too (not just a short one).
    """
    y = as_labels(y)
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    counts = torch.bincount(y, minlength=c)
    short = [(i, int(n)) for i, n in enumerate(counts.tolist()) if n < k]
    if short:
        i, n = min(short, key=lambda t: t[1])
        raise LFMError(
            f"class {i} has only {n} training examples, fewer than the {k} per class "
            f"asked for the validation set ({len(short)} class(es) short)",
            f"pass a smaller {flag} (at most {n})",
        )
    g = seeded_generator(seed)
    perm = torch.randperm(len(y), generator=g)
    # A stable sort of a random permutation by label gives each class a random order.
    by_class = perm[torch.sort(y[perm], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(y)) - starts[y[by_class]]
    taken_mask = torch.zeros(len(y), dtype=torch.bool)
    taken_mask[by_class[rank < k]] = True
    return _split_mask(taken_mask)


def random_fraction(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Take round(frac * n) random positions of range(n); return (idx_taken, idx_rest), sorted."""
    if not 0.0 <= frac <= 1.0:
        raise LFMError(f"fraction must be in [0, 1], got {frac}")
    m = int(round(frac * n))
    taken_mask = torch.zeros(n, dtype=torch.bool)
    taken_mask[torch.randperm(n, generator=seeded_generator(seed))[:m]] = True
    return _split_mask(taken_mask)


def stratified_fraction(
    y: torch.Tensor | np.ndarray, frac: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take round(frac * n_c) random examples of every class c; return (idx_taken, idx_rest)."""
    if not 0.0 <= frac <= 1.0:
        raise LFMError(f"fraction must be in [0, 1], got {frac}")
    y = as_labels(y)
    g = seeded_generator(seed)
    taken_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        m = int(round(frac * len(idx)))
        taken_mask[idx[torch.randperm(len(idx), generator=g)[:m]]] = True
    return _split_mask(taken_mask)


def _split_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
