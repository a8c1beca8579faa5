"""Fashion-MNIST loading: the real Debian files, broken IDX files, the search order and the download path.

No test touches the network: an autouse fixture points every search folder at
tmp_path and replaces urllib's urlopen by one that fails (or serves local bytes).
"""
import gzip
import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from minivgg.data import fashion_mnist as fm
from minivgg.data.idx import read_idx, write_idx

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty cache, no system folder, no $MINIVGG_DATA, no network."""
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: {url}")
    monkeypatch.setattr(urllib.request, "urlopen", offline)


def write_split(folder, split="train", n=5, labels=None, image_hw=(28, 28), gz=True, seed=0):
    """A small, valid split in IDX format; returns (images, labels) written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = n if labels is None else len(labels)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n,) + image_hw, dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else np.asarray(labels, dtype=np.uint8)
    ext = ".gz" if gz else ""
    img_name, lbl_name = fm.FILES[split]
    write_idx(folder / (img_name + ext), images)
    write_idx(folder / (lbl_name + ext), labels)
    return images, labels


def load(folder, split="train"):
    return fm.load_fashion_mnist(split, data_dir=folder, download=False, verify=False)


# --- the real files (Debian's dataset-fashion-mnist) --------------------------------------------

needs_debian = pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason=(
    f"{DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist (CI installs it)"))


@needs_debian
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_files_load_and_validate(monkeypatch, split, n):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (DEBIAN_DIR,))
    images, labels = fm.load_fashion_mnist(split, download=False)  # verify=True: payload SHA-256 checked
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.array_equal(np.bincount(labels), np.full(10, n // 10))  # Fashion-MNIST is balanced
    assert images.max() == 255 and images.min() == 0


@needs_debian
@pytest.mark.parametrize("name", sorted(fm.CHECKSUMS))
def test_real_file_checksums_match_table(name):
    data = (DEBIAN_DIR / f"{name}.gz").read_bytes()
    sums = fm.CHECKSUMS[name]
    assert hashlib.sha256(data).hexdigest() == sums.debian_gz_sha256
    raw = gzip.decompress(data)
    assert hashlib.md5(raw).hexdigest() == sums.raw_md5  # the published raw MD5: same data as Zalando's
    assert hashlib.sha256(raw).hexdigest() == sums.raw_sha256


# --- broken files -----------------------------------------------------------------------------

def test_synthetic_split_round_trips_gz_and_raw(tmp_path):
    for gz in (True, False):
        folder = tmp_path / f"gz{gz}"
        images, labels = write_split(folder, "test", n=7, gz=gz)
        got_images, got_labels = load(folder, "test")
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
        assert got_labels.dtype == np.int64


def test_bad_magic_names_the_path(tmp_path):
    write_split(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros(5, dtype=np.uint8))  # a labels file where images belong
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*magic number is 2049, expected 2051"):
        load(tmp_path)
    path.write_bytes(gzip.compress(b"\xff\xff\x08\x03" + bytes(100)))  # not IDX at all
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic"):
        load(tmp_path)


def test_truncated_file_names_the_path(tmp_path):
    write_split(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: file truncated"):
        load(tmp_path)
    path.write_bytes(path.read_bytes()[:10])  # cut inside the header
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX header"):
        load(tmp_path)


def test_truncated_gzip_names_the_path(tmp_path):
    write_split(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        load(tmp_path)


def test_trailing_bytes_are_an_error(tmp_path):
    write_split(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        load(tmp_path)


def test_wrong_sizes_are_errors(tmp_path):
    write_split(tmp_path, n=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"holds 5 images but .*train-labels-idx1-ubyte\.gz holds 4 labels"):
        load(tmp_path)
    write_split(tmp_path, n=5, image_hw=(27, 28))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: images are 27x28"):
        load(tmp_path)


def test_label_out_of_range_names_the_path(tmp_path):
    write_split(tmp_path, n=4, labels=[0, 9, 10, 3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: label 10 at index 2 is out of range"):
        load(tmp_path)


def test_checksum_mismatch_names_the_path(tmp_path):
    write_split(tmp_path)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: checksum mismatch"):
        fm.load_fashion_mnist("train", data_dir=tmp_path, download=False)  # verify=True by default


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        fm.load_fashion_mnist("val", download=False)


def test_read_idx_generic_dtypes(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a)
    b = read_idx(tmp_path / "a.idx")
    assert b.dtype == np.float32 and np.array_equal(a, b)


# --- where the files are looked for -------------------------------------------------------------

def test_search_order(tmp_path, monkeypatch):
    """data_dir, then $MINIVGG_DATA, then the cache, then the system folder: first hit wins."""
    places = {"arg": tmp_path / "arg", "env": tmp_path / "env",
              "cache": tmp_path / "cache", "system": tmp_path / "system"}
    for k, (name, folder) in enumerate(places.items()):
        write_split(folder, labels=[k] * 3, n=3)
    monkeypatch.setenv(fm.ENV_VAR, str(places["env"]))
    for k, name in enumerate(places):
        data_dir = places["arg"] if name == "arg" else None
        _, labels = load(data_dir)
        assert labels.tolist() == [k] * 3, f"expected the files from {name}"
        for f in places[name].iterdir():
            f.unlink()  # next round: the next place in line
        if name == "env":
            monkeypatch.delenv(fm.ENV_VAR)
    with pytest.raises(fm.DatasetNotFoundError):
        load(None)


def test_subfolder_and_missing_data_dir_fall_through(tmp_path, monkeypatch):
    write_split(tmp_path / "root" / "fashion-mnist", n=2, labels=[7, 7])
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "root"))
    _, labels = load(tmp_path / "nothing-here")
    assert labels.tolist() == [7, 7]


def test_missing_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(fm.DatasetNotFoundError) as e:
        fm.load_fashion_mnist("train", data_dir=tmp_path / "mine", download=False)
    msg = str(e.value)
    for needed in ("apt-get install dataset-fashion-mnist", fm.ENV_VAR, str(tmp_path / "cache"),
                   str(tmp_path / "mine"), "--data-dir", "download=False"):
        assert needed in msg


def test_offline_download_fails_helpfully_and_leaves_nothing(tmp_path):
    with pytest.raises(fm.DatasetNotFoundError) as e:
        fm.load_fashion_mnist("test")  # download=True, but urlopen is offline
    msg = str(e.value)
    assert "the download failed" in msg and "offline test" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    cache = tmp_path / "cache" / "fashion-mnist"
    assert not cache.exists() or not any(cache.iterdir())


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_verifies_md5_falls_back_to_mirror_and_renames_atomically(tmp_path, monkeypatch):
    src = tmp_path / "server"
    images, labels = write_split(src, "test", n=6)
    served = {name: (src / f"{name}.gz").read_bytes() for name in fm.FILES["test"]}
    sums = {name: fm.Checksums(hashlib.md5(data).hexdigest(), "", "",
                               hashlib.sha256(gzip.decompress(data)).hexdigest())
            for name, data in served.items()}
    monkeypatch.setattr(fm, "CHECKSUMS", sums)
    monkeypatch.setattr(fm, "MIRRORS", ("http://bad.example/", "http://good.example/"))
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        data = served[url.rsplit("/", 1)[1][:-3]]
        return FakeResponse(data[:-1] + b"x" if url.startswith("http://bad") else data)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)

    got_images, got_labels = fm.load_fashion_mnist("test")  # verify=True against the patched table
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert [u.split("/")[2] for u in calls] == ["bad.example", "good.example"] * 2
    cache = tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in fm.FILES["test"])
    calls.clear()
    fm.load_fashion_mnist("test")  # found in the cache now: no second download
    assert calls == []
