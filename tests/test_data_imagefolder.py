"""Image folders: class subfolders, ANIMAL-10N file names, test split, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lfm.data import DataConfig, build_data
from lfm.errors import LFMError


def _png(path: Path, value: int, size=(10, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_class_subfolders_with_test(tmp_path):
    for ci, name in enumerate(["cat", "dog", "emu"]):
        for i in range(6):
            _png(tmp_path / "train" / name / f"{i}.png", 40 * ci + i)
        for i in range(2):
            _png(tmp_path / "test" / name / f"t{i}.jpg", 40 * ci)
    cfg = DataConfig("imagefolder", root=str(tmp_path), val_per_class=2, image_size=8)
    b = build_data(cfg)
    assert b.num_classes == 3 and b.input_shape == (3, 8, 8) and b.info["class_names"][2] == "emu"
    assert (len(b.train), len(b.val), len(b.test)) == (12, 6, 6)
    assert b.train.x.dtype == torch.uint8 and b.train.x.shape[1:] == (3, 8, 8)
    files = b.info["source"]["train_files"]
    # origin points at the file each image came from: pixel value encodes class and index.
    for x, o in zip(b.train.x, b.train.origin, strict=True):
        ci, i = "cat dog emu".split().index(Path(files[o]).parent.name), int(Path(files[o]).stem)
        assert int(x[0, 0, 0]) == 40 * ci + i
    assert b.inputs(b.train.x, train=True).shape == (12, 3, 8, 8)
    assert abs(b.inputs(b.train.x).mean().item()) < 0.2  # normalised with train statistics


def test_animal10n_filenames_training_testing(tmp_path):
    for label in range(4):
        for i in range(5):
            _png(tmp_path / "training" / f"{label}_{i:05d}.jpg", 10 * label)
        _png(tmp_path / "testing" / f"{label}_9{label}.jpg", 10 * label)
    cfg = DataConfig("imagefolder", root=str(tmp_path), label_from="filename", val_per_class=1)
    b = build_data(cfg)
    assert b.num_classes == 4 and (len(b.train), len(b.val), len(b.test)) == (16, 4, 4)
    assert b.test.y.tolist() == [0, 1, 2, 3]


def test_flat_class_folders_without_test_get_a_stratified_test_split(tmp_path):
    for ci in range(2):
        for i in range(10):
            _png(tmp_path / f"class{ci}" / f"{i}.png", ci * 100)
    cfg = DataConfig("imagefolder", root=str(tmp_path), val_per_class=1, test_fraction=0.3)
    b = build_data(cfg)
    assert b.test.class_counts(2) == [3, 3] and len(b.train) + len(b.val) == 14
    assert not set(b.test.origin.tolist()) & set(b.train.origin.tolist())


def test_errors(tmp_path):
    with pytest.raises(LFMError, match="does not exist"):
        build_data(DataConfig("imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "train").mkdir()
    with pytest.raises(LFMError, match="no class subfolders"):
        build_data(DataConfig("imagefolder", root=str(tmp_path)))
    _png(tmp_path / "train" / "cat.png", 0)
    with pytest.raises(LFMError, match="cannot read a label from file name 'cat.png'"):
        build_data(DataConfig("imagefolder", root=str(tmp_path), label_from="filename"))
    (tmp_path / "train" / "cat.png").unlink()
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "0_1.png").write_bytes(b"not a png")
    with pytest.raises(LFMError, match="cannot read image"):
        build_data(DataConfig("imagefolder", root=str(tmp_path)))
