"""CIFAR-10 / CIFAR-100 from a local folder in the standard "python version" format.

The files are pickles, and unpickling runs whatever callables a file names. We read them with
a restricted unpickler that resolves only the few numpy globals needed to rebuild an array
(plus a latin-1-only `_codecs.encode`, which python 3 writes for bytes in protocol-2 pickles),
so a tampered file cannot run code: it is refused with an LFMError naming the file.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html):
- CIFAR-10: ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``;
  each batch is a dict with ``b"data"`` uint8 (10000, 3072) and ``b"labels"`` (list of int).
- CIFAR-100: ``cifar-100-python/train``, ``test``, ``meta``; ``b"fine_labels"`` are used.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfm.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImagePrepare
from lfm.data.builtin import DATASETS, RawData
from lfm.data.config import DataConfig
from lfm.errors import LFMError

try:  # numpy >= 2 moved the array internals to numpy._core; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct

_DOWNLOAD_FIX = (
    "on a machine with internet, download the '{title} python version' ({tar}) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass --data-root the folder "
    "that contains {folder} (or that folder itself)"
)


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); allow that only.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode refused for encoding {encoding!r}")
    return obj.encode("latin1", errors)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except numpy's array-reconstruction helpers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allow-listed (module, name) pairs; never import anything."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR file (bytes keys, as python 2 wrote it) without running foreign code."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LFMError(
            f"cannot read CIFAR file {str(p)!r}: {e.strerror}", "check the path"
        ) from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise LFMError(
            f"CIFAR file {str(p)!r} was refused: it asks to call {e}, as no CIFAR file does",
            "the file is not an original CIFAR batch; replace it with a fresh download",
        ) from None
    except Exception as e:  # truncated or garbled pickles raise many types; all mean "bad file"
        raise LFMError(
            f"CIFAR file {str(p)!r} is truncated or corrupt ({type(e).__name__}: {e})",
            "re-extract or re-download the CIFAR archive",
        ) from None


def read_cifar_batch(
    path: str | Path, label_key: bytes = b"labels"
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (x uint8 (N, 3, 32, 32), y int64 (N,)), checked for shape."""
    d = safe_load_pickle(path)
    bad = f"CIFAR file {str(path)!r} does not hold a CIFAR batch"
    fix = "re-extract or re-download the CIFAR archive"
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise LFMError(f"{bad} (expected keys b'data' and {label_key!r}, found {keys})", fix)
    x, y = d[b"data"], d[label_key]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise LFMError(f"{bad} (b'data' is {desc}, expected uint8 (N, 3072))", fix)
    try:
        y = np.asarray(y, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise LFMError(f"{bad} ({label_key!r} is not a list of integers)", fix) from None
    if len(y) != len(x):
        raise LFMError(f"{bad} ({len(x)} images but {len(y)} labels)", fix)
    # CIFAR stores each image as 1024 red, then green, then blue values, each row-major 32 x 32.
    return x.reshape(-1, 3, 32, 32), y


_LAYOUT = {
    10: dict(
        folder="cifar-10-batches-py",
        title="CIFAR-10",
        tar="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        names_key=b"label_names",
        label_key=b"labels",
    ),
    100: dict(
        folder="cifar-100-python",
        title="CIFAR-100",
        tar="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        names_key=b"fine_label_names",
        label_key=b"fine_labels",
    ),
}


def find_cifar_dir(root: str | Path, num_classes: int = 10) -> Path:
    """The folder holding the batch files: root/<cifar folder> or root itself; else LFMError."""
    lay = _LAYOUT[num_classes]
    root = Path(root).expanduser()
    candidates = [root / lay["folder"], root]
    for c in candidates:
        if (c / lay["train"][0]).is_file():
            return c
    looked = " and ".join(repr(str(c / lay["train"][0])) for c in candidates)
    raise LFMError(
        f"no {lay['title']} files found: looked for {looked}",
        _DOWNLOAD_FIX.format(title=lay["title"], tar=lay["tar"], folder=lay["folder"]),
    )


def load_cifar(
    root: str | Path, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """(x_train, y_train, x_test, y_test, class_names) of CIFAR-10 or -100 from a local folder."""
    if num_classes not in _LAYOUT:
        raise LFMError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    lay = _LAYOUT[num_classes]
    d = find_cifar_dir(root, num_classes)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The named batch files of this folder, concatenated in order."""
        parts = []
        for name in names:
            if not (d / name).is_file():
                raise LFMError(
                    f"{lay['title']} file {str(d / name)!r} is missing",
                    _DOWNLOAD_FIX.format(title=lay["title"], tar=lay["tar"], folder=lay["folder"]),
                )
            parts.append(read_cifar_batch(d / name, lay["label_key"]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x, y = read(lay["train"])
    xt, yt = read(lay["test"])
    for split, labels in (("train", y), ("test", yt)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise LFMError(
                f"{lay['title']} {split} labels outside [0, {num_classes}) in {str(d)!r}",
                "check that the folder holds the right CIFAR version",
            )
    return x, y, xt, yt, _class_names(d / lay["meta"], lay["names_key"], num_classes)


def _class_names(path: Path, key: bytes, num_classes: int) -> list[str] | None:
    # Names are a nicety for reports: a missing or odd meta file is not worth failing a run.
    if not path.is_file():
        return None
    try:
        names = safe_load_pickle(path)[key]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (LFMError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return names if len(names) == num_classes else None


def _cifar_raw(cfg: DataConfig, num_classes: int) -> RawData:
    if not cfg.root:
        raise LFMError(
            f"cifar{num_classes} is read from a local folder but no root was given",
            "pass --data-root PATH (nothing is downloaded)",
        )
    x, y, xt, yt, names = load_cifar(cfg.root, num_classes)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return RawData(
        name=f"cifar{num_classes}",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        x_train=torch.from_numpy(np.ascontiguousarray(x)),  # uint8 (50000, 3, 32, 32)
        y_train=torch.from_numpy(y),
        x_test=torch.from_numpy(np.ascontiguousarray(xt)),
        y_test=torch.from_numpy(yt),
        # origin: position in data_batch_1..5 concatenated (train) and in test_batch (test).
        origin_train=torch.arange(len(y)),
        origin_test=torch.arange(len(yt)),
        prepare=ImagePrepare(mean, std, augment=cfg.augment),
        class_names=names,
        info={"root": str(find_cifar_dir(cfg.root, num_classes))},
    )


@DATASETS.register("cifar10", "CIFAR-10 from a local folder (python version), 50k/10k, 10 classes")
def load_cifar10_raw(cfg: DataConfig) -> RawData:
    """CIFAR-10 as uint8 (N, 3, 32, 32); prepare = /255, normalise, pad-4 crop + flip."""
    return _cifar_raw(cfg, 10)


@DATASETS.register("cifar100", "CIFAR-100 from a local folder (python version), fine labels")
def load_cifar100_raw(cfg: DataConfig) -> RawData:
    """CIFAR-100 (fine labels) as uint8 (N, 3, 32, 32); same prepare as CIFAR-10."""
    return _cifar_raw(cfg, 100)
