"""Data: offline built-in sets, local CIFAR and image folders, splits, imbalance, label noise;
any map-style Dataset through a DataLoader with example indices, and streamed image folders."""

from lfm.data.augment import ImagePrepare, normalize, random_crop_flip
from lfm.data.build import DATASETS, build_data
from lfm.data.builtin import RawData
from lfm.data.cifar import load_cifar, read_cifar_batch, safe_load_pickle
from lfm.data.config import DataConfig
from lfm.data.imagefolder import ImageFiles
from lfm.data.lazy import DatasetExamples, LazyExamples
from lfm.data.loader import IndexedDataset, collate_batch, indexed_loader, split_from_dataset
from lfm.data.longtail import longtail_counts, longtail_counts_for, subsample_longtail
from lfm.data.noise import NoiseSpec, inject_noise, parse_noise, transition_matrix
from lfm.data.splits import random_fraction, stratified_fraction, take_per_class
from lfm.data.types import Batch, DataBundle, Split, Stream, iterate_batches

__all__ = [
    "DATASETS",
    "Batch",
    "DataBundle",
    "DataConfig",
    "DatasetExamples",
    "ImageFiles",
    "ImagePrepare",
    "IndexedDataset",
    "LazyExamples",
    "NoiseSpec",
    "RawData",
    "Split",
    "Stream",
    "build_data",
    "collate_batch",
    "indexed_loader",
    "inject_noise",
    "iterate_batches",
    "load_cifar",
    "longtail_counts",
    "longtail_counts_for",
    "normalize",
    "parse_noise",
    "random_crop_flip",
    "random_fraction",
    "read_cifar_batch",
    "safe_load_pickle",
    "split_from_dataset",
    "stratified_fraction",
    "subsample_longtail",
    "take_per_class",
    "transition_matrix",
]
