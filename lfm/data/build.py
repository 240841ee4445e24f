"""`build_data(cfg)`: the one entry point from a DataConfig to a DataBundle.

Order of operations (Meta-Weight-Net's protocol, which the paper's DR experiments follow):

1. load the source train / test sets (clean);
2. take the clean validation set out of train: ``val_per_class`` per class (balanced meta set)
   or a random ``val_fraction`` (the NAS split);
3. long-tail subsample what is left of train (``imbalance``);
4. inject label noise into train only; validation and test stay clean;
5. bundle, recording how it was built in ``bundle.info``.

A streamed source (an image folder over its memory budget, see `lfm.data.imagefolder`) goes
through the same steps: they act on labels and positions, so train and test stay on disk; the
clean validation set is small and is decoded into memory.

Each random step draws from its own seed derived from ``cfg.seed``, so changing, say, the
noise does not change which examples form the validation set.
"""

from __future__ import annotations

import math

import torch

from lfm.data import cifar, imagefolder  # noqa: F401  (registers cifar10/100 and imagefolder)
from lfm.data.builtin import DATASETS, RawData
from lfm.data.config import DataConfig
from lfm.data.lazy import in_memory, take
from lfm.data.longtail import img_max_for, longtail_counts_for, subsample_longtail
from lfm.data.noise import inject_noise, parse_noise, transition_matrix
from lfm.data.splits import derive_seed, random_fraction, take_per_class
from lfm.data.types import DataBundle, Split
from lfm.errors import LFMError

__all__ = ["DATASETS", "build_data"]


def _name_the_val_set(
    e: LFMError, cfg: DataConfig, y_src: torch.Tensor, c: int, img_max: int
) -> LFMError:
    """An empty tail class caused (partly) by the validation set says which option to change.

    Under the mwnet convention the head class keeps what the validation set left of the
    smallest class, so a large --val-per-class, not --imbalance, is often the thing to change.
    """
    if cfg.imbalance_convention != "mwnet" or (cfg.val_fraction == 0 and cfg.val_per_class == 0):
        return e  # the cb convention's head class is a constant: the validation set is not it
    smallest = int(torch.bincount(y_src, minlength=c).min())
    if cfg.val_fraction > 0:
        took = f"--val-fraction {cfg.val_fraction:g}"
        change = "a smaller --val-fraction"
    else:
        took = f"--val-per-class {cfg.val_per_class}"
        # the head class needs at least `imbalance` examples for the tail to keep one
        most = smallest - math.ceil(cfg.imbalance)
        change = f"--val-per-class {most} or less" if most >= 1 else "a smaller --val-per-class"
    return LFMError(
        f"{e.problem}: {took} left the smallest class {img_max} of its {smallest} examples",
        f"pass {change}, or an --imbalance below {img_max}",
    )


def build_data(cfg: DataConfig) -> DataBundle:
    """Load, split, subsample and corrupt a data set as `cfg` says; return a DataBundle.

    Parameters
    ----------
    cfg : DataConfig
        Which data set and how to split and corrupt it; validated first.

    Returns
    -------
    DataBundle
        ``train`` (noisy labels in ``y``, clean in ``y_true``; ``train.noisy`` is the noise mask),
        ``val`` (clean), ``test`` (clean). ``origin`` indexes the source train set for train and
        val, the source test set for test (for digits and test-less image folders, which have no
        source test set, both index the one source listing). ``info`` is JSON-friendly.

    Example
    -------
    >>> b = build_data(DataConfig("mnist1d", noise="flip:0.4", val_per_class=10))
    >>> len(b.val), b.info["noise_rate"]  # (100, ~0.4)
    """
    cfg.validate()
    spec = parse_noise(cfg.noise)
    raw: RawData = DATASETS.create(cfg.dataset, cfg)
    c = raw.num_classes
    y_src = raw.y_train

    # 2. the clean validation set, before imbalance and noise touch anything
    if cfg.val_fraction > 0:
        val_idx, rest = random_fraction(len(y_src), cfg.val_fraction, derive_seed(cfg.seed, "val"))
    else:
        val_idx, rest = take_per_class(y_src, cfg.val_per_class, derive_seed(cfg.seed, "val"), c)

    # 2b. the held-out selection set (clean, balanced), from what the validation set left
    select_idx = None
    if cfg.select_per_class > 0:
        picked, kept = take_per_class(
            y_src[rest],
            cfg.select_per_class,
            derive_seed(cfg.seed, "select"),
            c,
            flag="--select-per-class",
        )
        select_idx, rest = rest[picked], rest[kept]

    # 3. long tail on what is left
    available = torch.bincount(y_src[rest], minlength=c).tolist()
    img_max = None
    if cfg.imbalance > 1:
        if min(available) == 0:
            empty = available.index(0)
            raise LFMError(
                f"class {empty} has no training examples left after the validation set, "
                "so no long-tail profile can be drawn",
                "use a smaller --val-per-class or --val-fraction",
            )
        img_max = img_max_for(cfg.imbalance_convention, available)
        try:
            counts = longtail_counts_for(available, cfg.imbalance, cfg.imbalance_convention)
        except LFMError as e:
            raise _name_the_val_set(e, cfg, y_src, c, img_max) from None
        keep = subsample_longtail(y_src[rest], counts, derive_seed(cfg.seed, "longtail"))
        rest = rest[keep]

    # 4. noise on train labels only
    y_clean = y_src[rest]
    transition_matrix(spec, c)  # checks a matrix spec against the class count before drawing
    y_noisy = inject_noise(y_clean, c, spec, seed=derive_seed(cfg.seed, "noise"))

    train = Split(take(raw.x_train, rest), y_noisy, raw.origin_train[rest], y_clean.clone())
    yv = y_src[val_idx]
    # In memory even when train streams: the validation stream samples it every LFM step.
    xv = in_memory(take(raw.x_train, val_idx))
    val = Split(xv, yv, raw.origin_train[val_idx], yv.clone())
    test = Split(raw.x_test, raw.y_test, raw.origin_test, raw.y_test.clone())
    select = None
    if select_idx is not None:
        ys = y_src[select_idx]
        select = Split(
            in_memory(take(raw.x_train, select_idx)), ys, raw.origin_train[select_idx], ys.clone()
        )

    noisy = train.noisy
    info = {
        "dataset": raw.name,
        "num_classes": c,
        "input_shape": list(raw.input_shape),
        "sizes": {"train": len(train), "val": len(val), "test": len(test)}
        | ({} if select is None else {"select": len(select)}),
        "source_sizes": {"train": len(raw.y_train), "test": len(raw.y_test)},
        "train_class_counts": torch.bincount(y_clean, minlength=c).tolist(),
        "train_class_counts_noisy": torch.bincount(y_noisy, minlength=c).tolist(),
        "val_class_counts": torch.bincount(yv, minlength=c).tolist(),
        "test_class_counts": torch.bincount(raw.y_test, minlength=c).tolist(),
        "val_per_class": cfg.val_per_class if cfg.val_fraction == 0 else 0,
        "val_fraction": cfg.val_fraction,
        "select_per_class": cfg.select_per_class,
        "imbalance": cfg.imbalance,
        "imbalance_convention": cfg.imbalance_convention,
        "img_max": img_max,
        "noise": str(spec),
        "noise_rate": float(noisy.float().mean()) if len(train) else 0.0,
        "seed": cfg.seed,
        "streaming": train.streaming,
        "class_names": raw.class_names,
        "source": raw.info,
        "config": cfg.to_dict(),
    }
    return DataBundle(
        name=raw.name,
        num_classes=c,
        input_shape=tuple(raw.input_shape),
        train=train,
        val=val,
        test=test,
        prepare=raw.prepare,
        info=info,
        select=select,
    )
