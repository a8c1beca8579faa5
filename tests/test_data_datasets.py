"""load_dataset (minivgg/data/datasets.py): a run's data by name, its split, and the digests that tell
whether a folder's file list, or the data a process reads, is the one another run or rank saw."""
import numpy as np
import pytest
from PIL import Image

from minivgg.data import DataError, ImageFolder, data_digest, load_dataset
from minivgg.data.folder import UnreadableImagesError
from test_cli import FMNIST


def tree(root, n=6, classes=("cat", "dog"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("stream", [False, True])
def test_a_folder_gives_imagefolders_split_statistics_and_a_file_list_digest(tmp_path, stream):
    root = tree(tmp_path / "photos")
    data = load_dataset(f"folder:{root}", 32, seed=1, stream=stream)
    ref = ImageFolder(root, image_size=32, channels=3, val_fraction=0.2, seed=1)
    assert data.classes == ["cat", "dog"] and data.channels == 3 and data.test is data.val
    assert np.array_equal(data.train[1], ref.train[1]) and np.array_equal(data.val[1], ref.val[1])
    assert np.array_equal(data.train[0][np.arange(len(data.train[1]))], ref.train[0])
    assert data.files == 12 and len(data.files_digest) == 64 and data.val_size == len(ref.val[1])
    assert len(data.mean) == len(data.std) == 3 and all(s > 0 for s in data.std)

    same = load_dataset(f"folder:{root}", 32, seed=2, stream=stream)   # another seed, the same files
    assert same.files_digest == data.files_digest
    Image.new("RGB", (20, 20)).save(root / "dog" / "new.png")
    grown = load_dataset(f"folder:{root}", 32, seed=1, stream=stream)
    assert grown.files == 13 and grown.files_digest != data.files_digest


def test_the_data_digest_sees_a_changed_image_behind_the_same_path(tmp_path):
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    da, db = load_dataset(f"folder:{a}", 32), load_dataset(f"folder:{b}", 32)
    assert data_digest(da) == data_digest(db)   # the same pictures in two places
    Image.new("RGB", (20, 20), (9, 9, 9)).save(b / "cat" / "0.png")   # same name, other pixels
    db = load_dataset(f"folder:{b}", 32)
    assert db.files_digest == da.files_digest and data_digest(db) != data_digest(da)


def test_bad_folders_and_bad_requests_are_data_errors_naming_what_is_wrong(tmp_path):
    root = tree(tmp_path / "photos", n=2)
    with pytest.raises(DataError, match="too few images to hold any out for validation"):
        load_dataset(f"folder:{root}", 32)
    (root / "cat" / "9.png").write_bytes(b"not a png")
    tree(root, n=6)
    with pytest.raises(UnreadableImagesError) as e:
        load_dataset(f"folder:{root}", 32)
    assert isinstance(e.value, DataError) and [p.name for p, _ in e.value.skipped] == ["9.png"]
    data = load_dataset(f"folder:{root}", 32, skip_bad=True)
    assert [p.name for p, _ in data.skipped] == ["9.png"]
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", 32)


def test_stream_with_skip_bad_leaves_out_a_dangling_link(tmp_path):
    root = tree(tmp_path / "photos")
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UnreadableImagesError, match="dangling"):
        load_dataset(f"folder:{root}", 32, stream=True)
    data = load_dataset(f"folder:{root}", 32, stream=True, skip_bad=True)
    assert [p.name for p, _ in data.skipped] == ["gone.png"] and len(data.train[1]) + len(data.val[1]) == 12


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"real Fashion-MNIST not installed at {FMNIST}")
def test_fashion_mnist_holds_out_val_size_and_names_a_split_too_large():
    data = load_dataset("fashion-mnist", 32, seed=0, val_size=20, train_subset=50, test_subset=30)
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (50, 20, 30)
    assert data.train[0].shape == (50, 1, 32, 32) and data.files_digest is None and data.test_name == "test set"
    assert load_dataset("fashion-mnist", 32, val_size=0, test_subset=10).val is not None
    with pytest.raises(DataError, match=r"^val_size 60000 leaves no training images") as e:
        load_dataset("fashion-mnist", 32, val_size=60000)
    assert e.value.param == "val_size"
