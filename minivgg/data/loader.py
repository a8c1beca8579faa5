"""DataLoader: uint8 images in memory -> shuffled, augmented, normalised float32 batches on a device.

Reproducibility: the shuffle order of epoch e is drawn from default_rng((seed, e, 0))
and the augmentation of batch b from default_rng((seed, e, 1, b)), so every batch is
a pure function of (seed, epoch, batch index). A run resumed at epoch e calls
set_epoch(e) and sees exactly the batches of the first run, bit for bit, whether or
not prefetching is on. Without set_epoch each new iteration moves to the next epoch.

Prefetching: a background thread builds up to `prefetch` batches ahead (gather,
convert, augment, normalise, copy to the device) while the model computes. An
exception in that thread is re-raised in the loop that consumes the batches, and
leaving the loop early stops the thread.

Notation: N samples, B batch, C channels, H W image size.
"""
from __future__ import annotations

import math
import queue
import threading

import numpy as np

from ..backend import parse_device, to_device
from .stream import LazyImages
from .transforms import Normalize

_STOP_POLL_S = 0.1  # how often a blocked worker checks whether the consumer has left


class DataLoader:
    """Batches (x float32 (B, C, H, W), y int64 (B,)) on `device`.

    x = normalize(transform(images[idx] / 255, rng)): pixels scaled to [0, 1], then
    the random transform, then (x - mean) / std. len(loader) is the number of batches.
    """

    def __init__(self, images, labels, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, transform=None, normalize=None, device: str = "cpu",
                 prefetch: int = 2, num_classes: int | None = None):
        self.images, self.labels = _check_data(images, labels, num_classes)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (0 turns the thread off), got {prefetch!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable as transform(x, rng), got {transform!r}")
        self.normalizer = None
        if normalize is not None:
            if isinstance(normalize, Normalize):
                self.normalizer = normalize
            else:
                mean, std = normalize
                self.normalizer = Normalize(mean, std)
            if len(self.normalizer.mean) not in (1, self.images.shape[1]):
                raise ValueError(f"normalize has {len(self.normalizer.mean)} channel(s), "
                                 f"the images have {self.images.shape[1]}")
        parse_device(device)  # a bad device name fails here, not in the first batch
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.drop_last, self.transform, self.device, self.prefetch = drop_last, transform, device, int(prefetch)
        if len(self) == 0:
            raise ValueError(f"drop_last=True with {len(self.images)} samples and batch_size "
                             f"{batch_size} leaves no batch at all")
        self.epoch = None       # the epoch of the latest iteration
        self._next_epoch = 0    # the epoch the next iteration will use

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (later ones follow on: epoch+1, ...)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._next_epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of an epoch, in the order they are served (N,)."""
        n = len(self.images)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, epoch, 0)).permutation(n)

    def make_batch(self, idx: np.ndarray, epoch: int, b: int):
        """Batch b of an epoch from its sample indices: the whole pipeline for one batch."""
        x = self.images[idx].astype(np.float32)  # (B, C, H, W)
        x /= np.float32(255)  # in [0, 1], as torchvision's ToTensor
        if self.transform is not None:
            x = self.transform(x, np.random.default_rng((self.seed, epoch, 1, b)))
        if self.normalizer is not None:
            x = self.normalizer(x)
        y = self.labels[idx]  # (B,)
        return to_device(np.ascontiguousarray(x, dtype=np.float32), self.device), to_device(y, self.device)

    def __iter__(self):
        epoch = self.epoch = self._next_epoch
        self._next_epoch = epoch + 1
        order = self.order(epoch)
        chunks = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]
        if self.prefetch == 0:
            return (self.make_batch(idx, epoch, b) for b, idx in enumerate(chunks))
        return _prefetched(lambda b: self.make_batch(chunks[b], epoch, b), len(chunks), self.prefetch)

    def __repr__(self) -> str:
        return (f"DataLoader(N={len(self.images)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, seed={self.seed}, transform={self.transform!r}, "
                f"normalize={self.normalizer!r}, device={self.device!r}, prefetch={self.prefetch})")


def _prefetched(make, n_batches: int, depth: int):
    """Yield make(0), make(1), ... built by a worker thread at most `depth` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:  # blocks while the queue is full; gives up once the consumer has left
        while not stop.is_set():
            try:
                q.put(item, timeout=_STOP_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for b in range(n_batches):
                if stop.is_set() or not put(("batch", make(b))):
                    return
            put(("done", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))

    worker = threading.Thread(target=work, name="minivgg-loader", daemon=True)
    worker.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:  # normal end, an exception, or the consumer broke out of its loop (generator closed)
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()  # unblock a worker stuck on a full queue
            except queue.Empty:
                worker.join(timeout=_STOP_POLL_S)


def _check_data(images, labels, num_classes):
    """Validate up front, so a bad dataset fails at construction with a clear message."""
    if isinstance(images, LazyImages):   # a streamed folder: files decoded batch by batch
        pass
    elif not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError("DataLoader expects images as a NumPy uint8 array (N, C, H, W), got "
                        f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
                        " (use prepare_images to get there), or LazyImages from StreamingImageFolder")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise TypeError(f"DataLoader expects integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("DataLoader got an empty dataset (0 images)")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {labels.min()} at index {int(np.argmin(labels))}")
    if num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} at index {int(np.argmax(labels))} is out of range "
                         f"for num_classes={num_classes} (0..{num_classes - 1})")
    return images, labels.astype(np.int64, copy=False)
