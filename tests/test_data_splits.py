"""Seeded splits and the long-tail profile."""

import pytest
import torch

from lfm.data import (
    longtail_counts,
    longtail_counts_for,
    random_fraction,
    stratified_fraction,
    subsample_longtail,
    take_per_class,
)
from lfm.data.longtail import CB_IMG_MAX
from lfm.errors import LFMError


def _labels(per_class: int, c: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat_interleave(per_class)
    return y[torch.randperm(len(y), generator=g)]  # shuffled, as real data sets are


def test_take_per_class_is_balanced_disjoint_and_seeded():
    y = _labels(50)
    taken, rest = take_per_class(y, 7, seed=3)
    assert torch.bincount(y[taken], minlength=10).tolist() == [7] * 10
    assert len(taken) + len(rest) == len(y)
    assert torch.equal(torch.sort(torch.cat([taken, rest])).values, torch.arange(len(y)))
    assert torch.equal(take_per_class(y, 7, seed=3)[0], taken)
    assert not torch.equal(take_per_class(y, 7, seed=4)[0], taken)


def test_take_per_class_short_class_names_class_and_flag():
    y = torch.cat([_labels(20, 3), torch.full((4,), 3)])
    with pytest.raises(LFMError, match=r"class 3 has only 4 .*--val-per-class"):
        take_per_class(y, 5, seed=0)


def test_take_per_class_missing_class_with_num_classes():
    y = _labels(20, 3)
    with pytest.raises(LFMError, match="class 3 has only 0"):
        take_per_class(y, 1, seed=0, num_classes=4)


def test_random_and_stratified_fraction():
    taken, rest = random_fraction(101, 0.5, seed=1)
    assert len(taken) == 50 and len(rest) == 51
    assert not set(taken.tolist()) & set(rest.tolist())
    y = _labels(30, 5)
    taken, rest = stratified_fraction(y, 0.3, seed=1)
    assert torch.bincount(y[taken], minlength=5).tolist() == [9] * 5


def test_mwnet_counts_cifar10_imbalance_100():
    # Synthetic CIFAR-10 shape: 5000 per class; 10 meta images per class come out first.
    y = _labels(5000)
    meta, rest = take_per_class(y, 10, seed=0)
    available = torch.bincount(y[rest], minlength=10).tolist()
    counts = longtail_counts_for(available, 100, "mwnet")
    expected = [4990, 2991, 1793, 1075, 644, 386, 231, 138, 83, 49]
    assert counts == expected
    keep = subsample_longtail(y[rest], counts, seed=0)
    assert torch.bincount(y[rest][keep], minlength=10).tolist() == expected


def test_cb_convention_and_caps():
    assert longtail_counts(10, CB_IMG_MAX, 100)[0] == 5000
    assert longtail_counts(10, CB_IMG_MAX, 100)[-1] == 50
    # cb asks for 5000 of class 0 but only 4990 are left after the meta set: capped.
    assert longtail_counts_for([4990] * 10, 100, "cb")[0] == 4990
    # mwnet with unequal classes uses the smallest class as img_max, so no cap is needed.
    assert longtail_counts_for([120, 100, 130], 10, "mwnet") == [100, 31, 10]


def test_imbalance_one_keeps_all_and_bad_requests_fail():
    assert longtail_counts(4, 100, 1.0) == [100] * 4
    with pytest.raises(LFMError, match="imbalance must be >= 1"):
        longtail_counts(4, 100, 0.5)
    with pytest.raises(LFMError, match="class 0 has 10 examples but .* asks for 11"):
        subsample_longtail(_labels(10, 2), [11, 5], seed=0)


def test_imbalance_too_large_for_a_small_set():
    with pytest.raises(LFMError, match="leaves class 8 with 0 training examples.*below 100"):
        longtail_counts_for([100] * 10, 200, "mwnet")
