"""ImageFolder, load_image and prepare_images on small image trees that each test draws with PIL."""
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivgg.data import ImageFolder, load_image, prepare_images

COLORS = {"cat": (200, 30, 30), "dog": (30, 30, 200), "owl": (30, 200, 30)}


def draw(path, size=(12, 10), color=(200, 30, 30), mode="RGB", **save):
    """Save a solid image of PIL size (W, H) at path; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def make_tree(root, counts):
    """root/<class>/<k>.png solid in the class colour; sizes vary (the loader resizes)."""
    for cls, n in counts.items():
        for k in range(n):
            draw(root / cls / f"{k:02d}.png", size=(8 + k, 6 + 2 * k), color=COLORS[cls])
    return root


def test_classes_counts_labels_and_pixels(tmp_path):
    make_tree(tmp_path, {"dog": 4, "cat": 3})
    ds = ImageFolder(tmp_path, image_size=(8, 8), channels=3, val_fraction=0.0, progress=False)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    images, labels = ds.train
    assert images.shape == (7, 3, 8, 8) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert ds.val[0].shape == (0, 3, 8, 8) and len(ds) == 7
    assert np.bincount(labels).tolist() == [3, 4]
    for img, label, path in zip(images, labels, ds.train_paths):
        assert path.parent.name == ds.classes[label]
        assert np.array_equal(img[:, 0, 0], COLORS[ds.classes[label]])  # solid: resize keeps the colour


def test_hidden_and_non_image_files_ignored(tmp_path):
    make_tree(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "cat" / "._00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # would not decode
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    draw(tmp_path / "dog" / ".thumbs" / "t.png")  # hidden folder
    draw(tmp_path / ".hidden_class" / "x.png")
    (tmp_path / "README.md").write_text("root-level file, not a class")
    ds = ImageFolder(tmp_path, image_size=8, val_fraction=0.0, progress=False)
    assert ds.classes == ["cat", "dog"]
    assert sorted(p.name for p, _ in ds.samples) == ["00.png", "00.png", "01.png", "01.png"]


def test_nested_folders_and_uppercase_extensions(tmp_path):
    draw(tmp_path / "cat" / "2019" / "A.PNG")
    draw(tmp_path / "cat" / "b.JPEG", format="JPEG")
    draw(tmp_path / "dog" / "c.bmp")
    ds = ImageFolder(tmp_path, image_size=8, val_fraction=0.0, progress=False)
    assert len(ds) == 3 and np.bincount(ds.train[1]).tolist() == [2, 1]


def test_split_is_seeded_disjoint_and_stratified(tmp_path):
    make_tree(tmp_path, {"cat": 10, "dog": 5, "owl": 6})
    kw = dict(image_size=(6, 6), val_fraction=0.2, progress=False)
    a, b = ImageFolder(tmp_path, seed=3, **kw), ImageFolder(tmp_path, seed=3, **kw)
    assert a.train_paths == b.train_paths and a.val_paths == b.val_paths
    assert np.array_equal(a.train[0], b.train[0]) and np.array_equal(a.val[1], b.val[1])
    assert not set(a.train_paths) & set(a.val_paths)
    assert sorted(a.train_paths + a.val_paths) == sorted(p for p, _ in a.samples)
    assert np.bincount(a.val[1], minlength=3).tolist() == [2, 1, 1]  # round(0.2 n) of each class
    others = [ImageFolder(tmp_path, seed=s, **kw).val_paths for s in range(4, 8)]
    assert any(v != a.val_paths for v in others)  # the seed matters
    flat = ImageFolder(tmp_path, seed=3, stratified=False, **kw)
    assert len(flat.val_paths) == round(21 * 0.2)


def test_exif_orientation_is_applied(tmp_path):
    """A 40x20 (W x H) JPEG, red left half, blue right half, tagged 'rotate 90 CW to display'."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise
    path = tmp_path / "cat" / "rotated.jpg"
    path.parent.mkdir()
    stored.save(path, exif=exif, quality=95)
    img = load_image(path, image_size=None, channels=3)
    assert img.shape == (3, 40, 20)  # portrait now: H 40, W 20
    top, bottom = img[:, :15].reshape(3, -1).mean(1), img[:, 25:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 50  # the red left half turned to the top
    assert bottom[2] > 200 and bottom[0] < 50
    (tmp_path / "dog").mkdir()   # a second class: one class alone is refused
    stored.save(tmp_path / "dog" / "plain.jpg")
    ds = ImageFolder(tmp_path, image_size=(40, 20), val_fraction=0.0, progress=False)
    assert ds.train_paths[0] == path
    assert np.abs(ds.train[0][0].astype(int) - img).max() <= 2  # JPEG draft decoding may differ a little


def test_corrupt_and_truncated_images_reported_by_path(tmp_path):
    make_tree(tmp_path, {"cat": 3, "dog": 3})
    corrupt = tmp_path / "cat" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    full = draw(tmp_path / "dog" / "truncated.jpg", size=(64, 64), format="JPEG")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(full, format="JPEG")
    full.write_bytes(full.read_bytes()[:800])
    with pytest.raises(ValueError) as e:
        ImageFolder(tmp_path, image_size=8, progress=False)
    msg = str(e.value)
    assert "2 unreadable image(s)" in msg and str(corrupt) in msg and str(full) in msg
    assert "truncated" in msg and "skip_bad=True" in msg
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolder(tmp_path, image_size=8, val_fraction=0.5, skip_bad=True, progress=False)
    assert len(ds) == 6 and len(ds.train[0]) + len(ds.val[0]) == 6
    assert {p for p, _ in ds.skipped} == {corrupt, full}
    assert corrupt not in ds.train_paths + ds.val_paths
    for p in (corrupt, full):
        p.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = ImageFolder(tmp_path, image_size=8, val_fraction=0.5, progress=False)
    assert len(good) == 6


def test_load_image_errors_name_the_path(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.jpg"):
        load_image(bad, 8)
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_image(tmp_path / "missing.png", 8)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image(draw(tmp_path / "ok.png"), 8, channels=2)


def test_empty_class_folder_is_reported(tmp_path):
    make_tree(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("only text here")
    with pytest.raises(ValueError, match=r"no images.*" + str(tmp_path / "dog").replace("\\", r"\\")):
        ImageFolder(tmp_path, image_size=8, progress=False)


def test_missing_root_and_no_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", image_size=8)
    draw(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path, image_size=8)


def test_grayscale_and_rgb_conversion(tmp_path):
    rgb = draw(tmp_path / "rgb.png", color=(200, 100, 50))
    gray = draw(tmp_path / "gray.png", mode="L", color=77)
    g = load_image(rgb, 4, channels=1)
    assert g.shape == (1, 4, 4) and np.all(g == Image.open(rgb).convert("L").getpixel((0, 0)))
    c = load_image(gray, (4, 6), channels=3)
    assert c.shape == (3, 4, 6) and np.all(c == 77)


def test_rgba_p_cmyk_and_16bit_inputs(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: shows the white background
    rgba.save(tmp_path / "a.png")
    a = load_image(tmp_path / "a.png", None, 3)
    assert a[:, 0, 0].tolist() == [255, 255, 255] and a[:, 1, 1].tolist() == [255, 0, 0]
    Image.new("RGB", (5, 5), (10, 120, 240)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    p = load_image(tmp_path / "p.png", None, 3)
    assert p.shape == (3, 5, 5) and p[:, 2, 2].tolist() == [10, 120, 240]
    draw(tmp_path / "c.jpg", mode="CMYK", color=(0, 255, 0, 0), format="JPEG")
    c = load_image(tmp_path / "c.jpg", 4, 3)
    assert c.shape == (3, 4, 4) and c[0].min() > 240 and c[1].max() < 15  # magenta
    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert np.all(load_image(tmp_path / "i16.png", None, 1) == 255)  # 16-bit white stays white


def test_prepare_images_shapes_channels_and_resize():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    same = prepare_images(gray, None, 1)
    assert same.shape == (5, 1, 28, 28) and np.array_equal(same[:, 0], gray)
    up = prepare_images(gray, 32, 3, progress=False)
    assert up.shape == (5, 3, 32, 32) and np.array_equal(up[:, 0], up[:, 2])
    ref = np.asarray(Image.fromarray(gray[3]).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(up[3, 1], ref)
    rgb = rng.integers(0, 256, (4, 6, 7, 3), dtype=np.uint8)
    as_gray = prepare_images(rgb, None, 1)  # vectorised luma == PIL's convert('L')
    assert np.array_equal(as_gray[2, 0], np.asarray(Image.fromarray(rgb[2]).convert("L")))
    assert np.array_equal(prepare_images(rgb, (6, 7), 3), rgb.transpose(0, 3, 1, 2))
    small = prepare_images(rgb, (3, 5), 1, progress=False)
    ref = np.asarray(Image.fromarray(rgb[1]).convert("L").resize((5, 3), Image.BILINEAR))
    assert small.shape == (4, 1, 3, 5) and np.array_equal(small[1, 0], ref)


def test_prepare_images_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        prepare_images(np.zeros((2, 4, 4), np.float32), 8, 1)
    with pytest.raises(ValueError, match="shape"):
        prepare_images(np.zeros((2, 4, 4, 2), np.uint8), 8, 1)
    with pytest.raises(ValueError, match="channels"):
        prepare_images(np.zeros((2, 4, 4), np.uint8), 8, 4)


def test_float_images_on_the_0_1_scale_are_not_read_as_black(tmp_path):
    a = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)   # mode F, 0..1
    Image.fromarray(a, "F").save(tmp_path / "float.tif")
    img = load_image(tmp_path / "float.tif", channels=1)
    assert img.shape == (1, 16, 16)
    np.testing.assert_array_equal(img[0], np.rint(a * 255).astype(np.uint8))
    b = a * 200                                                              # mode F, 0..200: kept as is
    Image.fromarray(b, "F").save(tmp_path / "float255.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "float255.tif", channels=1)[0],
                                  np.rint(b).astype(np.uint8))


def test_one_class_is_refused_and_points_one_level_down(tmp_path):
    make_tree(tmp_path / "train", {"cat": 2, "dog": 2})
    with pytest.raises(ValueError, match=r"one class sub-folder \(train\).*try .*train"):
        ImageFolder(tmp_path, image_size=(32, 32), progress=False)


def looped_tree(root):
    """cat and dog with 3 images each, and in cat: a link to '..', a link to cat itself, a link to the
    dataset root, a second link to one real image, and a link to a folder outside the tree."""
    make_tree(root, {"cat": 3, "dog": 3})
    (root / "cat" / "up").symlink_to("..")
    (root / "cat" / "self").symlink_to(".")
    (root / "cat" / "top").symlink_to(root)
    (root / "cat" / "again.png").symlink_to(root / "cat" / "00.png")
    outside = root.parent / "more_cats"
    draw(outside / "x.png", color=COLORS["cat"])
    (root / "cat" / "more").symlink_to(outside)
    return root


def test_symlink_loops_do_not_multiply_a_class(tmp_path):
    root = looped_tree(tmp_path / "pets")
    ds = ImageFolder(root, image_size=(4, 4), val_fraction=0.0)
    names = sorted(str(p.relative_to(root)) for p, _ in ds.samples)
    assert names == ["cat/00.png", "cat/01.png", "cat/02.png", "cat/more/x.png",
                     "dog/00.png", "dog/01.png", "dog/02.png"], names
    assert [k for _, k in ds.samples] == [0, 0, 0, 0, 1, 1, 1]


def test_a_dangling_symlink_is_named_and_skipped_with_skip_bad(tmp_path):
    root = make_tree(tmp_path / "pets", {"cat": 3, "dog": 3})
    (root / "dog" / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(ValueError, match=r"(?s)1 unreadable image.*gone\.png.*dangling symbolic link"):
        ImageFolder(root, image_size=(4, 4), val_fraction=0.0)
    with pytest.warns(UserWarning, match="gone.png"):
        ds = ImageFolder(root, image_size=(4, 4), val_fraction=0.0, skip_bad=True)
    assert len(ds) == 6 and [p.name for p, _ in ds.skipped] == ["gone.png"]
