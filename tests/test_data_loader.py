"""Data through torch.utils.data: the index wrapper, built-in splits as Datasets, lazy inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lfm.data import (
    Batch,
    DataConfig,
    DatasetExamples,
    IndexedDataset,
    Split,
    build_data,
    collate_batch,
    indexed_loader,
    iterate_batches,
    split_from_dataset,
)


def _tensor_set(n: int = 90) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def test_indexed_dataset_in_a_shuffling_loader_with_two_workers():
    ds = _tensor_set()
    loader = DataLoader(
        IndexedDataset(ds),
        batch_size=16,
        shuffle=True,
        num_workers=2,
        generator=torch.Generator().manual_seed(1),
    )
    seen = []
    for x, y, idx in loader:
        # Each example comes back with its own index: inputs and labels match the source rows.
        assert torch.equal(x, ds.tensors[0][idx]) and torch.equal(y, ds.tensors[1][idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(ds))) and seen != sorted(seen)  # shuffled, each once


def test_indexed_loader_yields_batches_and_collate_batch():
    ds = _tensor_set(40)
    batches = list(indexed_loader(ds, 16, num_workers=2, seed=3, pin_memory=False))
    assert all(isinstance(b, Batch) for b in batches) and [len(b) for b in batches] == [16, 16, 8]
    for b in batches:
        assert b.idx.dtype == torch.int64 and torch.equal(b.x, ds.tensors[0][b.idx])
    again = list(indexed_loader(ds, 16, num_workers=0, seed=3))
    assert [b.idx.tolist() for b in again] == [b.idx.tolist() for b in batches]  # seeded order
    b = collate_batch([(torch.zeros(2), 1, 7), (torch.ones(2), 0, 3)])
    assert b.idx.tolist() == [7, 3] and b.y.tolist() == [1, 0] and b.x.shape == (2, 2)


def test_indexed_dataset_refuses_what_is_not_map_style():
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter(range(3)))
    with pytest.raises(TypeError, match="not an \\(x, y\\) tuple"):
        IndexedDataset([1, 2, 3])[0]


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_builtin_splits_are_datasets(name):
    b = build_data(DataConfig(name, mnist1d_samples=400))
    assert isinstance(b.train, torch.utils.data.Dataset)
    x0, y0 = b.train[5]
    assert torch.equal(x0, b.train.x[5]) and int(y0) == int(b.train.y[5])
    loader = DataLoader(IndexedDataset(b.train), batch_size=64, shuffle=True, num_workers=2)
    x, y, idx = next(iter(loader))
    assert torch.equal(x, b.train.x[idx]) and torch.equal(y, b.train.y[idx])


def test_split_from_dataset_reads_on_demand_in_the_in_memory_order():
    ds = _tensor_set(70)
    lazy = split_from_dataset(ds, num_workers=2)  # labels read through the loader
    eager = split_from_dataset(ds, in_memory=True)
    assert lazy.streaming and not eager.streaming
    assert torch.equal(lazy.y, ds.tensors[1]) and lazy.x.shape == (70, 3, 4)
    kw = dict(shuffle=True, seed=4, epoch=2, start=1)
    got = list(iterate_batches(lazy, 16, **kw))
    want = list(iterate_batches(eager, 16, **kw))
    assert len(got) == len(want) == 4  # batches 1.. of 5: the resume offset holds
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.idx, w.idx) and torch.equal(g.x, w.x) and torch.equal(g.y, w.y)


def test_lazy_subset_concat_and_indexing_match_tensors():
    ds = _tensor_set(30)
    x = ds.tensors[0]
    lazy = DatasetExamples(ds, num_workers=0)
    idx = torch.tensor([4, 0, 29, 7])
    assert torch.equal(lazy[idx], x[idx]) and torch.equal(lazy[3], x[3]) and lazy.dtype == x.dtype
    sub = Split(lazy, ds.tensors[1], torch.arange(30)).subset(idx)
    assert sub.streaming and torch.equal(sub.x[torch.arange(4)], x[idx])
    assert torch.equal(sub.subset(torch.tensor([2])).x[0], x[29])  # a subset of a subset
    both = Split.concat(sub, Split(x[:2], ds.tensors[1][:2], torch.arange(2)))
    assert both.streaming and torch.equal(both.x.materialize(), torch.cat([x[idx], x[:2]]))
    with pytest.raises(IndexError):
        lazy[30]


@pytest.mark.parametrize("streaming", [False, True])
def test_data_parallel_parts_are_the_shards_of_each_batch(streaming):
    """`part=(world, rank)` gives what lfm.train.distributed.shard cuts from the whole batch."""
    from lfm.train.distributed import shard_bounds

    split = split_from_dataset(_tensor_set(50), in_memory=not streaming, num_workers=0)
    whole = list(iterate_batches(split, 16, seed=2, epoch=1, start=1))
    for r in range(3):
        parts = list(iterate_batches(split, 16, seed=2, epoch=1, start=1, part=(3, r)))
        assert len(parts) == len(whole) == 3
        for p, w in zip(parts, whole, strict=True):
            off, size = shard_bounds(len(w), 3, r)
            assert (p.offset, len(p)) == (off, size) and torch.equal(p.whole, w.idx)
            assert torch.equal(p.idx, w.idx[off : off + size])
            assert torch.equal(p.x, w.x[off : off + size]) and torch.equal(
                p.y, w.y[off : off + size]
            )


def test_trainer_trains_on_a_users_dataset_read_on_demand(digits_images):
    """A TensorDataset as a streamed train split (2 loader workers) = the same data in memory."""
    from lfm.config import ModelConfig, RunConfig
    from lfm.data import DataBundle
    from lfm.train.trainer import Trainer

    ref = digits_images(300, 50)
    ds = TensorDataset(ref.train.x, ref.train.y)
    results = []
    for in_memory in (False, True):
        train = split_from_dataset(ds, in_memory=in_memory, num_workers=2)
        bundle = DataBundle("mine", 10, (1, 8, 8), train, ref.val, ref.test)
        cfg = RunConfig(method="ce", model=ModelConfig("mlp"), epochs=2, batch_size=64)
        cfg.progress, cfg.device = False, "cpu"
        results.append(Trainer(cfg, bundle=bundle).run()["history"])
    assert results[0] == results[1]
