"""build_data: order of operations, clean val/test, origins, determinism, info, errors."""

import random

import numpy as np
import pytest
import torch

from lfm.data import DATASETS, DataConfig, RawData, build_data
from lfm.data.builtin import mnist1d_arrays
from lfm.errors import LFMError


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # Keep generated MNIST-1D out of the user's ~/.cache during tests.
    monkeypatch.setenv("LFM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lfm-cache"))


def test_digits_default():
    b = build_data(DataConfig())
    assert b.name == "digits" and b.num_classes == 10 and b.input_shape == (1, 8, 8)
    assert b.train.x.shape[1:] == (1, 8, 8) and b.train.x.dtype == torch.float32
    assert 0.0 <= float(b.train.x.min()) and float(b.train.x.max()) <= 1.0
    assert b.val.class_counts(10) == [10] * 10
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    from sklearn.datasets import load_digits

    src = torch.from_numpy(load_digits().images.astype(np.float32) / 16).unsqueeze(1)
    for s in (b.train, b.val, b.test):
        assert torch.equal(s.x, src[s.origin])  # origin indexes load_digits() for every split
    origins = [set(s.origin.tolist()) for s in (b.train, b.val, b.test)]
    assert not (origins[0] & origins[1] or origins[0] & origins[2] or origins[1] & origins[2])
    assert b.inputs(b.train.x[:3]).dtype == torch.float32
    assert b.info["sizes"] == {"train": len(b.train), "val": 100, "test": len(b.test)}


def test_noise_only_in_train_and_recorded():
    b = build_data(DataConfig(noise="uniform-exact:0.4", seed=3))
    assert b.info["noise_rate"] == pytest.approx(b.train.noisy.float().mean().item())
    assert b.info["noise_rate"] == pytest.approx(0.4, abs=1 / len(b.train))
    assert not b.val.noisy.any() and not b.test.noisy.any()
    from sklearn.datasets import load_digits

    target = torch.from_numpy(load_digits().target)
    assert torch.equal(b.train.y_true, target[b.train.origin])  # y_true: the clean labels
    assert b.info["noise"] == "uniform-exact:0.4" and b.info["seed"] == 3


def test_deterministic_and_seeded():
    a, b = build_data(DataConfig(noise="flip:0.3")), build_data(DataConfig(noise="flip:0.3"))
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(s.origin, t.origin) and torch.equal(s.y, t.y)
    c = build_data(DataConfig(noise="flip:0.3", seed=1))
    assert not torch.equal(a.val.origin, c.val.origin)
    # Each step draws from its own seed: changing the noise leaves the validation set alone.
    d = build_data(DataConfig(noise="uniform:0.5"))
    assert torch.equal(a.val.origin, d.val.origin) and torch.equal(a.train.origin, d.train.origin)


def test_val_fraction():
    b = build_data(DataConfig(val_per_class=0, val_fraction=0.5))
    n = len(b.train) + len(b.val)
    assert len(b.val) == round(0.5 * n)
    assert b.info["val_per_class"] == 0 and b.info["val_fraction"] == 0.5


def test_no_val_set():
    b = build_data(DataConfig(val_per_class=0))
    assert len(b.val) == 0 and len(b.train) + len(b.test) == 1797


def test_val_per_class_too_large():
    with pytest.raises(LFMError) as e:
        build_data(DataConfig(val_per_class=500))
    assert "class" in str(e.value) and "--val-per-class" in str(e.value)


def test_imbalance_on_digits_uses_smallest_class():
    b = build_data(DataConfig(imbalance=10))
    counts = b.info["train_class_counts"]
    assert counts[0] == b.info["img_max"] and counts[-1] == int(b.info["img_max"] / 10)
    assert counts == sorted(counts, reverse=True) and b.val.class_counts(10) == [10] * 10


def _synthetic(cfg: DataConfig) -> RawData:
    """A CIFAR-10-shaped label set (5000 per class) with 1-pixel images: no files needed."""
    y = torch.arange(10).repeat(5000)
    yt = torch.arange(10).repeat(10)
    x, xt = torch.zeros(len(y), 1), torch.zeros(len(yt), 1)
    return RawData("synthetic", 10, (1,), x, y, xt, yt, torch.arange(len(y)), torch.arange(100))


def test_mwnet_profile_end_to_end(monkeypatch):
    monkeypatch.setitem(DATASETS._items, "synthetic", _synthetic)
    b = build_data(DataConfig("synthetic", imbalance=100, noise="flip:0.2"))
    expected = [4990, 2991, 1793, 1075, 644, 386, 231, 138, 83, 49]
    assert b.info["train_class_counts"] == expected and b.info["img_max"] == 4990
    assert b.val.class_counts(10) == [10] * 10
    assert not set(b.val.origin.tolist()) & set(b.train.origin.tolist())
    cb = build_data(DataConfig("synthetic", imbalance=100, imbalance_convention="cb"))
    assert cb.info["train_class_counts"][0] == 4990 and cb.info["train_class_counts"][-1] == 50


def test_mnist1d_small_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE_DIR", str(tmp_path))
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    b = build_data(DataConfig("mnist1d", mnist1d_samples=1000, noise="flip:0.4"))
    # make_dataset reseeds the global RNGs; loading data must not change them.
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)
    assert b.input_shape == (1, 40) and b.train.x.shape[1:] == (1, 40)
    assert (len(b.train), len(b.val), len(b.test)) == (700, 100, 200)
    assert (tmp_path / "mnist1d_1000.npz").is_file()
    x, y, xt, yt = mnist1d_arrays(1000)
    assert np.array_equal(b.train.x[:, 0].numpy(), x[b.train.origin.numpy()])
    assert np.array_equal(b.test.y.numpy(), yt)
    # A fresh process reads the file instead of regenerating: same arrays.
    from lfm.data import builtin

    builtin._mnist1d_cached.cache_clear()
    x2, *_ = mnist1d_arrays(1000)
    assert np.array_equal(x, x2)
    # A damaged cache file is regenerated, not an error.
    (tmp_path / "mnist1d_1000.npz").write_bytes(b"PK\x03\x04 truncated")
    builtin._mnist1d_cached.cache_clear()
    assert np.array_equal(mnist1d_arrays(1000)[0], x)


def test_unknown_dataset_lists_choices():
    with pytest.raises(LFMError, match="digits"):
        build_data(DataConfig("svhn"))
