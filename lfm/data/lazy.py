"""Inputs read on demand: a split's ``x`` when the data set is too large to hold in memory.

A :class:`LazyExamples` stands where a split would hold an ``(N, ...)`` tensor. It answers what
code written for tensors asks of ``split.x`` (``len``, ``shape``, ``dtype``, ``x[i]``, ``x[idx]``),
so the methods, evaluation and the per-example outputs need no second code path; taking a subset
(:func:`take`) keeps it lazy, and ``lfm.data.types.iterate_batches`` reads it through a
``torch.utils.data.DataLoader`` with ``num_workers`` loader processes.

Subclasses implement ``load(i)`` (one example as a tensor) and ``__len__``, and set
``example_shape`` and ``dtype``. :class:`DatasetExamples` wraps any map-style ``Dataset`` whose
items are ``(x, y)``; ``lfm.data.imagefolder.ImageFiles`` decodes image files.
"""

from __future__ import annotations

import gc
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from lfm.errors import LFMError

T = TypeVar("T")

# Loader processes per streaming split: two keep a small CNN fed on CPU without taking every core.
DEFAULT_WORKERS = 2


class LazyExamples(Dataset):
    """Base class: ``N`` examples of one shape and dtype, each read by ``load(i)`` when asked for.

    Attributes
    ----------
    example_shape : tuple of int
        Shape of one example, e.g. ``(3, 32, 32)``.
    dtype : torch.dtype
        Dtype of every example ``load`` returns (uint8 for images).
    num_workers : int
        Loader processes ``iterate_batches`` reads these examples with (0 = in this process).

    Example
    -------
    >>> class Squares(LazyExamples):
    ...     example_shape, dtype = (1,), torch.float32
    ...     def __len__(self):
    ...         return 10
    ...     def load(self, i):
    ...         return torch.tensor([float(i * i)])
    >>> split = Split(Squares(), torch.zeros(10, dtype=torch.int64), torch.arange(10))
    >>> next(iterate_batches(split, 4, shuffle=False)).x.flatten().tolist()
    [0.0, 1.0, 4.0, 9.0]
    """

    example_shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    num_workers: int = DEFAULT_WORKERS

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Example ``i`` (0 <= i < len) as a tensor of ``example_shape`` and ``dtype``."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        """``(N, *example_shape)``, as a tensor of all the examples would have."""
        return torch.Size((len(self), *self.example_shape))

    @property
    def nbytes(self) -> int:
        """Bytes the examples would take decoded in memory."""
        n = len(self)
        for s in self.example_shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    def __getitem__(self, i: int | torch.Tensor | Sequence[int] | slice) -> torch.Tensor:
        # One position -> one example; several -> them stacked, read here (not in workers),
        # as `tensor[idx]` would: for the odd lookup (an encoder cache), not for epochs.
        if isinstance(i, slice):
            i = range(*i.indices(len(self)))
        if (isinstance(i, torch.Tensor) and i.dim() == 0) or isinstance(i, numbers.Integral):
            i = int(i)  # a 0-d tensor or a numpy integer is one position
        if isinstance(i, int):
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} examples")
            return self.load(i % len(self))
        pos = torch.as_tensor(i, dtype=torch.int64).reshape(-1).tolist()
        if not pos:
            return torch.zeros((0, *self.example_shape), dtype=self.dtype)
        return torch.stack([self[p] for p in pos])

    def take(self, idx: torch.Tensor | Sequence[int]) -> TakenExamples:
        """The examples at positions ``idx``, still read on demand."""
        return TakenExamples(self, idx)

    def batches(self, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """Every example in order, stacked ``batch_size`` at a time, read by the loader workers."""
        from torch.utils.data import DataLoader

        workers = self.num_workers if len(self) > batch_size else 0  # a few: not worth a process
        loader = DataLoader(
            _Positions(self),
            batch_size=batch_size,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        )
        yield from read_loader(loader)

    def materialize(self, batch_size: int = 256) -> torch.Tensor:
        """Every example read into one ``(N, *example_shape)`` tensor, with the loader workers."""
        out = torch.empty((len(self), *self.example_shape), dtype=self.dtype)
        at = 0
        for xb in self.batches(batch_size):
            out[at : at + len(xb)] = xb
            at += len(xb)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, example_shape={self.example_shape})"


class _Positions(Dataset):
    """Item i = example i of a LazyExamples (so a DataLoader calls `load`, not `__getitem__`)."""

    def __init__(self, ex: LazyExamples):
        self.ex = ex

    def __len__(self) -> int:
        return len(self.ex)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ex.load(i)


class TakenExamples(LazyExamples):
    """Positions ``idx`` of another LazyExamples (a split's subset), read on demand."""

    def __init__(self, base: LazyExamples, idx: torch.Tensor | Sequence[int]):
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if isinstance(base, TakenExamples):  # a subset of a subset: one lookup, not a chain
            idx, base = base.idx[idx], base.base
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(base)):
            raise IndexError(f"positions outside [0, {len(base)})")
        self.base, self.idx = base, idx
        self.example_shape, self.dtype = base.example_shape, base.dtype
        self.num_workers = base.num_workers

    def __len__(self) -> int:
        return len(self.idx)

    def load(self, i: int) -> torch.Tensor:
        return self.base.load(int(self.idx[i]))


class ConcatExamples(LazyExamples):
    """Two example sources one after the other (e.g. streamed train + in-memory validation)."""

    def __init__(self, a: LazyExamples | torch.Tensor, b: LazyExamples | torch.Tensor):
        if tuple(a.shape[1:]) != tuple(b.shape[1:]) or a.dtype != b.dtype:
            raise ValueError(
                f"cannot concatenate examples of shape {tuple(a.shape[1:])} {a.dtype} and "
                f"{tuple(b.shape[1:])} {b.dtype}"
            )
        self.a, self.b = a, b
        self.example_shape, self.dtype = tuple(a.shape[1:]), a.dtype
        self.num_workers = max(getattr(a, "num_workers", 0), getattr(b, "num_workers", 0))

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def load(self, i: int) -> torch.Tensor:
        n = len(self.a)
        return _one(self.a, i) if i < n else _one(self.b, i - n)


def _one(x: LazyExamples | torch.Tensor, i: int) -> torch.Tensor:
    return x.load(i) if isinstance(x, LazyExamples) else x[i]


class DatasetExamples(LazyExamples):
    """The inputs of a map-style ``Dataset`` of ``(x, y, ...)`` items: ``load(i)`` is ``ds[i][0]``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Any map-style data set (``__len__`` and ``__getitem__``); item 0 of each item is the input.
    num_workers : int, default 2
        Loader processes that read it during training and evaluation.

    Example
    -------
    >>> ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    >>> DatasetExamples(ds).shape
    torch.Size([10, 3])
    """

    def __init__(self, dataset: Dataset, num_workers: int = DEFAULT_WORKERS):
        self.dataset, self.num_workers = dataset, int(num_workers)
        first = self.load(0) if len(self) else torch.zeros(0)
        self.example_shape, self.dtype = tuple(first.shape), first.dtype

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def load(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        return torch.as_tensor(item[0] if isinstance(item, tuple | list) else item)


def read_loader(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader; when a worker fails, stop its workers at once and raise its error.

    An LFMError comes back as its own one line (`worker_error`). The workers are shut down
    explicitly because the worker's error sits in a reference cycle with the loader's iterator:
    left to the garbage collector, the shutdown meets half-cleared queues and waits 5 s per
    worker, or runs in a later loader's forked workers.
    """
    it = iter(loader)
    failed: BaseException | None = None
    while failed is None:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            failed = worker_error(e) if isinstance(e, LFMError) else e
            break
        yield item
    shutdown = getattr(it, "_shutdown_workers", None)  # torch's own teardown, if it has one
    if shutdown is not None:
        shutdown()
    del it
    gc.collect()
    raise failed


def worker_error(e: LFMError) -> LFMError:
    """The LFMError a loader worker raised, as its one line (problem, fix) again.

    A DataLoader re-raises a worker's exception with the worker's whole traceback as its message;
    the command line prints an LFMError as one line, so the original one is recovered here.
    """
    text, marker = getattr(e, "unclipped", str(e)), "LFMError: "
    if "DataLoader worker" not in text or marker not in text:
        return e
    problem, sep, fix = text.rsplit(marker, 1)[1].strip().partition(". Fix: ")
    return LFMError(problem, fix if sep else None)


def take(x: torch.Tensor | LazyExamples, idx: torch.Tensor) -> torch.Tensor | LazyExamples:
    """``x[idx]`` for a tensor; a lazy subset (nothing read) for LazyExamples."""
    return x.take(idx) if isinstance(x, LazyExamples) else x[idx]


def in_memory(x: torch.Tensor | LazyExamples) -> torch.Tensor:
    """``x`` as a tensor: LazyExamples are read in full (with their loader workers)."""
    return x.materialize() if isinstance(x, LazyExamples) else x


def concat(
    a: torch.Tensor | LazyExamples, b: torch.Tensor | LazyExamples
) -> torch.Tensor | LazyExamples:
    """``torch.cat([a, b])`` for tensors; a lazy concatenation when either is LazyExamples."""
    if isinstance(a, LazyExamples) or isinstance(b, LazyExamples):
        return ConcatExamples(a, b)
    return torch.cat([a, b])
