"""Image data sets from a local folder (e.g. ANIMAL-10N, which is only given out on request).

Layouts understood (train folder first found wins: ``train/``, ``training/``, else root):

- ``label_from="folder"``: ``root/train/<class>/*.png`` (+ optional ``root/test/<class>/...``),
  or ``root/<class>/*`` with no train folder. Classes are the sorted subfolder names of train.
- ``label_from="filename"``: images anywhere under the train folder, label = leading integer
  of the file name before ``_`` (ANIMAL-10N: ``training/3_00123.jpg``, ``testing/...``).

Without a test folder (``test/`` or ``testing/``), a stratified ``test_fraction`` of train
becomes the test set. Images are converted to RGB, resized to image_size x image_size, and
stored as uint8 (N, 3, S, S); normalisation statistics come from the source train images.

Streaming: when the decoded images (N x 3 x S x S bytes, train and test) would exceed
``memory_budget_mb``, only paths and labels are kept; train and test hold :class:`ImageFiles`,
which decode (and resize) an image in ``load(i)``, in ``loader_workers`` loader processes
during training and evaluation. The clean validation set is small and is decoded into memory.
Decoding is the same function either way, so a streamed folder gives the same pixels, and, up
to ``STATS_MAX_IMAGES`` train images, the same statistics and results as the same folder in
memory (beyond it the statistics of a streamed folder come from a seeded sample).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lfm.data.augment import ImagePrepare
from lfm.data.builtin import DATASETS, RawData
from lfm.data.config import DataConfig
from lfm.data.lazy import LazyExamples, take
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


def load_image(path: Path | str, size: int) -> np.ndarray:
    """One image as RGB, resized to size x size: uint8 (3, size, size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            # (H, W, 3) -> (3, H, W); a contiguous, writable copy (PIL's array is read-only).
            return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise LFMError(
            f"cannot read image {str(path)!r}: {e}", "remove or replace the file"
        ) from None


def load_images(paths: list[Path], size: int) -> np.ndarray:
    """Read images as RGB, resize to size x size: uint8 (N, 3, size, size)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = load_image(p, size)
    return out


class ImageFiles(LazyExamples):
    """Image files decoded on demand: ``load(i)`` is ``paths[i]`` as uint8 (3, size, size).

    Parameters
    ----------
    paths : list of str or Path
        One file per example, in example order.
    size : int
        Side every image is resized to (bilinear), as the in-memory path does.
    num_workers : int, default 2
        Loader processes ``iterate_batches`` decodes these files with.

    Example
    -------
    >>> files = ImageFiles(["a.png", "b.png"], 32)
    >>> files.shape, files.nbytes  # (torch.Size([2, 3, 32, 32]), 6144): nothing read yet
    """

    dtype = torch.uint8

    def __init__(self, paths: list[Path] | list[str], size: int, num_workers: int = 2):
        # str, not Path: a million Paths cost several times the memory of their strings.
        self.paths = [str(p) for p in paths]
        self.size, self.num_workers = int(size), int(num_workers)
        self.example_shape = (3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_image(self.paths[i], self.size))


# A streamed folder's normalisation statistics come from at most this many train images (a
# seeded sample beyond it): a full decoding pass over a million images only to find 6 numbers
# would cost as much as an epoch. In memory, and for smaller folders, every image counts.
STATS_MAX_IMAGES = 20_000


def channel_stats(x: torch.Tensor | LazyExamples, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images in [0, 1], from exact integer sums.

    The sums of pixel values and of their squares come exactly from per-channel histograms, so
    the result does not depend on how the images are batched: a streamed folder and the same
    folder in memory get the same statistics, bit for bit. LazyExamples beyond
    ``STATS_MAX_IMAGES`` use a seeded sample of that many (then the two differ slightly).

    Example
    -------
    >>> channel_stats(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    if isinstance(x, LazyExamples) and len(x) > STATS_MAX_IMAGES:
        g = torch.Generator().manual_seed(seed)
        x = x.take(torch.sort(torch.randperm(len(x), generator=g)[:STATS_MAX_IMAGES]).values)
    c = x.shape[1]
    # Per-channel histograms of the 256 pixel values: exact sums from counts, and no int64 or
    # float copy of the images (which would cost 8x or 4x their size).
    hist = torch.zeros(c, 256, dtype=torch.int64)
    for xb in _chunks(x, 256):
        for k in range(c):
            hist[k] += torch.bincount(xb[:, k].reshape(-1), minlength=256)
    v = torch.arange(256, dtype=torch.int64)
    n = int(hist[0].sum())
    if n == 0:
        return [0.0] * c, [1.0] * c
    sums = (hist * v).sum(1).tolist()
    sqs = (hist * v * v).sum(1).tolist()
    mean = [t / n / 255.0 for t in sums]
    # n * sum(x^2) - (sum x)^2 is an exact integer (python ints do not overflow).
    var = [(n * q - t * t) / (n * max(n - 1, 1)) / 255.0**2 for t, q in zip(sums, sqs, strict=True)]
    return mean, [max(w, 0.0) ** 0.5 for w in var]


def _chunks(x: torch.Tensor | LazyExamples, size: int) -> Iterator[torch.Tensor]:
    if isinstance(x, LazyExamples):
        yield from x.batches(size)
        return
    for i in range(0, len(x), size):
        yield x[i : i + size]


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

    # Decoded size of train + test; past the budget only paths and labels stay in memory.
    decoded = (len(paths) + len(tpaths)) * 3 * cfg.image_size**2
    streaming = decoded > cfg.memory_budget_mb * 2**20

    def images(ps: list[Path]) -> torch.Tensor | LazyExamples:
        if streaming:
            return ImageFiles(ps, cfg.image_size, cfg.loader_workers)
        return torch.from_numpy(load_images(ps, cfg.image_size))

    x = images(paths)
    y = torch.tensor(labels, dtype=torch.int64)
    if test_dir is not None and tpaths:
        xt = images(tpaths)
        yt = torch.tensor(tlabels, dtype=torch.int64)
        origin, origin_t = torch.arange(len(y)), torch.arange(len(yt))
    else:
        # No test folder: origin then indexes the sorted train listing for both train and test.
        test_idx, train_idx = stratified_fraction(
            y, cfg.test_fraction, derive_seed(cfg.seed, "test")
        )
        x, y, xt, yt = take(x, train_idx), y[train_idx], take(x, test_idx), y[test_idx]
        origin, origin_t = train_idx, test_idx

    # Statistics of the source train images, as CIFAR's are; a blank channel must not divide by 0.
    mean, std = channel_stats(x, seed=derive_seed(cfg.seed, "stats"))
    std = [max(v, 1e-3) for v in std]
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
            "streaming": streaming,
            "decoded_mb": round(decoded / 2**20, 3),
            "memory_budget_mb": cfg.memory_budget_mb,
        },
    )
