"""The data a training run starts from, by name: Fashion-MNIST or a folder of images (in memory or
streamed), split into train / validation / test, with per-channel statistics and the digests that tell
whether two runs, or two ranks of one run, read the same data.

    data = load_dataset("fashion-mnist", image_size=32, seed=0, val_size=5000)
    data = load_dataset("folder:photos", image_size=64, stream=True, skip_bad=True)
    loader = DataLoader(*data.train, batch_size=128, normalize=(data.mean, data.std))

Splits. Fashion-MNIST: `val_size` training images drawn at random under `seed` are held out for
validation (0: the test set validates, as d2l does), and the test set is its own. A folder: a stratified
`val_fraction` of every class, drawn from the sorted file list under `seed` (ImageFolder), validates and
is also the final test. `train_subset` and `test_subset` keep the first N images of those sets.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from .folder import ImageFolder, prepare_images
from .stream import LazyImages, StreamingImageFolder, sample_mean_std
from .transforms import compute_mean_std

FOLDER = "folder:"


@dataclass
class RunData:
    """What load_dataset returns.

    train, val, test  (images, labels): images uint8 (N, C, H, W), or LazyImages when streamed;
                      labels int64 (N,). val may be test itself (the same tuple)
    classes           class names; label k is classes[k]
    channels          C
    test_name         "test set", or "validation split" for a folder (whose validation split is its test)
    mean, std         per-channel statistics on the [0, 1] scale: Fashion-MNIST's published ones, or the
                      training images' (streamed: from at most 2,000 of them, sample_mean_std)
    val_size          images held out of the training set for validation
    skipped           [(path, reason)] unreadable files left out (skip_bad=True)
    files, files_digest  a folder: how many image files the split was drawn from, and the SHA-256 of
                      their sorted list (class, path relative to the folder); None for Fashion-MNIST
    """

    train: tuple
    val: tuple
    test: tuple
    classes: list
    channels: int
    test_name: str
    mean: tuple
    std: tuple
    val_size: int
    skipped: list = field(default_factory=list)
    files: int | None = None
    files_digest: str | None = None


def load_dataset(dataset: str, image_size: int, channels: int | None = None, seed: int = 0, *,
                 data_dir=None, download: bool = True, val_size: int = 5000, val_fraction: float = 0.2,
                 train_subset: int | None = None, test_subset: int | None = None, stream: bool = False,
                 skip_bad: bool = False) -> RunData:
    """Load `dataset` ("fashion-mnist" or "folder:PATH") resized to image_size x image_size.

    channels: 1 or 3 (default 1 for Fashion-MNIST, 3 for a folder). stream (folders only): list and split
    the files, decode each batch when it is drawn (StreamingImageFolder). skip_bad (folders): leave out
    unreadable images (with stream: missing files and dangling links; a file that exists but does not
    decode stops the run when its batch is built) and list them in .skipped, instead of raising
    UnreadableImagesError; no warning is issued, the caller reports .skipped.
    Raises DataError for data that cannot be used as asked (DatasetNotFoundError when Fashion-MNIST is
    not found).
    """
    size = (int(image_size), int(image_size))
    if dataset.startswith(FOLDER):
        return _folder(dataset[len(FOLDER):], size, channels or 3, seed, val_fraction, train_subset,
                       test_subset, stream, skip_bad)
    if dataset != "fashion-mnist":
        raise DataError(f"unknown dataset {dataset!r}: expected 'fashion-mnist' or 'folder:PATH'")
    if stream:
        raise DataError("stream=True reads image folders only; Fashion-MNIST fits in memory", param="stream")
    return _fashion_mnist(size, channels or 1, seed, data_dir, download, val_size, train_subset, test_subset)


def _fashion_mnist(size, channels, seed, data_dir, download, val_size, train_subset, test_subset) -> RunData:
    images, labels = load_fashion_mnist("train", data_dir, download=download)
    order = np.random.default_rng(seed).permutation(len(images))   # the validation split
    if val_size >= len(images):
        raise DataError(f"val_size {val_size} leaves no training images: the training set has {len(images):,}",
                        param="val_size")
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    test_images, test_labels = load_fashion_mnist("test", data_dir, download=download)
    if test_subset:
        test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]
    prep = lambda a: prepare_images(a, size=size, channels=channels)   # noqa: E731
    train = (prep(images[train_idx]), labels[train_idx])
    test = (prep(test_images), test_labels)
    val = (prep(images[val_idx]), labels[val_idx]) if val_size else test
    return RunData(train, val, test, list(FASHION_MNIST_CLASSES), channels, "test set",
                   tuple(FASHION_MNIST_MEAN * channels), tuple(FASHION_MNIST_STD * channels), val_size)


def _folder(root, size, channels, seed, val_fraction, train_subset, test_subset, stream, skip_bad) -> RunData:
    with warnings.catch_warnings():   # the skipped images are in .skipped, for the caller to report once
        warnings.simplefilter("ignore")
        if stream:   # decoded batch by batch: memory holds a few batches, not the folder
            folder = StreamingImageFolder(root, image_size=size, channels=channels, val_fraction=val_fraction,
                                          seed=seed, skip_bad=skip_bad)
        else:
            folder = ImageFolder(root, image_size=size, channels=channels, val_fraction=val_fraction, seed=seed,
                                 skip_bad=skip_bad)
    if len(folder.val[0]) == 0:
        raise DataError(f"{root}: too few images to hold any out for validation (need 5 or more per class)")
    train, val = folder.train, folder.val
    if train_subset:
        train = (train[0][:train_subset], train[1][:train_subset])
    test = val if not test_subset else (val[0][:test_subset], val[1][:test_subset])
    mean, std = sample_mean_std(train[0], seed=seed) if stream else compute_mean_std(train[0])
    return RunData(train, val, test, list(folder.classes), channels, "validation split", tuple(mean), tuple(std),
                   len(folder.val[1]), list(getattr(folder, "skipped", [])), len(folder.samples),
                   files_digest(folder.root, folder.classes, folder.samples))


def files_digest(root, classes, samples) -> str:
    """SHA-256 of the file list a folder's split is drawn from: one 'class<TAB>relative path' line each."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{classes[label]}\t{os.path.relpath(path, root)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def data_digest(data: RunData) -> str:
    """SHA-256 of what a run will read: every image and label of train, val and test (in memory), or of
    a streamed set the file list with each file's size (the files are decoded only as batches need them).

    Two processes given the same options but different data behind the same path get different digests.
    """
    h = hashlib.sha256()
    for images, labels in (data.train, data.val, data.test):
        if isinstance(images, LazyImages):
            for p in images.paths:
                h.update(f"{p}\t{os.stat(p).st_size}\n".encode("utf-8", "surrogateescape"))
        else:
            h.update(np.ascontiguousarray(images).data)
        h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()
