"""Labelled sets and the batches drawn from them.

Most data sets here fit in memory (CIFAR-10 is 150 MB as uint8), so a split is a few tensors
and a batch is an index into them: no loader workers, and augmentation runs on batched tensors
on the training device. A split too large for memory (an image folder over
``DataConfig.memory_budget_mb``) holds its inputs as ``lfm.data.lazy.LazyExamples`` instead:
labels and indices stay tensors, and `iterate_batches` reads the inputs through a
``torch.utils.data.DataLoader`` with loader workers, in the same order. A `Split` is itself a
map-style ``Dataset`` of ``(x, y)`` items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from lfm.data.lazy import LazyExamples, concat, take


@dataclass
class Split(Dataset):
    """One labelled set: inputs, (possibly noisy) labels, and where each example came from.

    A map-style ``torch.utils.data.Dataset``: ``split[i]`` is ``(x_i, y_i)``, so any split (the
    built-in sets' too) goes into a ``DataLoader``; wrap it in ``lfm.data.IndexedDataset`` to get
    each example's position as well. ``x`` is a tensor, or ``LazyExamples`` read on demand
    (``streaming``).

    Example
    -------
    >>> s = Split(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.arange(4))
    >>> x0, y0 = s[0]
    """

    x: torch.Tensor | LazyExamples  # (N, ...) float32, or uint8 images (N, C, H, W)
    y: torch.Tensor  # (N,) int64, the labels training sees (noise injected here)
    origin: torch.Tensor  # (N,) int64, index of each example in the source data set
    y_true: torch.Tensor | None = None  # (N,) int64 clean labels, where known

    def __post_init__(self):
        n = len(self.x)
        if len(self.y) != n or len(self.origin) != n:
            raise ValueError(
                f"split sizes differ: x {n}, y {len(self.y)}, origin {len(self.origin)}"
            )
        if self.y_true is not None and len(self.y_true) != n:
            raise ValueError(f"split sizes differ: x {n}, y_true {len(self.y_true)}")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_i, y_i)``: example ``i``'s input (read from disk when streaming) and label."""
        return self.x[i], self.y[i]

    @property
    def streaming(self) -> bool:
        """True when the inputs are read on demand (LazyExamples), not held as a tensor."""
        return isinstance(self.x, LazyExamples)

    @property
    def noisy(self) -> torch.Tensor | None:
        """(N,) bool: which labels were changed by noise injection (None if unknown)."""
        return None if self.y_true is None else self.y != self.y_true

    def subset(self, idx: torch.Tensor) -> Split:
        """The examples at positions `idx`, keeping their origin and clean labels."""
        return Split(
            take(self.x, idx),  # a streaming split's subset stays on disk
            self.y[idx],
            self.origin[idx],
            None if self.y_true is None else self.y_true[idx],
        )

    def class_counts(self, num_classes: int) -> list[int]:
        """Examples per (given) label."""
        return torch.bincount(self.y, minlength=num_classes).tolist()

    @staticmethod
    def concat(a: Split, b: Split) -> Split:
        """Two splits as one (e.g. train + clean validation)."""
        yt = None if a.y_true is None or b.y_true is None else torch.cat([a.y_true, b.y_true])
        return Split(concat(a.x, b.x), torch.cat([a.y, b.y]), torch.cat([a.origin, b.origin]), yt)


@dataclass
class DataBundle:
    """Train / validation / test splits of one task, plus how to prepare a batch for a model."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # per example, as the model sees it, e.g. (3, 32, 32) or (40,)
    train: Split
    val: Split
    test: Split
    # Maps a raw batch (on device) to model input; `train=True` adds augmentation.
    prepare: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    info: dict = field(default_factory=dict)  # how it was built: imbalance, noise, counts
    # Clean examples no method trains or meta-trains on (`DataConfig.select_per_class`), for
    # choosing among methods; None when not asked for.
    select: Split | None = None

    def inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Raw stored examples -> float model input (normalised, augmented when training)."""
        if self.prepare is not None:
            return self.prepare(x, train)
        # the default dtype is the model's (float32, or float64 under torch.set_default_dtype)
        return x.to(torch.get_default_dtype())


@dataclass
class Batch:
    """A batch on the training device; `idx` is each example's position in its split.

    Under data parallelism a batch is one rank's part of a global batch: `whole` holds the
    global batch's positions and `offset` where this part starts in it (`lfm.train.distributed`).
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    whole: torch.Tensor | None = None  # the global batch's idx, when this is a part of it
    offset: int = 0  # this part's first row in the global batch

    def __len__(self) -> int:
        return len(self.y)

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (a DataLoader with ``pin_memory=True`` calls this)."""
        return Batch(
            self.x.pin_memory(),
            self.y.pin_memory(),
            self.idx.pin_memory(),
            None if self.whole is None else self.whole.pin_memory(),
            self.offset,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device`."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        whole = None if self.whole is None else mv(self.whole)
        return Batch(mv(self.x), mv(self.y), mv(self.idx), whole, self.offset)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The example order of one epoch, a pure function of (seed, epoch) so that resume is exact."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def part_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, size) of process `rank`'s contiguous part of `n` rows (``torch.tensor_split``)."""
    q, extra = divmod(n, world)
    return rank * q + min(rank, extra), q + (1 if rank < extra else 0)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    drop_last: bool = False,
    part: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """Batches of one epoch, starting at batch `start` (for resuming mid-epoch).

    The order is `epoch_order(len(split), seed, epoch, shuffle)` for in-memory and streaming
    splits alike; a streaming split's batches are read by a DataLoader with the split's
    ``x.num_workers`` loader processes (pinned memory when `device` is CUDA), so a run gives the
    same batches, and resumes at the same one, whichever way its data are held.

    ``part=(world, rank)`` (data parallel) yields process `rank`'s contiguous part of each batch,
    with ``whole`` (the batch's positions) and ``offset`` set as ``lfm.train.distributed.shard``
    sets them; only that part is gathered, or read from disk.
    """
    order = epoch_order(len(split), seed, epoch, shuffle)
    n = len(order)
    stop = n - (n % batch_size) if drop_last else n
    chunks = [order[s : s + batch_size] for s in range(start * batch_size, stop, batch_size)]
    offsets = [0] * len(chunks)
    if part is not None:
        bounds = [part_bounds(len(c), part[0], part[1]) for c in chunks]
        offsets = [off for off, _ in bounds]
        wholes = chunks
        chunks = [c[off : off + size] for c, (off, size) in zip(chunks, bounds, strict=True)]
    if split.streaming:
        from lfm.data.loader import loader_batches  # late: the loader module imports this one

        batches = loader_batches(split, chunks, device, seed, epoch)
    else:
        batches = (
            Batch(
                split.x[idx].to(device, non_blocking=True),
                split.y[idx].to(device, non_blocking=True),
                idx.to(device, non_blocking=True),
            )
            for idx in chunks
        )
    for i, b in enumerate(batches):
        if part is not None:
            b.whole, b.offset = wholes[i].to(device, non_blocking=True), offsets[i]
        yield b


class Stream:
    """An endless, resumable stream of batches over epochs (e.g. the validation iterator)."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = True,
    ):
        if len(split) == 0:
            raise ValueError("cannot stream batches from an empty split")
        self.split, self.batch_size, self.device, self.seed = split, batch_size, device, seed
        self.drop_last = drop_last and len(split) >= batch_size
        self.epoch, self.step = 0, 0
        self._it: Iterator[Batch] | None = None

    def batches_per_epoch(self) -> int:
        """Batches in one pass over the split."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Batch:
        if self.step >= self.batches_per_epoch():
            self.epoch, self.step, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._it = iterate_batches(
                self.split,
                self.batch_size,
                device=self.device,
                seed=self.seed,
                epoch=self.epoch,
                start=self.step,
                drop_last=self.drop_last,
            )
        self.step += 1
        return next(self._it)

    def state_dict(self) -> dict:
        """Where the stream stands, for checkpoints."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.epoch, self.step, self._it = int(state["epoch"]), int(state["step"]), None
