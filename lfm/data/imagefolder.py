"""Image data sets from a local folder (e.g. ANIMAL-10N, which is only given out on request).

Layouts understood (train folder first found wins: ``train/``, ``training/``, else root):

- ``label_from="folder"``: ``root/train/<class>/*.png`` (+ optional ``root/test/<class>/...``),
  or ``root/<class>/*`` with no train folder. Classes are the sorted subfolder names of train.
- ``label_from="filename"``: images anywhere under the train folder, label = leading integer
  of the file name before ``_`` (ANIMAL-10N: ``training/3_00123.jpg``, ``testing/...``).

Without a test folder (``test/`` or ``testing/``), a stratified ``test_fraction`` of train
becomes the test set. Images are converted to RGB, resized to image_size x image_size, and
stored as uint8 (N, 3, S, S); normalisation statistics come from the source train images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lfm.data.augment import ImagePrepare
from lfm.data.builtin import DATASETS, RawData
from lfm.data.config import DataConfig
from lfm.data.splits import derive_seed, stratified_fraction
from lfm.errors import LFMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TRAIN_DIRS = ("train", "training")
TEST_DIRS = ("test", "testing")


def _images_under(d: Path) -> list[Path]:
    # Sorted, so that origin indices and every seeded split are the same on every machine.
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_by_folder(
    d: Path, classes: list[str] | None = None, skip: tuple[str, ...] = ()
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of a class-per-subfolder tree; `classes` fixes the label order."""
    subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in skip)
    found = [name for name in subdirs if _images_under(d / name)]
    if classes is None:
        empty = [n for n in subdirs if n not in found and not n.startswith(".")]
        if found and empty:  # a class with no images would silently vanish from the label set
            raise LFMError(
                f"class folder(s) {', '.join(repr(n) for n in empty[:5])} in {str(d)!r} hold "
                f"no images ({', '.join(IMAGE_EXTENSIONS)})",
                "add images to every class folder, or remove the empty ones",
            )
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise LFMError(
                f"folder {str(d)!r} has classes not in the train folder: {', '.join(unknown[:5])}",
                "give test/ the same class subfolders as train/",
            )
    paths, labels = [], []
    for i, c in enumerate(classes):
        if (d / c).is_dir():
            ps = _images_under(d / c)
            paths += ps
            labels += [i] * len(ps)
    return paths, labels, classes


def label_from_filename(path: Path) -> int:
    """ANIMAL-10N style label: the file name's leading integer before '_' (3_00123.jpg -> 3)."""
    head = path.stem.split("_", 1)[0]
    if not head.isdigit():
        raise LFMError(
            f"cannot read a label from file name {path.name!r} (in {str(path.parent)!r}): "
            "expected a leading integer and '_', as in 3_00123.jpg",
            "rename the files, or use --label-from folder for class-per-subfolder data",
        )
    return int(head)


def list_by_filename(d: Path) -> tuple[list[Path], list[int]]:
    """(paths, labels) of every image under `d`, labels read from the file names."""
    paths = _images_under(d)
    return paths, [label_from_filename(p) for p in paths]


def load_images(paths: list[Path], size: int) -> np.ndarray:
    """Read images as RGB, resize to size x size: uint8 (N, 3, size, size)."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise LFMError(
                f"cannot read image {str(p)!r}: {e}", "remove or replace the file"
            ) from None
    return out


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


@DATASETS.register("imagefolder", "images from a local folder (class subfolders or N_*.jpg names)")
def load_imagefolder_raw(cfg: DataConfig) -> RawData:
    """An image folder as uint8 (N, 3, S, S); prepare normalises with the train set's statistics."""
    if not cfg.root:
        raise LFMError("imagefolder needs a folder", "pass --data-root PATH")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise LFMError(f"image folder {str(root)!r} {what}", "pass --data-root an existing folder")
    train_dir = _first_dir(root, TRAIN_DIRS) or root
    test_dir = _first_dir(root, TEST_DIRS)
    # With no train/ folder the root is train, and its test/ folder must not count as train.
    skip = (test_dir.name,) if test_dir is not None and train_dir == root else ()

    class_names: list[str] | None
    if cfg.label_from == "folder":
        paths, labels, class_names = list_by_folder(train_dir, skip=skip)
        if not class_names:
            raise LFMError(
                f"no class subfolders with images in {str(train_dir)!r}",
                "put images in train/<class>/ folders, or use --label-from filename",
            )
        tpaths, tlabels, _ = list_by_folder(test_dir, class_names) if test_dir else ([], [], None)
        num_classes = len(class_names)
    else:
        paths, labels = list_by_filename(train_dir)
        if skip:
            keep = [i for i, p in enumerate(paths) if not p.is_relative_to(test_dir)]
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        tpaths, tlabels = list_by_filename(test_dir) if test_dir else ([], [])
        num_classes = max(labels + tlabels, default=-1) + 1
        class_names = None
    if not paths:
        raise LFMError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(train_dir)!r}",
            "check --data-root and --label-from",
        )

    x = torch.from_numpy(load_images(paths, cfg.image_size))
    y = torch.tensor(labels, dtype=torch.int64)
    if test_dir is not None and tpaths:
        xt = torch.from_numpy(load_images(tpaths, cfg.image_size))
        yt = torch.tensor(tlabels, dtype=torch.int64)
        origin, origin_t = torch.arange(len(y)), torch.arange(len(yt))
    else:
        # No test folder: origin then indexes the sorted train listing for both train and test.
        test_idx, train_idx = stratified_fraction(
            y, cfg.test_fraction, derive_seed(cfg.seed, "test")
        )
        x, y, xt, yt = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        origin, origin_t = train_idx, test_idx

    xf = x.float() / 255.0  # statistics of the source train images, as CIFAR's are
    mean = xf.mean(dim=(0, 2, 3)).tolist()
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()  # a blank channel must not divide by 0
    return RawData(
        name="imagefolder",
        num_classes=num_classes,
        input_shape=(3, cfg.image_size, cfg.image_size),
        x_train=x,
        y_train=y,
        x_test=xt,
        y_test=yt,
        origin_train=origin,
        origin_test=origin_t,
        prepare=ImagePrepare(mean, std, augment=cfg.augment),
        class_names=class_names,
        info={
            "root": str(root),
            "train_dir": str(train_dir),
            "test_dir": str(test_dir) if test_dir else None,
            # Source file of every origin index, so flagged examples can be found on disk.
            "train_files": [str(p.relative_to(root)) for p in paths],
            "test_files": [str(p.relative_to(root)) for p in tpaths],
            "mean": mean,
            "std": std,
        },
    )
