"""DataConfig.validate: every bad field is an LFMError that names the field and the fix."""

import pytest

from lfm.data import DataConfig
from lfm.errors import LFMError


def test_defaults_are_valid():
    assert DataConfig().validate() == DataConfig()


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"dataset": "imagenet"}, ["dataset", "digits"]),
        ({"dataset": "cifar10"}, ["root", "--data-root"]),
        ({"val_per_class": -1}, ["val_per_class", "--val-per-class"]),
        ({"val_per_class": True}, ["val_per_class"]),
        ({"val_per_class": 2.5}, ["val_per_class"]),
        ({"val_fraction": 1.0}, ["val_fraction"]),
        ({"val_fraction": 0.5}, ["val_per_class", "val_fraction"]),  # both set: ambiguous
        ({"imbalance": 0.5}, ["imbalance", "--imbalance"]),
        ({"imbalance": float("nan")}, ["imbalance"]),
        ({"imbalance_convention": "ldam"}, ["imbalance_convention", "mwnet"]),
        ({"noise": "flip:1.5"}, ["outside [0, 1]"]),
        ({"noise": "gaussian:0.2"}, ["noise spec", "uniform:0.4"]),
        ({"noise": 0.4}, ["noise"]),
        ({"seed": "zero"}, ["seed"]),
        ({"test_fraction": 0.0}, ["test_fraction"]),
        ({"mnist1d_samples": 10}, ["mnist1d_samples"]),
        ({"image_size": 0}, ["image_size"]),
        ({"augment": "yes"}, ["augment"]),
        ({"label_from": "csv"}, ["label_from", "filename"]),
    ],
)
def test_bad_field_is_named(changes, words):
    with pytest.raises(LFMError) as e:
        DataConfig(**changes).validate()
    for w in words:
        assert w in str(e.value)


def test_val_fraction_alone_is_fine():
    DataConfig(val_per_class=0, val_fraction=0.5).validate()
