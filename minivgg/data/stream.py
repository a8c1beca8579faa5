"""Image folders larger than memory: files are listed and split up front, but decoded only when a batch
needs them, by a small pool of threads, so memory holds a few batches instead of the whole set.

    folder = StreamingImageFolder("photos", image_size=224, channels=3)
    loader = DataLoader(*folder.train, batch_size=32, seed=0, transform=..., normalize=...)

folder.train and folder.val are (LazyImages, labels) pairs that DataLoader takes in place of uint8
arrays. LazyImages[idx] (an index array) decodes those files into uint8 (B, C, H, W) with its thread
pool (PIL releases the GIL while it decodes); DataLoader's prefetch thread builds the next batches
while the model computes. Memory: about (prefetch + 2) batches of uint8 and float32 images, whatever
the size of the folder.

Reproducibility is DataLoader's: the order of epoch e and the augmentation of batch b are drawn from
(seed, e) and (seed, e, b), and decoding is deterministic, so a streamed epoch is bit for bit the
epoch an in-memory ImageFolder gives, and a resumed run sees the same batches. The split into train
and val is ImageFolder's (the same files for the same seed).

Notation: N images, B batch, C channels, H W image size.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .folder import _check_channels, _size_hw, index_folder, load_image, report_unreadable
from .transforms import channel_histograms, mean_std_of_histograms


class LazyImages:
    """N image files that index like a uint8 (N, C, H, W) array, decoding on access.

    images[idx] with an integer array (or an int) decodes those files: uint8 (B, C, H, W), a copy.
    images[a:b] is another LazyImages over those files (a view: nothing is decoded).
    An unreadable file raises ValueError naming it when its batch is built.
    """

    def __init__(self, paths, image_size, channels: int = 3, workers: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.image_size, self.channels = _size_hw(image_size), _check_channels(channels)
        if self.image_size is None:
            raise ValueError("LazyImages needs an image_size (H, W) to stack images into batches")
        self.workers = int(workers or min(4, os.cpu_count() or 1))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = None
        self._pool_lock = threading.Lock()

    # the parts of the ndarray interface DataLoader and the CLI use
    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple:
        return (len(self.paths), self.channels) + self.image_size

    @property
    def nbytes(self) -> int:
        """What the whole set would take decoded (it never is, all at once)."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="minivgg-decode")
            return self._pool

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return LazyImages(self.paths[idx], self.image_size, self.channels, self.workers)
        if isinstance(idx, (int, np.integer)):
            return load_image(self.paths[idx], self.image_size, self.channels)   # (C, H, W)
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"LazyImages takes an int, a slice or a 1-D integer array, got {idx.dtype} {idx.shape}")
        out = np.empty((len(idx),) + self.shape[1:], dtype=np.uint8)   # (B, C, H, W)

        def decode(j):
            out[j] = load_image(self.paths[idx[j]], self.image_size, self.channels)

        for _ in self._executor().map(decode, range(len(idx))):   # re-raises a worker's error here
            pass
        return out

    def close(self) -> None:
        """Stop the decoding threads (they start again on the next access)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __repr__(self) -> str:
        return (f"LazyImages(N={len(self)}, image_size={self.image_size}, channels={self.channels}, "
                f"workers={self.workers}, {self.nbytes / 1e6:,.0f} MB if decoded)")


class StreamingImageFolder:
    """ImageFolder's listing and split without decoding: .train and .val are (LazyImages, int64 labels).

    Also .classes, .class_to_idx, .samples, .train_paths, .val_paths, as ImageFolder, and .skipped.
    Nothing is decoded up front, but every listed path is checked to exist (one stat each): a dangling
    symbolic link is an UnreadableImagesError naming it, or, with skip_bad=True, dropped (after the
    split, as ImageFolder drops a bad file) and listed in .skipped with a warning. A file that exists
    but does not decode is found only when its batch is built.
    """

    def __init__(self, root, image_size=(224, 224), channels: int = 3, val_fraction: float = 0.2,
                 seed: int = 0, stratified: bool = True, workers: int | None = None, skip_bad: bool = False):
        self.root = Path(root)
        self.image_size, self.channels = _size_hw(image_size), _check_channels(channels)
        self.classes, self.samples, is_val = index_folder(self.root, val_fraction, seed, stratified)
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        present = np.array([os.path.exists(p) for p, _ in self.samples], dtype=bool)   # (N,)
        self.skipped = [(p, "a dangling symbolic link" if os.path.islink(p) else "missing")
                        for (p, _), ok in zip(self.samples, present) if not ok]
        if self.skipped:
            report_unreadable(self.root, self.skipped, skip_bad)
        parts = []
        for rows in (np.flatnonzero(~is_val & present), np.flatnonzero(is_val & present)):
            paths = [self.samples[i][0] for i in rows]
            labels = np.array([self.samples[i][1] for i in rows], dtype=np.int64)   # (N,)
            parts.append((LazyImages(paths, self.image_size, self.channels, workers), labels))
        self.train, self.val = parts
        self.train_paths, self.val_paths = self.train[0].paths, self.val[0].paths

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"StreamingImageFolder({str(self.root)!r}, classes={self.classes}, train={len(self.train[0])}, "
                f"val={len(self.val[0])}, image_size={self.image_size}, channels={self.channels})")


def sample_mean_std(images, max_images: int = 2000, seed: int = 0, chunk: int = 256):
    """Per-channel mean and std on the [0, 1] scale, from at most `max_images` images drawn at random,
    decoded `chunk` at a time. Exact over the sample (summed histograms); with no more than max_images
    images it is compute_mean_std of them all, to the bit. 2,000 images pin the mean to about 1e-3."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images])
    hist = sum(channel_histograms(images[rows[i:i + chunk]]) for i in range(0, len(rows), chunk))   # (C, 256)
    return mean_std_of_histograms(hist)
