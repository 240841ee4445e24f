"""What data a run uses: one dataclass, validated before anything is loaded.

Defaults follow the paper's data-reweighting protocol as Meta-Weight-Net runs it
(a clean, balanced meta set of a few images per class taken out of train before
imbalance and noise are applied) and SPEC.md section 4 (MNIST-1D, 20000 samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from lfm.errors import LFMError, shown

IMBALANCE_CONVENTIONS = ("mwnet", "cb")
LABEL_SOURCES = ("folder", "filename")
NEEDS_ROOT = ("cifar10", "cifar100", "imagefolder")


def flag(field_name: str) -> str:
    """The command-line flag a user types for a DataConfig field (used in error messages)."""
    return "--data-root" if field_name == "root" else "--" + field_name.replace("_", "-")


@dataclass
class DataConfig:
    """Which data set, how the clean validation set is taken, and how train is corrupted."""

    # digits ships with scikit-learn: the one set every machine has, offline and instant.
    dataset: str = "digits"
    # No default path: CIFAR and image folders live wherever the user put them (no downloads).
    root: str | None = None
    # Meta-Weight-Net's clean meta set is 10 images per class, taken before imbalance and noise.
    val_per_class: int = 10
    # 0 = off; 0.5 is the paper's NAS protocol (25k train / 25k val of CIFAR's 50k).
    val_fraction: float = 0.0
    # 0 = none. A second clean set per class, taken out of train after the validation set and
    # used by nothing during training (no method, no meta-step sees it): choosing among methods
    # on it does not reward the methods that fit the clean validation set (issue 13).
    select_per_class: int = 0
    # 1 = balanced; the paper sweeps 200/100/50/20/10/1 (Table VI).
    imbalance: float = 1.0
    # mwnet reproduces the Meta-Weight-Net per-class counts the paper's Table VI compares with.
    imbalance_convention: str = "mwnet"
    # Clean by default; corruption is always an explicit choice (see lfm.data.noise).
    noise: str = "none"
    # One seed for every split, subsample and noise draw, so a run is reproducible from its config.
    seed: int = 0
    # Only for sets without a standard test split; 0.3 keeps ~540 digits for a stable test accuracy.
    test_fraction: float = 0.3
    # SPEC.md section 4: 20000 samples = 16000 train / 4000 test, the discriminating CPU protocol.
    mnist1d_samples: int = 20000
    # CIFAR's size, so image-folder sets can use the same networks unchanged.
    image_size: int = 32
    # The standard CIFAR training augmentation (pad-4 crop + flip) every compared method uses.
    augment: bool = True
    # Class-per-subfolder is the common layout; "filename" reads ANIMAL-10N's `3_00123.jpg`.
    label_from: str = "folder"
    # An image folder whose decoded images (N x 3 x S x S bytes) exceed this many MiB is read
    # from disk batch by batch instead of loaded whole; 2 GiB keeps CIFAR-sized sets in memory
    # (the fast path) and streams Clothing1M-sized ones. 0 streams every folder.
    memory_budget_mb: float = 2048.0
    # Loader processes that decode a streamed folder (ignored in memory); 0 = in the main process.
    loader_workers: int = 2

    def validate(self) -> DataConfig:
        """Check every field; raise LFMError naming the first bad one. Returns self."""
        from lfm.data.build import DATASETS  # late: the registry imports this module
        from lfm.data.noise import parse_noise

        if not isinstance(self.dataset, str) or self.dataset not in DATASETS:
            raise LFMError(
                f"unknown dataset {shown(self.dataset)}",
                f"pass {flag('dataset')} one of: {', '.join(DATASETS.names())}",
            )
        if self.dataset in NEEDS_ROOT and not self.root:
            raise LFMError(
                f"dataset {self.dataset!r} is read from a local folder but no root was given",
                f"pass {flag('root')} PATH (nothing is downloaded)",
            )
        _int(self, "val_per_class", lo=0)
        _int(self, "select_per_class", lo=0)
        _float(self, "val_fraction", lo=0.0, hi=1.0, hi_open=True)
        if self.val_fraction > 0 and self.val_per_class > 0:
            raise LFMError(
                f"both val_per_class={self.val_per_class} and val_fraction={self.val_fraction} "
                "were given; the validation set is one or the other",
                f"set {flag('val_per_class')} 0 to use a fraction, or {flag('val_fraction')} 0",
            )
        _float(self, "imbalance", lo=1.0)
        _choice(self, "imbalance_convention", IMBALANCE_CONVENTIONS)
        if not isinstance(self.noise, str):
            raise LFMError(
                f"noise must be a string, got {shown(self.noise)}", "e.g. --noise flip:0.4"
            )
        parse_noise(self.noise)
        _int(self, "seed")
        _float(self, "test_fraction", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _int(self, "mnist1d_samples", lo=100)
        _int(self, "image_size", lo=1)
        if not isinstance(self.augment, bool):
            raise LFMError(
                f"augment must be true or false, got {shown(self.augment)}", "write true or false"
            )
        _choice(self, "label_from", LABEL_SOURCES)
        _float(self, "memory_budget_mb", lo=0.0)
        _int(self, "loader_workers", lo=0)
        return self

    def to_dict(self) -> dict:
        """Plain dict of the fields (for run records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _int(cfg: DataConfig, name: str, lo: int | None = None) -> None:
    v = getattr(cfg, name)
    # bool is an int in python; a `True` here is a typo, not a count.
    if isinstance(v, bool) or not isinstance(v, int):
        raise LFMError(f"{name} must be an integer, got {shown(v)}", f"pass {flag(name)} N")
    if lo is not None and v < lo:
        raise LFMError(f"{name} must be >= {lo}, got {v}", f"pass {flag(name)} {lo} or more")


def _float(
    cfg: DataConfig,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise LFMError(f"{name} must be a finite number, got {shown(v)}", f"pass {flag(name)} X")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        raise LFMError(f"{name} must be in {rng}, got {v}", f"pass {flag(name)} within {rng}")


def _choice(cfg: DataConfig, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise LFMError(
            f"unknown {name} {shown(v)}", f"pass {flag(name)} one of: {', '.join(choices)}"
        )
