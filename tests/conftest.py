"""Fixtures shared by the test files: one torch thread, and digits as 8x8 images for NAS."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from lfm.data.types import DataBundle, Split


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convolutions run faster on one thread, and the 2-core CI machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_images() -> Callable[[int, int], DataBundle]:
    """make(n_train, n_val): digits as (1, 8, 8) images in [0, 1]; the test split is fixed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target)
    p = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))

    def split(idx: torch.Tensor) -> Split:
        return Split(x[idx], y[idx], idx)

    def make(n_train: int, n_val: int) -> DataBundle:
        tr, va = p[:n_train], p[n_train : n_train + n_val]
        return DataBundle("digits", 10, (1, 8, 8), split(tr), split(va), split(p[1400:]))

    return make
