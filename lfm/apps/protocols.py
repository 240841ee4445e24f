"""Named experiment protocols: the paper's data-reweighting settings and small CPU ones.

Each protocol is a partial RunConfig (a nested dict), applied before a YAML file and the
flags, so `lfm dr --protocol paper-cifar-lt --data-root ~/data` runs Table VI's setting
unchanged on a GPU, and `--imbalance 200` still overrides what the protocol set.
"""

from __future__ import annotations

from typing import Any

from lfm.errors import LFMError

_PAPER_OPTIM = {  # Tables VI-VIII: SGD 0.1, momentum 0.9, wd 5e-4, /10 at epochs 80 and 90
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (80, 90),
    "gamma": 0.1,
}

PROTOCOLS: dict[str, dict[str, Any]] = {
    # The built-in default: digits with both kinds of corruption, small enough for a laptop.
    "default": {
        "data": {"dataset": "digits", "noise": "flip:0.4", "imbalance": 5, "val_per_class": 10},
        "model": {"name": "mlp"},
        "epochs": 30,
        "batch_size": 100,
    },
    # SPEC.md section 4: MNIST-1D, the 1-D CNN, SGD momentum 0.9 lr 0.05 cosine, ~4000 steps.
    "cpu-mnist1d": {
        "data": {"dataset": "mnist1d", "mnist1d_samples": 20000, "val_per_class": 10},
        "model": {"name": "cnn1d"},
        "optim": {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
        },
        "epochs": 25,
        "batch_size": 100,
    },
    # Table VI: long-tailed CIFAR-10/100, ResNet-32, 100 epochs; 10 meta images per class (MW-Net).
    "paper-cifar-lt": {
        "data": {
            "dataset": "cifar10",
            "imbalance": 100,
            "val_per_class": 10,
            "imbalance_convention": "mwnet",
        },
        "model": {"name": "resnet32"},
        "optim": _PAPER_OPTIM,
        "epochs": 100,
        "batch_size": 100,
    },
    # Table VII: flip noise, ResNet-32; 1000 clean meta images (100 per class), as MW-Net.
    "paper-cifar-flip": {
        "data": {"dataset": "cifar10", "noise": "flip:0.4", "val_per_class": 100},
        "model": {"name": "resnet32"},
        "optim": _PAPER_OPTIM,
        "epochs": 100,
        "batch_size": 100,
    },
    # Table VIII: uniform noise, WRN-28-10; 1000 clean meta images.
    "paper-cifar-uniform": {
        "data": {"dataset": "cifar10", "noise": "uniform:0.4", "val_per_class": 100},
        "model": {"name": "wrn28_10"},
        "optim": _PAPER_OPTIM,
        "epochs": 100,
        "batch_size": 100,
    },
    # Table IX: ANIMAL-10N (given out on request) as an image folder, VGG-19-BN.
    "paper-animal10n": {
        "data": {
            "dataset": "imagefolder",
            "label_from": "filename",
            "image_size": 64,
            "val_per_class": 100,
        },
        "model": {"name": "vgg19_bn"},
        "optim": _PAPER_OPTIM,
        "epochs": 100,
        "batch_size": 100,
    },
}


def protocol(name: str) -> dict[str, Any]:
    """A deep copy of protocol `name`."""
    import copy

    if name not in PROTOCOLS:
        raise LFMError(f"unknown protocol {name!r}", f"choose one of: {', '.join(PROTOCOLS)}")
    return copy.deepcopy(PROTOCOLS[name])
