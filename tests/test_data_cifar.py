"""CIFAR reader: real file format round trip, refusal of code-running pickles, clear errors."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm.data import DataConfig, build_data, load_cifar, read_cifar_batch, safe_load_pickle
from lfm.errors import LFMError

PER_BATCH = 40  # 5 batches x 40 = 200 train images, 20 per class: enough for 10 per class of val


def _batch(n: int, start: int, num_classes: int, label_key: bytes) -> dict:
    # Pixel 0 of each image holds its global index, so the reader's ordering can be checked.
    g = np.random.default_rng(start)
    data = g.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(start, start + n) % 256
    labels = [(start + i) % num_classes for i in range(n)]
    return {b"batch_label": b"fake", label_key: labels, b"data": data}


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol the original files use


def make_fake_cifar10(root: Path, n_test: int = 30) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(5):
        _dump(_batch(PER_BATCH, i * PER_BATCH, 10, b"labels"), d / f"data_batch_{i + 1}")
    _dump(_batch(n_test, 10_000, 10, b"labels"), d / "test_batch")
    _dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, d / "batches.meta")
    return d


def test_round_trip_cifar10(tmp_path):
    d = make_fake_cifar10(tmp_path)
    x, y, xt, yt, names = load_cifar(tmp_path, 10)
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.uint8 and xt.shape == (30, 3, 32, 32)
    assert y.tolist() == [i % 10 for i in range(200)] and names == [f"c{i}" for i in range(10)]
    raw = _batch(PER_BATCH, 2 * PER_BATCH, 10, b"labels")[b"data"]
    assert np.array_equal(x[80:120].reshape(40, -1), raw)  # batch 3, in order, CHW layout
    assert np.array_equal(load_cifar(d, 10)[0], x)  # the batches folder itself also works


def test_build_data_on_fake_cifar10(tmp_path):
    make_fake_cifar10(tmp_path)
    b = build_data(DataConfig("cifar10", root=str(tmp_path), noise="flip:0.5", seed=1))
    assert b.input_shape == (3, 32, 32) and b.train.x.dtype == torch.uint8
    assert len(b.val) == 100 and len(b.train) == 100 and len(b.test) == 30
    x_src = load_cifar(tmp_path, 10)[0]
    assert np.array_equal(b.train.x.numpy(), x_src[b.train.origin.numpy()])
    assert b.info["class_names"][3] == "c3"
    out = b.inputs(b.train.x[:8], train=True)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    ev = b.inputs(b.test.x[:8])
    assert abs(ev.mean().item()) < 0.5  # normalised: uniform pixels are near the CIFAR mean


def test_numpy_core_module_name_of_older_pickles_loads(tmp_path):
    path = tmp_path / "b"
    _dump(_batch(4, 0, 10, b"labels"), path)
    raw = path.read_bytes()
    if b"numpy._core.multiarray" in raw:  # written by numpy 2: rename as numpy 1 wrote it
        path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = read_cifar_batch(path)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    d = make_fake_cifar10(tmp_path)
    target = tmp_path / "pwned.txt"
    _dump({b"data": _Evil(target), b"labels": [0]}, d / "data_batch_2")
    with pytest.raises(LFMError, match="data_batch_2.*refused"):
        load_cifar(tmp_path, 10)
    assert not target.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "evil"
    _dump({b"data": eval}, path)  # builtins.eval
    with pytest.raises(LFMError, match="refused: it asks to call (__builtin__|builtins).eval"):
        safe_load_pickle(path)


def test_truncated_file(tmp_path):
    d = make_fake_cifar10(tmp_path)
    f = d / "data_batch_4"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(LFMError, match="data_batch_4.*truncated or corrupt"):
        load_cifar(tmp_path, 10)


def test_wrong_content(tmp_path):
    d = make_fake_cifar10(tmp_path)
    _dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, d / "test_batch")
    with pytest.raises(LFMError, match="test_batch.*expected uint8 \\(N, 3072\\)"):
        load_cifar(tmp_path, 10)
    _dump([1, 2, 3], d / "test_batch")
    with pytest.raises(LFMError, match="does not hold a CIFAR batch"):
        load_cifar(tmp_path, 10)


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(LFMError) as e:
        build_data(DataConfig("cifar10", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "nowhere" in msg and "--data-root" in msg and "python version" in msg
    d = make_fake_cifar10(tmp_path)
    (d / "data_batch_5").unlink()
    with pytest.raises(LFMError, match="data_batch_5.*missing"):
        load_cifar(tmp_path, 10)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = _batch(300, 0, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 300
    _dump(train, d / "train")
    _dump(_batch(100, 500, 100, b"fine_labels"), d / "test")
    _dump({b"fine_label_names": [b"n%d" % i for i in range(100)]}, d / "meta")
    b = build_data(DataConfig("cifar100", root=str(tmp_path), val_per_class=1))
    assert b.num_classes == 100 and len(b.val) == 100 and len(b.train) == 200
    assert b.info["class_names"][99] == "n99"
