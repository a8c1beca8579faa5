"""Transforms: exact flips and crops, normalisation math, rotation, jitter; no input mutation; determinism."""
import numpy as np
import pytest

from minivgg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Compose, Normalize,
                                     RandomCrop, RandomHorizontalFlip, RandomRotation, compute_mean_std,
                                     rotate)


@pytest.fixture
def batch():
    return np.random.default_rng(7).random((6, 3, 9, 8), dtype=np.float32)  # (B, C, H, W) in [0, 1)


ALL = [RandomHorizontalFlip(0.5), RandomCrop((7, 6), padding=2), RandomRotation(15),
       ColorJitter(0.4, 0.4, 0.4), Normalize(IMAGENET_MEAN, IMAGENET_STD),
       Compose([RandomCrop((9, 8), 1), RandomHorizontalFlip()])]


@pytest.mark.parametrize("t", ALL, ids=lambda t: type(t).__name__)
def test_no_mutation_dtype_kept_and_deterministic(t, batch):
    before = batch.copy()
    a = t(batch, np.random.default_rng(1))
    assert np.array_equal(batch, before)  # input untouched
    assert a is not batch and a.dtype == np.float32
    assert np.array_equal(a, t(batch, np.random.default_rng(1)))  # same rng state -> same output


@pytest.mark.parametrize("t", ALL[:4], ids=lambda t: type(t).__name__)
def test_random_transforms_depend_on_rng(t, batch):
    outs = [t(batch, np.random.default_rng(s)) for s in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_flip_is_exact(batch):
    assert np.array_equal(RandomHorizontalFlip(1.0)(batch, np.random.default_rng(0)), batch[..., ::-1])
    assert np.array_equal(RandomHorizontalFlip(0.0)(batch, np.random.default_rng(0)), batch)
    out = RandomHorizontalFlip(0.5)(batch, np.random.default_rng(3))
    expect = np.random.default_rng(3).random(len(batch)) < 0.5
    assert 0 < expect.sum() < len(batch)  # this seed flips some, keeps some
    for b in range(len(batch)):
        assert np.array_equal(out[b], batch[b, :, :, ::-1] if expect[b] else batch[b])


def test_crop_with_padding_shape_and_content(batch):
    out = RandomCrop((7, 6), padding=2)(batch, np.random.default_rng(5))
    assert out.shape == (6, 3, 7, 6) and out.flags.c_contiguous
    rng = np.random.default_rng(5)
    i, j = rng.integers(0, 9 + 4 - 7 + 1, 6), rng.integers(0, 8 + 4 - 6 + 1, 6)
    padded = np.pad(batch, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for b in range(6):
        assert np.array_equal(out[b], padded[b, :, i[b]:i[b] + 7, j[b]:j[b] + 6])
    assert len(set(zip(i, j))) > 1


def test_crop_identity_and_errors(batch):
    assert np.array_equal(RandomCrop((9, 8))(batch, np.random.default_rng(0)), batch)
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(12, padding=1)(batch, np.random.default_rng(0))


def test_crop_padding_region_is_fill():
    x = np.ones((50, 1, 4, 4), np.float32)
    out = RandomCrop(4, padding=4, fill=0.0)(x, np.random.default_rng(0))
    assert out.shape == (50, 1, 4, 4) and set(np.unique(out)) == {0.0, 1.0}
    assert np.isclose(out.mean(), 0.25, atol=0.15)  # about a quarter of each crop overlaps the image


def test_normalize_math(batch):
    out = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(batch)
    mean = np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)
    std = np.array([0.5, 0.25, 2.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(out, (batch.astype(np.float64) - mean) / std, rtol=1e-6, atol=1e-6)
    one = Normalize(0.5, 0.5)(batch)  # one value for every channel
    np.testing.assert_allclose(one, batch * 2 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="2 channel"):
        Normalize((0.1, 0.2), (1, 1))(batch)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(0.5, 0.0)


def test_rotation_by_zero_is_identity(batch):
    assert np.array_equal(RandomRotation(0)(batch, np.random.default_rng(0)), batch)
    assert np.array_equal(rotate(batch, np.zeros(len(batch))), batch)


def test_rotation_by_90_and_180_matches_numpy():
    x = np.random.default_rng(2).random((3, 2, 7, 7), dtype=np.float32)
    np.testing.assert_allclose(rotate(x, np.full(3, np.pi / 2)), np.rot90(x, 1, axes=(2, 3)), atol=1e-5)
    np.testing.assert_allclose(rotate(x, np.full(3, np.pi)), x[:, :, ::-1, ::-1], atol=1e-5)
    out = RandomRotation((90, 90))(x, np.random.default_rng(0))  # counter-clockwise, like PIL
    np.testing.assert_allclose(out, np.rot90(x, 1, axes=(2, 3)), atol=1e-5)


def test_rotation_fills_corners_and_keeps_centre():
    x = np.ones((1, 1, 9, 9), np.float32)
    out = rotate(x, np.array([np.pi / 4]), fill=0.0)
    assert out[0, 0, 0, 0] == 0.0 and out[0, 0, 4, 4] == 1.0  # corners leave the image, centre stays
    assert 0.0 < out.mean() < 1.0


def test_color_jitter_math(batch):
    out = ColorJitter(brightness=0.5)(batch, np.random.default_rng(4))
    f = np.random.default_rng(4).uniform(0.5, 1.5, size=6).astype(np.float32).reshape(6, 1, 1, 1)
    np.testing.assert_allclose(out, np.clip(batch * f, 0, 1), rtol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    gray = np.repeat(batch[:, :1], 3, axis=1)  # saturation changes nothing on a gray image
    np.testing.assert_allclose(ColorJitter(saturation=0.9)(gray, np.random.default_rng(0)), gray, atol=1e-6)
    flat = np.full((2, 3, 4, 4), 0.3, np.float32)  # contrast changes nothing on a flat image
    np.testing.assert_allclose(ColorJitter(contrast=0.9)(flat, np.random.default_rng(0)), flat, atol=1e-6)
    assert np.array_equal(ColorJitter()(batch, np.random.default_rng(0)), batch)


def test_compose_applies_in_order(batch):
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    out = Compose([RandomCrop(8, padding=1), RandomHorizontalFlip(1.0)])(batch, rng_a)
    ref = RandomHorizontalFlip(1.0)(RandomCrop(8, padding=1)(batch, rng_b), rng_b)
    assert np.array_equal(out, ref)
    with pytest.raises(TypeError, match="not callable"):
        Compose([3])


def test_transforms_reject_uint8():
    with pytest.raises(ValueError, match="float batch"):
        RandomHorizontalFlip()(np.zeros((2, 1, 4, 4), np.uint8), np.random.default_rng(0))


def test_compute_mean_std_exact():
    images = np.random.default_rng(0).integers(0, 256, (20, 3, 5, 6), dtype=np.uint8)
    mean, std = compute_mean_std(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-10)
    assert len(mean) == 3 and all(isinstance(m, float) for m in mean + std)
    with pytest.raises(ValueError, match="uint8"):
        compute_mean_std(x)
