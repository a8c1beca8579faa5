"""Fashion-MNIST: find the four IDX files (or download them), check them, decode them.

Search order, first hit wins (a folder counts when it, or its `fashion-mnist/`
sub-folder, holds both files of the split, gzipped or not):
    1. the `data_dir` argument (the CLI's --data-dir)
    2. $MINIVGG_DATA
    3. ~/.cache/minivgg           (where downloads go)
    4. /usr/share/datasets/fashion-mnist   (Debian: apt-get install dataset-fashion-mnist)
    5. download from Zalando's server or its GitHub mirror into ~/.cache/minivgg/fashion-mnist

Checksums. Debian re-gzipped the files (its .gz bytes differ from Zalando's), but
the decompressed payloads are identical to the official ones: their MD5s are the
raw-file MD5s published with the dataset. So a loaded file is verified by the
SHA-256 of its payload, which holds for Debian's .gz, Zalando's .gz and the raw
files alike; a download is also checked against Zalando's .gz MD5 before it is kept.

The constants below (ENV_VAR, CACHE_DIR, SYSTEM_DIRS, MIRRORS, CHECKSUMS) are
module-level so that tests can monkeypatch them and never touch the network.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError
from .idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_idx, read_idx_bytes

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-channel statistics of the 60,000 training images scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SHAPE = (28, 28)

ENV_VAR = "MINIVGG_DATA"
CACHE_DIR = Path.home() / ".cache" / "minivgg"
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
SUBDIR = "fashion-mnist"
MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
           "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
DOWNLOAD_TIMEOUT_S = 30


class Checksums(NamedTuple):
    gz_md5: str             # Zalando's published MD5 of the .gz it serves
    debian_gz_sha256: str   # SHA-256 of Debian's re-gzipped file (dataset-fashion-mnist 0.0~git20200523.55506a9-1)
    raw_md5: str            # MD5 of the decompressed IDX file (the same for both sources)
    raw_sha256: str         # SHA-256 of the decompressed IDX file: what load_fashion_mnist verifies


# Zalando's MD5s as in the dataset's README (t10k-labels ends in ...83cd310; copies
# quoting ...83fd310 carry a typo). Debian's raw MD5s equal the published raw ones.
CHECKSUMS = {
    "train-images-idx3-ubyte": Checksums(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": Checksums(
        "25c81989df183df01b3e8a0aad5dffbe",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "9018921c3c673c538a1fc5bad174d6f9",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": Checksums(
        "bef4ecab320f06d8554ea6380940ec79",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "8181f5470baa50b63fa0f6fddb340f0a",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": Checksums(
        "bb300cfdad3c16e7a12a480ee83cd310",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "15d484375f8d13e6eb1aabb0c3f46965",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


class DatasetNotFoundError(FileNotFoundError):
    """Fashion-MNIST is in none of the searched folders and could not be downloaded."""


def candidate_dirs(data_dir=None) -> list[Path]:
    """The folders searched, in order (see the module docstring)."""
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(Path(CACHE_DIR))
    dirs.extend(Path(d) for d in SYSTEM_DIRS)
    return dirs


def _file_in(folder: Path, name: str) -> Path | None:
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


def find_fashion_mnist(split: str = "train", data_dir=None) -> tuple[Path, Path] | None:
    """(images path, labels path) from the first folder that holds both, or None."""
    names = _split_files(split)
    for folder in candidate_dirs(data_dir):
        for d in (folder, folder / SUBDIR):
            paths = [_file_in(d, name) for name in names]
            if all(paths):
                return paths[0], paths[1]
    return None


def load_fashion_mnist(split: str = "train", data_dir=None, download: bool = True,
                       verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of the 'train' (60,000) or 'test' (10,000) split.

    `verify` checks each payload's SHA-256 against CHECKSUMS (turn it off only for
    files you built yourself). Structure is always checked: magic numbers, 28x28,
    as many labels as images, labels in 0..9.
    """
    found = find_fashion_mnist(split, data_dir)
    if found is None:
        if not download:
            raise DatasetNotFoundError(_not_found_message(split, data_dir, "download=False"))
        found = download_fashion_mnist(split, Path(CACHE_DIR) / SUBDIR, data_dir=data_dir)
    image_path, label_path = found
    images = _load_checked(image_path, IDX_IMAGES_MAGIC, verify)
    labels = _load_checked(label_path, IDX_LABELS_MAGIC, verify)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
                         f"Fashion-MNIST's are {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} "
                         f"holds {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        bad = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
        raise DataError(f"{label_path}: label {int(labels[bad])} at index {bad} is out of range "
                         f"0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels.astype(np.int64)


def _split_files(split: str) -> tuple[str, str]:
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: expected 'train' or 'test'")
    return FILES[split]


def _load_checked(path: Path, magic: int, verify: bool) -> np.ndarray:
    data = read_idx_bytes(path)
    if verify:
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        expected = CHECKSUMS[name].raw_sha256
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise DataError(f"{path}: checksum mismatch, the decompressed file has SHA-256 {got}, "
                             f"expected {expected}. The file is damaged or not Fashion-MNIST: "
                             "delete it and fetch it again (or pass verify=False for your own files)")
    return parse_idx(data, path, magic)


def download_fashion_mnist(split: str, dest, data_dir=None) -> tuple[Path, Path]:
    """Fetch the split's two .gz files into `dest`, each checked against Zalando's MD5.

    Each file is streamed to a temporary file beside its target and renamed into
    place only once its checksum matches, so an interrupted download never leaves
    a half-written file under the real name.
    """
    dest = Path(dest)
    paths, errors = [], []
    for name in _split_files(split):
        target = dest / f"{name}.gz"
        if not target.is_file():
            for base in MIRRORS:
                try:
                    _download_one(base + name + ".gz", target, CHECKSUMS[name].gz_md5)
                    break
                except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                    errors.append(f"{base}{name}.gz: {e}")
            else:
                raise DatasetNotFoundError(_not_found_message(
                    split, data_dir, "the download failed:\n    " + "\n    ".join(errors)))
        paths.append(target)
    return paths[0], paths[1]


def _download_one(url: str, target: Path, md5: str) -> None:
    from tqdm import tqdm
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _not_found_message(split: str, data_dir, why: str) -> str:
    names = ", ".join(f"{n}.gz" for n in _split_files(split))
    searched = "\n".join(f"  - {d}" for d in candidate_dirs(data_dir))
    cache = Path(CACHE_DIR) / SUBDIR
    return (f"Fashion-MNIST ({split} split) not found, and {why}.\n"
            f"Looked for {names} (gzipped or not) in each of these folders and its "
            f"'{SUBDIR}/' sub-folder:\n{searched}\n"
            "To get it, do one of:\n"
            "  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu: files in /usr/share/datasets/fashion-mnist)\n"
            f"  - put the four files (train-/t10k- images-idx3 and labels-idx1 -ubyte.gz) in {cache}\n"
            f"    or in a folder DIR passed as --data-dir DIR (data_dir=DIR)\n"
            f"  - set {ENV_VAR}=DIR to a folder that holds them\n"
            f"  - download them from {MIRRORS[0] if MIRRORS else 'Zalando'} on a machine with network access")
