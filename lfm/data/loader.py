"""Any map-style ``Dataset`` through a ``torch.utils.data.DataLoader``, with example indices.

Per-example methods (LFM-DR's ``b`` and ``a``, L2RW, MW-Net, small-loss) need to know *which*
training examples a batch holds. :class:`IndexedDataset` adds that position to every item, so a
plain ``DataLoader`` (workers, pinned memory, any sampler) yields ``[x, y, idx]``;
:func:`collate_batch` and :func:`indexed_loader` give the project's :class:`~lfm.data.Batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lfm.data.lazy import DEFAULT_WORKERS, DatasetExamples, read_loader
from lfm.data.types import Batch, Split


class IndexedDataset(Dataset):
    """A map-style data set whose item ``i`` is its own item ``i`` with ``i`` appended.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Any map-style data set (``__len__`` and ``__getitem__``) whose items are ``(x, y)``
        tuples (longer tuples keep all their fields; the index is always last). A `Split` is one.

    Returns
    -------
    IndexedDataset
        Items ``(x, y, i)`` with ``i`` an int in ``[0, len(dataset))``: the example's index, the
        one ``lfm`` keeps per-example weights under.

    Example
    -------
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> ds = TensorDataset(torch.randn(100, 5), torch.randint(0, 3, (100,)))
    >>> loader = DataLoader(IndexedDataset(ds), batch_size=10, shuffle=True, num_workers=2)
    >>> for x, y, idx in loader:
    ...     assert torch.equal(x, ds.tensors[0][idx])
    """

    def __init__(self, dataset: Dataset):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"IndexedDataset needs a map-style Dataset (__len__ and __getitem__), "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.dataset[i]
        if not isinstance(item, tuple | list):
            raise TypeError(
                f"item {i} of {type(self.dataset).__name__} is a {type(item).__name__}, not an "
                "(x, y) tuple"
            )
        return (*item, int(i))


def collate_batch(items: Sequence[tuple[Any, ...]]) -> Batch:
    """Collate ``(x, y, idx)`` items (from `IndexedDataset`) into a :class:`~lfm.data.Batch`.

    Parameters
    ----------
    items : sequence of (x, y, idx)
        What a DataLoader gathers for one batch.

    Returns
    -------
    Batch
        ``x`` stacked, ``y`` and ``idx`` as int64 vectors; on the CPU (move it with ``.to``).

    Example
    -------
    >>> b = collate_batch([(torch.zeros(2), 1, 7), (torch.ones(2), 0, 3)])
    >>> b.idx.tolist()
    [7, 3]
    """
    x, y, idx = default_collate([(it[0], it[1], it[-1]) for it in items])
    return Batch(x, torch.as_tensor(y, dtype=torch.int64), torch.as_tensor(idx, dtype=torch.int64))


def indexed_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = DEFAULT_WORKERS,
    pin_memory: bool | None = None,
    seed: int | None = None,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader over `dataset` that yields :class:`~lfm.data.Batch` es with example indices.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style, items ``(x, y)``.
    batch_size : int
        Examples per batch.
    shuffle : bool, default True
        A new random order each epoch.
    num_workers : int, default 2
        Loader processes (0 reads in this process).
    pin_memory : bool or None, default None
        Page-locked batches for fast host-to-GPU copies; None = when CUDA is available.
    seed : int or None, default None
        Seeds the loader's own generator (shuffle order and worker seeds), so the order is
        reproducible and the global RNG is left alone; None draws from the global RNG.
    drop_last : bool, default False
        Drop a last, smaller batch.
    **kwargs
        Passed to ``DataLoader`` (``sampler``, ``prefetch_factor``, ``persistent_workers``, ...).

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``Batch(x, y, idx)`` on the CPU; ``batch.to(device, non_blocking=True)`` moves it.

    Example
    -------
    >>> ds = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    >>> for b in indexed_loader(ds, 16, num_workers=0, seed=0):
    ...     assert torch.equal(b.x, ds.tensors[0][b.idx])
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_batch,
        generator=generator,
        **kwargs,
    )


def loader_batches(
    split: Split,
    chunks: Sequence[torch.Tensor],
    device: torch.device | str,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[Batch]:
    """`iterate_batches` on a streaming split: one batch per position tensor of `chunks`, read
    through a DataLoader with the split's loader workers. Its batch sampler is that fixed list,
    so the order is the in-memory path's."""
    device = torch.device(device)
    workers = int(getattr(split.x, "num_workers", 0))
    full = [c.tolist() for c in chunks if len(c)]  # a loader cannot collate an empty batch
    loader = DataLoader(
        IndexedDataset(split),
        batch_sampler=full,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_batch,
        # A private generator: creating a loader otherwise draws its workers' base seed from the
        # global RNG, which would shift every later augmentation draw (and break exact resume).
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
    it = read_loader(loader) if full else iter(())
    for c in chunks:
        if len(c):
            yield next(it).to(device, non_blocking=True)
        else:  # a data-parallel part of a short last batch: no rows for this process
            x = torch.zeros((0, *split.x.shape[1:]), dtype=split.x.dtype, device=device)
            e = torch.zeros(0, dtype=torch.int64, device=device)
            yield Batch(x, e, e.clone())


def split_from_dataset(
    dataset: Dataset,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    y_true: torch.Tensor | Sequence[int] | None = None,
    in_memory: bool = False,
    num_workers: int = DEFAULT_WORKERS,
) -> Split:
    """A `Split` over any map-style ``Dataset`` of ``(x, y)`` items, for a ``DataBundle``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style; ``dataset[i][0]`` is example i's input (a tensor or array of one shape).
    labels : tensor or sequence of int, optional
        The labels training sees. Default: ``dataset.targets`` when it has that attribute (as
        torchvision-style sets do), else ``dataset[i][1]`` read once with the loader workers.
    y_true : tensor or sequence of int, optional
        Clean labels, where known (enables the noise mask ``split.noisy``).
    in_memory : bool, default False
        Read every input into one tensor now (the fast path for a set that fits in memory);
        otherwise inputs are read on demand, by `num_workers` loader processes, each epoch.
    num_workers : int, default 2
        Loader processes for reading the inputs.

    Returns
    -------
    Split
        ``origin`` = ``arange(len(dataset))``; ``x`` a tensor (`in_memory`) or ``DatasetExamples``.

    Example
    -------
    >>> ds = torch.utils.data.TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    >>> split = split_from_dataset(ds)
    >>> split.streaming, len(split)
    (True, 50)
    """
    x = DatasetExamples(dataset, num_workers)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        loader = DataLoader(
            IndexedDataset(dataset),
            batch_size=256,
            num_workers=num_workers if len(x) > 256 else 0,
            collate_fn=_labels_of,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        )
        labels = [v for chunk in loader for v in chunk]
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    yt = None if y_true is None else torch.as_tensor(y_true, dtype=torch.int64).reshape(-1)
    return Split(x.materialize() if in_memory else x, y, torch.arange(len(y)), yt)


def _labels_of(items: Sequence[tuple[Any, ...]]) -> list[int]:
    # Module level, not a lambda: a loader started with "spawn" pickles its collate function.
    return [int(it[1]) for it in items]
