"""The dataset registry and the two sets every machine has offline: digits and MNIST-1D.

A dataset factory takes a DataConfig and returns RawData: the source train and test sets,
unsplit and clean. `lfm.data.build.build_data` does everything else (validation set,
imbalance, noise), the same way for every set.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lfm.data.config import DataConfig
from lfm.data.lazy import LazyExamples
from lfm.data.splits import derive_seed, stratified_fraction
from lfm.registry import Registry


@dataclass
class RawData:
    """A source data set before any split: clean train and test examples."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    # (N, ...) float32, or uint8 images (N, C, H, W); LazyExamples for a streamed source.
    x_train: torch.Tensor | LazyExamples
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor | LazyExamples
    y_test: torch.Tensor
    # Index of each example in the source files (see build_data for what "source" means per set).
    origin_train: torch.Tensor
    origin_test: torch.Tensor
    prepare: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)


DATASETS: Registry[RawData] = Registry("dataset")


@DATASETS.register("digits", "scikit-learn's 8x8 digits (1797 images, 10 classes), offline")
def load_digits_raw(cfg: DataConfig) -> RawData:
    """scikit-learn's digits as (N, 1, 8, 8) floats in [0, 1]; test = stratified test_fraction."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    # digits has no standard test split: origin indexes load_digits() for train and test alike.
    test_idx, train_idx = stratified_fraction(y, cfg.test_fraction, derive_seed(cfg.seed, "test"))
    return RawData(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        origin_train=train_idx,
        origin_test=test_idx,
        class_names=[str(i) for i in range(10)],
    )


@DATASETS.register("mnist1d", "MNIST-1D regenerated offline by the mnist1d package (10 classes)")
def load_mnist1d_raw(cfg: DataConfig) -> RawData:
    """MNIST-1D as (N, 1, 40) floats: the package's own 80/20 train/test split, its seed 42."""
    x, y, xt, yt = mnist1d_arrays(cfg.mnist1d_samples)
    return RawData(
        name="mnist1d",
        num_classes=10,
        input_shape=(1, 40),
        x_train=torch.tensor(x).unsqueeze(1),  # (N, 1, 40); a copy: the cache is read-only
        y_train=torch.tensor(y),
        x_test=torch.tensor(xt).unsqueeze(1),
        y_test=torch.tensor(yt),
        origin_train=torch.arange(len(y)),
        origin_test=torch.arange(len(yt)),
        class_names=[str(i) for i in range(10)],
        info={"mnist1d_samples": cfg.mnist1d_samples},
    )


def cache_dir() -> Path:
    """Where generated data are cached: $LFM_CACHE_DIR, else ~/.cache/lfm."""
    env = os.environ.get("LFM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lfm"


def mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of MNIST-1D, read-only, cached on disk and in memory."""
    return _mnist1d_cached(int(num_samples), str(cache_dir()))


@functools.lru_cache(maxsize=4)
def _mnist1d_cached(num_samples: int, cache: str) -> tuple[np.ndarray, ...]:
    path = Path(cache) / f"mnist1d_{num_samples}.npz"
    version = _mnist1d_version()
    arrays = _read_npz(path, version)
    if arrays is None:
        arrays = _generate_mnist1d(num_samples)
        _write_npz_atomic(path, arrays, version)
    for a in arrays:
        a.setflags(write=False)  # shared by every caller through the cache: keep it immutable
    return arrays


def _generate_mnist1d(num_samples: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 42  # the package's seed: the standard MNIST-1D data; cfg.seed governs the rest
    # make_dataset reseeds python's and numpy's global RNGs; restore them so loading data
    # never changes what a seeded training run draws afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int64),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int64),
    )


def _mnist1d_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist1d")
    except PackageNotFoundError:
        return "unknown"


_NPZ_KEYS = ("x", "y", "x_test", "y_test")


def _read_npz(path: Path, version: str) -> tuple[np.ndarray, ...] | None:
    """The cached arrays, or None when absent, unreadable or made by another mnist1d version."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["version"]) != version:
                return None
            return tuple(z[k] for k in _NPZ_KEYS)
    except Exception:  # a missing, partial or foreign file: regenerate rather than fail
        return None


def _write_npz_atomic(path: Path, arrays: tuple[np.ndarray, ...], version: str) -> None:
    """Write via a temp file + os.replace, so a concurrent reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, version=np.array(version), **dict(zip(_NPZ_KEYS, arrays, strict=True)))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # the cache is an optimisation: a read-only home must not stop a run
