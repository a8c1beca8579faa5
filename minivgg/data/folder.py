"""Images into uint8 (C, H, W) arrays, resized and converted once by PIL: from an
ImageFolder tree (one sub-folder per class), from one photo to predict, or from an array.

Resizing stretches to exactly (H, W) with bilinear filtering (no crop, the aspect
ratio is not kept), as torchvision's Resize((H, W)). Memory is N*C*H*W bytes: all
70,000 Fashion-MNIST images at 224x224 take 3.5 GB with one channel, 10.5 GB with three.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm",
                  ".tif", ".tiff", ".webp")


def _size_hw(size) -> tuple[int, int] | None:
    """None, 32 or (32, 32) -> None or (H, W)."""
    if size is None:
        return None
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"image size must be positive integers (H, W) or one int, got {size!r}")
    return int(h), int(w)


def _check_channels(channels) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, CMYK, I;16, F ...) -> 'L' or 'RGB'; transparency over white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif img.mode.startswith("I") or img.mode == "F":  # 16/32-bit ints or floats: PIL's convert clips at 255
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
            a = a * 255.0  # floats on the 0..1 scale
        elif img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


def _resize(img: Image.Image, size_hw) -> Image.Image:
    if size_hw is None or img.size == (size_hw[1], size_hw[0]):
        return img
    return img.resize((size_hw[1], size_hw[0]), Image.BILINEAR)  # PIL sizes are (W, H)


def _chw(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class TooManyPixelsError(DataError):
    """An image whose header announces more pixels than the caller accepts (a decompression bomb)."""


def load_image(path, image_size=None, channels: int = 3, max_pixels: int | None = None) -> np.ndarray:
    """One image file of any size and mode -> uint8 (C, H, W); EXIF orientation applied.

    image_size: (H, W), an int for a square, or None to keep the file's size.
    max_pixels: refuse (TooManyPixelsError) a file whose header says it has more pixels, before decoding.
    A missing file is a FileNotFoundError; an unreadable or truncated one a
    DataError (a ValueError) naming the path. The EXIF transpose works in place (no second full-size copy).
    """
    path = Path(path)
    size_hw, channels = _size_hw(image_size), _check_channels(channels)
    if not path.is_file():
        if path.is_symlink():   # listed by a folder: an unreadable image, which skip_bad can drop
            raise DataError(f"cannot read image {path}: a dangling symbolic link (to {os.readlink(path)})")
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise TooManyPixelsError(f"image {path} of {w}x{h} pixels is larger than the "
                                         f"{max_pixels:,} pixels accepted")
            if size_hw is not None:  # JPEG only: decode at 1/2, 1/4, 1/8 scale when still >= the target
                img.draft(None, (max(size_hw),) * 2)
            img.load()  # decode now: a truncated file fails here, not later
            ImageOps.exif_transpose(img, in_place=True)
            return _chw(_resize(_to_mode(img, channels), size_hw))
    except TooManyPixelsError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def prepare_images(images, size=None, channels: int = 1, progress=None) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> uint8 (N, C, H', W'): resized and gray<->RGB once, up front.

    Bilinear resize by PIL, one image at a time (70,000 images 28->32 take ~2 s;
    ->224 ~15 s and 3.5 GB per channel). RGB -> gray uses PIL's ITU-R 601-2 luma.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"prepare_images expects uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    channels = _check_channels(channels)
    n, h, w = images.shape[:3]
    size_hw = _size_hw(size) or (h, w)
    gray_in = images.ndim == 3
    out = np.empty((n, channels) + size_hw, dtype=np.uint8)  # (N, C, H', W')
    if size_hw == (h, w):  # channel conversion alone, vectorised
        gray = images if gray_in else (_luma(images) if channels == 1 else None)
        out[:] = images.transpose(0, 3, 1, 2) if gray is None else gray[:, None]
        return out
    mode = "L" if (gray_in or channels == 1) else "RGB"  # resize the fewest channels
    k = 1 if mode == "L" else 3
    for i in tqdm(range(n), desc="resizing", disable=_tqdm_disable(progress), leave=False, mininterval=1.0):
        img = Image.fromarray(images[i])
        out[i, :k] = _chw(_resize(img if img.mode == mode else img.convert(mode), size_hw))
    if k < channels:
        out[:, 1:] = out[:, :1]  # gray -> RGB: copy the one resized channel
    return out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """PIL's RGB -> L in integers: (R*19595 + G*38470 + B*7471 + 2**15) >> 16."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _tqdm_disable(progress):
    """progress True/False forces the bar on/off; None shows it only on a terminal."""
    return None if progress is None else not progress


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # .DS_Store, ._photo.jpg, macOS zip folders


def list_images(folder: Path, root: Path | None = None) -> list[Path]:
    """Image files under `folder` (recursively), sorted; hidden and non-image files ignored.

    Symbolic links, the rule: a link to a directory is followed unless its target is the dataset `root`
    (default `folder`), lies inside it or contains it: those files are listed under their own class
    already, or the link is a loop (a link to `..` would otherwise read the whole tree again and again).
    Each real directory is entered once and each real file (device, inode) is listed once per folder,
    however many links lead to it. A dangling link to an image name is listed: reading it fails as an
    unreadable image (skipped with skip_bad, named otherwise).
    """
    real_root = Path(root if root is not None else folder).resolve()
    seen_dirs, seen_files, found = set(), set(), []

    def inside_the_tree(d: Path) -> bool:
        real = d.resolve()
        return real == real_root or real_root in real.parents or real in real_root.parents

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)
                             and not (os.path.islink(os.path.join(dirpath, d))
                                      and inside_the_tree(Path(dirpath) / d)))
        for f in sorted(filenames):
            if _is_hidden(f) or not f.lower().endswith(IMG_EXTENSIONS):
                continue
            path = Path(dirpath) / f
            try:
                st = os.stat(path)
            except OSError:   # a dangling link: kept, so that reading it names it
                found.append(path)
                continue
            if (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                found.append(path)
    return found


class UnreadableImagesError(DataError):
    """Images that could not be decoded; .skipped is [(path, reason)] for every one of them."""

    def __init__(self, message, skipped):
        super().__init__(message)
        self.skipped = list(skipped)


def report_unreadable(root, skipped, skip_bad: bool, stacklevel: int = 3) -> None:
    """[(path, reason)] of unreadable files in `root`: an UnreadableImagesError listing every one, or
    with skip_bad a warning listing them (the caller drops them)."""
    listing = "\n".join(f"  {p}: {why}" for p, why in skipped)
    if not skip_bad:
        raise UnreadableImagesError(f"{len(skipped)} unreadable image(s) in {root} "
                                    f"(pass skip_bad=True to drop them):\n{listing}", skipped)
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {root}:\n{listing}", stacklevel=stacklevel)


def find_classes(root: Path) -> tuple[list[str], list[list[Path]]]:
    """The sorted class sub-folders of `root` and the sorted image files of each (also used by stream.py)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expected root/<class>/<image> "
                         "(for example root/cat/1.jpg, root/dog/2.jpg)")
    if len(classes) == 1:   # a 1-class "classifier" is 100% right and useless
        inner = root / classes[0]
        raise DataError(f"{root} has one class sub-folder ({classes[0]}); a classifier needs 2 or more"
                         + (f". The class folders may be one level down: try {inner}"
                            if any(d.is_dir() and not _is_hidden(d.name) for d in inner.iterdir()) else ""))
    per_class = [list_images(root / c, root) for c in classes]
    empty = [str(root / c) for c, files in zip(classes, per_class) if not files]
    if empty:
        raise DataError(f"class folder(s) with no images ({', '.join(IMG_EXTENSIONS)}): " + ", ".join(empty))
    return classes, per_class


def index_folder(root: Path, val_fraction: float, seed: int, stratified: bool):
    """What every folder dataset starts from: (classes, samples as (path, label), is_val (N,) bool).

    The split is a function of (seed, val_fraction, stratified) and the listing alone, so the
    in-memory ImageFolder and the StreamingImageFolder split a folder the same way.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    classes, per_class = find_classes(Path(root))
    samples = [(p, k) for k, files in enumerate(per_class) for p in files]
    return classes, samples, ImageFolder._split(per_class, val_fraction, seed, stratified)


class ImageFolder:
    """A labelled image set on disk, one sub-folder per class (root/cat/1.jpg, root/dog/2.jpg).

    .classes     sorted sub-folder names; label k is classes[k]
    .samples     [(path, label)] of every image found, in sorted order
    .train .val  (uint8 (N, C, H, W), int64 (N,)): a split seeded by `seed`,
                 stratified (each class split in the same proportion) unless stratified=False
    .train_paths .val_paths   the files behind each row, for inspecting mistakes
    .skipped     [(path, reason)] of unreadable files dropped when skip_bad=True

    Unreadable or truncated images are collected and raised as one ValueError that
    lists every path, or dropped with a warning when skip_bad=True. The split is
    drawn from the file list before decoding, so dropping a bad file does not move
    any other file between train and val.
    """

    def __init__(self, root, image_size=(224, 224), channels: int = 3, val_fraction: float = 0.2,
                 seed: int = 0, stratified: bool = True, skip_bad: bool = False, workers=None,
                 progress=None):
        self.root = Path(root)
        self.image_size, self.channels = _size_hw(image_size), _check_channels(channels)
        if self.image_size is None:
            raise ValueError("ImageFolder needs an image_size (H, W): photos of different sizes "
                             "must be resized to one size to be stacked into a batch")
        self.classes, self.samples, is_val = index_folder(self.root, val_fraction, seed, stratified)
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        # Load train rows first, then val rows, into one array: the two parts are views, not copies.
        order = np.concatenate([np.flatnonzero(~is_val), np.flatnonzero(is_val)])
        images, ok = self._load(order, workers, progress, skip_bad)
        order, n_train = order[ok], int(ok[:int((~is_val).sum())].sum())
        if not ok.all():
            images = images[ok]
        labels = np.array([self.samples[i][1] for i in order], dtype=np.int64)
        paths = [self.samples[i][0] for i in order]
        self.train = (images[:n_train], labels[:n_train])
        self.val = (images[n_train:], labels[n_train:])
        self.train_paths, self.val_paths = paths[:n_train], paths[n_train:]

    @staticmethod
    def _split(per_class, val_fraction, seed, stratified) -> np.ndarray:
        """Boolean mask over samples, True for validation: a pure function of the file list and seed."""
        rng = np.random.default_rng(seed)
        sizes = [len(files) for files in per_class]
        starts = np.cumsum([0] + sizes)
        groups = [np.arange(s, s + m) for s, m in zip(starts, sizes)] if stratified else [np.arange(starts[-1])]
        is_val = np.zeros(starts[-1], dtype=bool)
        for group in groups:
            n_val = int(round(len(group) * val_fraction))
            is_val[rng.permutation(group)[:n_val]] = True
        return is_val

    def _load(self, order, workers, progress, skip_bad):
        """Decode samples[order[j]] into row j of (N, C, H, W); ok[j] False where a file is unreadable."""
        n = len(order)
        images = np.zeros((n, self.channels) + self.image_size, dtype=np.uint8)  # (N, C, H, W)
        ok = np.ones(n, dtype=bool)
        self.skipped = []

        def load(j):
            try:
                images[j] = load_image(self.samples[order[j]][0], self.image_size, self.channels)
                return None
            except ValueError as e:
                return e.__cause__ or e

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # PIL drops the GIL to decode
            bar = tqdm(pool.map(load, range(n)), total=n, desc=f"loading {self.root.name}",
                       disable=_tqdm_disable(progress), leave=False, mininterval=1.0)
            for j, err in enumerate(bar):
                if err is not None:
                    ok[j] = False
                    self.skipped.append((self.samples[order[j]][0], f"{type(err).__name__}: {err}"))
        if self.skipped:
            self.skipped.sort()
            report_unreadable(self.root, self.skipped, skip_bad, stacklevel=4)
            left = np.bincount([self.samples[i][1] for i in order[ok]], minlength=len(self.classes))
            gone = [str(self.root / c) for c, m in zip(self.classes, left) if m == 0]
            if gone:
                raise DataError(f"no readable images left in class folder(s): {', '.join(gone)}")
        return images, ok

    def __len__(self) -> int:
        return len(self.samples) - len(self.skipped)

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, classes={self.classes}, train={len(self.train[0])}, "
                f"val={len(self.val[0])}, image_size={self.image_size}, channels={self.channels})")
