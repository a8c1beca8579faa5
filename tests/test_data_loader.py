"""DataLoader: coverage per epoch, reproducibility from (seed, epoch), prefetch thread behaviour, input checks."""
import threading
import time

import numpy as np
import pytest

from minivgg import backend
from minivgg.data import DataLoader
from minivgg.data.transforms import Compose, RandomCrop, RandomHorizontalFlip

N = 23


@pytest.fixture
def data():
    """Images whose pixels encode nothing special; labels are the sample indices (to trace samples)."""
    images = np.random.default_rng(0).integers(0, 256, (N, 2, 6, 5), dtype=np.uint8)  # (N, C, H, W)
    return images, np.arange(N, dtype=np.int64)


AUGMENT = Compose([RandomCrop((6, 5), padding=1), RandomHorizontalFlip()])


def batches(loader):
    return [(backend.to_numpy(x), backend.to_numpy(y)) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(xa, xb) and np.array_equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


def loader_threads():
    return [t for t in threading.enumerate() if t.name == "minivgg-loader" and t.is_alive()]


def test_every_sample_once_per_epoch_and_pixels_right(data, device):
    images, labels = data
    loader = DataLoader(images, labels, batch_size=5, device=device)
    assert len(loader) == 5
    got = list(loader)
    assert [len(y) for _, y in got] == [5, 5, 5, 5, 3]
    for x, y in got:
        assert backend.device_of(x) == backend.device_of(y) == backend.device_of(
            backend.to_device(np.zeros(1), device))
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape[1:] == (2, 6, 5)
        x, y = backend.to_numpy(x), backend.to_numpy(y)
        assert np.array_equal(x, images[y].astype(np.float32) / np.float32(255))
    seen = np.concatenate([backend.to_numpy(y) for _, y in got])
    assert sorted(seen.tolist()) == list(range(N)) and seen.tolist() != list(range(N))


def test_drop_last_and_no_shuffle(data):
    images, labels = data
    loader = DataLoader(images, labels, batch_size=5, shuffle=False, drop_last=True)
    assert len(loader) == 4
    ys = [y for _, y in batches(loader)]
    assert [len(y) for y in ys] == [5] * 4
    assert np.concatenate(ys).tolist() == list(range(20))


def test_same_seed_and_epoch_give_the_same_batches(data):
    images, labels = data
    kw = dict(batch_size=4, seed=11, transform=AUGMENT, normalize=((0.5, 0.4), (0.2, 0.3)))
    first = DataLoader(images, labels, **kw)
    epochs = [batches(first) for _ in range(3)]  # epochs 0, 1, 2 by auto-advance
    assert first.epoch == 2
    resumed = DataLoader(images, labels, **kw)
    resumed.set_epoch(2)
    assert same(batches(resumed), epochs[2])  # a resumed run sees epoch 2 bit for bit
    assert not same(batches(DataLoader(images, labels, **kw)), epochs[2])  # a fresh loader starts at epoch 0
    again = DataLoader(images, labels, **kw)
    again.set_epoch(1)
    assert same(batches(again), epochs[1]) and same(batches(again), epochs[2])  # then it follows on


def test_different_epoch_or_seed_changes_order(data):
    images, labels = data
    loader = DataLoader(images, labels, batch_size=N, seed=0)
    (_, y0), (_, y1) = batches(loader)[0], batches(loader)[0]
    assert y0.tolist() != y1.tolist() and sorted(y0.tolist()) == sorted(y1.tolist())
    (_, other), = batches(DataLoader(images, labels, batch_size=N, seed=1))
    assert other.tolist() != y0.tolist()


def test_augmentation_draws_depend_on_epoch(data):
    images, labels = data
    loader = DataLoader(images, labels, batch_size=N, shuffle=False, transform=AUGMENT)
    (x0, _), = batches(loader)
    (x1, _), = batches(loader)
    assert not np.array_equal(x0, x1)


def test_prefetch_on_and_off_give_identical_batches(data):
    images, labels = data
    kw = dict(batch_size=3, seed=5, transform=AUGMENT, normalize=(0.5, 0.25))
    plain = DataLoader(images, labels, prefetch=0, **kw)
    threaded = DataLoader(images, labels, prefetch=2, **kw)
    for _ in range(2):
        assert same(batches(plain), batches(threaded))
    assert not loader_threads()


def test_normalize_is_applied_after_scaling(data):
    images, labels = data
    (x, y), = batches(DataLoader(images, labels, batch_size=N, shuffle=False, normalize=((0.5, 0.1), (0.5, 2.0))))
    ref = images.astype(np.float32) / 255
    np.testing.assert_allclose(x[:, 0], (ref[:, 0] - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(x[:, 1], (ref[:, 1] - 0.1) / 2.0, atol=1e-6)


class Boom:
    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, x, rng):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("boom in transform")
        return x


@pytest.mark.parametrize("prefetch", [0, 2])
def test_worker_exception_reaches_the_consumer(data, prefetch):
    images, labels = data
    loader = DataLoader(images, labels, batch_size=4, transform=Boom(at=3), prefetch=prefetch)
    got = []
    with pytest.raises(RuntimeError, match="boom in transform"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 2
    assert not loader_threads()


def test_early_break_neither_hangs_nor_leaks(data):
    images, labels = data
    big = np.repeat(images, 50, axis=0)
    loader = DataLoader(big, np.zeros(len(big), np.int64), batch_size=2, prefetch=1)
    start = time.perf_counter()
    for _ in range(3):
        for _x, _y in loader:
            break  # the worker is blocked on a full queue right now
    it = iter(loader)
    next(it)
    it.close()
    with pytest.raises(KeyError):
        for _x, _y in loader:
            raise KeyError("consumer failed")
    assert time.perf_counter() - start < 5
    assert not loader_threads()


def test_input_validation(data):
    images, labels = data
    cases = [
        (dict(images=images.astype(np.float32)), TypeError, "uint8"),
        (dict(images=images[:, 0]), TypeError, r"\(N, C, H, W\)"),
        (dict(labels=labels.astype(np.float32)), TypeError, "integer labels"),
        (dict(labels=labels[:-1]), ValueError, f"{N} images but {N - 1} labels"),
        (dict(labels=labels - 1), ValueError, "labels must be >= 0"),
        (dict(num_classes=10), ValueError, "label 22 at index 22 is out of range for num_classes=10"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
        (dict(batch_size=2.5), ValueError, "batch_size"),
        (dict(batch_size=N + 1, drop_last=True), ValueError, "leaves no batch"),
        (dict(prefetch=-1), ValueError, "prefetch"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(normalize=((0.5, 0.5, 0.5), (1, 1, 1))), ValueError, "3 channel"),
        (dict(transform="flip"), TypeError, "callable"),
        (dict(device="tpu"), ValueError, "unknown device"),
        (dict(images=images[:0], labels=labels[:0]), ValueError, "empty"),
    ]
    for change, error, message in cases:
        kw = dict(images=images, labels=labels, batch_size=4)
        kw.update(change)
        with pytest.raises(error, match=message):
            DataLoader(**kw)
    loader = DataLoader(images, labels.astype(np.uint8), batch_size=4, num_classes=N)
    assert next(iter(loader))[1].dtype == np.int64
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
