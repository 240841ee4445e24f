"""Long-tailed subsampling with an exponential profile (Cui et al. 2019; Meta-Weight-Net).

Class i keeps n_i = int(img_max * (1 / imbalance) ** (i / (C - 1))) examples, so class 0
keeps img_max and class C-1 keeps img_max / imbalance. Two conventions for img_max:

- ``mwnet``: img_max = examples per class left after the meta set is taken out (CIFAR-10 with
  10 meta images per class: 4990). When classes are unequal, the smallest class's count is used,
  so every n_i is available and the profile stays exactly exponential.
- ``cb``: img_max = 5000, as the class-balanced-loss code does for CIFAR; counts are capped
  at what each class has (so with a meta set taken, class 0 keeps 4990, not 5000).
"""

from __future__ import annotations

import numpy as np
import torch

from lfm.data.splits import as_labels, seeded_generator
from lfm.errors import LFMError

CB_IMG_MAX = 5000  # CIFAR's train images per class, as the class-balanced loss code hard-wires it


def longtail_counts(num_classes: int, img_max: int, imbalance: float) -> list[int]:
    """Per-class counts n_i = int(img_max * (1/imbalance) ** (i / (C-1))), i = 0..C-1."""
    if imbalance < 1:
        raise LFMError(f"imbalance must be >= 1, got {imbalance}", "pass --imbalance 1 or more")
    if num_classes == 1:
        return [int(img_max)]
    return [int(img_max * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def img_max_for(convention: str, available: list[int]) -> int:
    """The head-class count img_max under `convention`, given examples available per class."""
    if convention == "mwnet":
        return int(min(available))
    if convention == "cb":
        return CB_IMG_MAX
    raise LFMError(f"unknown imbalance convention {convention!r}", "use mwnet or cb")


def longtail_counts_for(
    available: list[int], imbalance: float, convention: str = "mwnet"
) -> list[int]:
    """Per-class counts for the classes' `available` examples, capped at what each class has."""
    img_max = img_max_for(convention, available)
    counts = longtail_counts(len(available), img_max, imbalance)
    counts = [min(n, a) for n, a in zip(counts, available, strict=True)]
    if counts and min(counts) == 0:
        # A class with no training example at all is a different problem (zero-shot), not a tail.
        empty = counts.index(0)
        raise LFMError(
            f"imbalance {imbalance:g} leaves class {empty} with 0 training examples "
            f"(the head class keeps {img_max})",
            f"use an --imbalance below {img_max}, or a larger data set",
        )
    return counts


def subsample_longtail(y: torch.Tensor | np.ndarray, counts: list[int], seed: int) -> torch.Tensor:
    """Sorted positions of a random `counts[c]` examples of each class c of `y`."""
    y = as_labels(y)
    have = torch.bincount(y, minlength=len(counts)).tolist()
    if len(have) > len(counts):
        raise LFMError(f"labels go up to {len(have) - 1} but only {len(counts)} counts were given")
    g = seeded_generator(seed)
    keep = []
    for c, n in enumerate(counts):
        if n > have[c]:
            raise LFMError(
                f"class {c} has {have[c]} examples but the long-tail profile asks for {n}",
                "lower --imbalance or use --imbalance-convention mwnet",
            )
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.int64)
