"""predict.py on images too large to decode safely: refused by a pixel limit (--max-pixels) before decoding."""
import pytest
from PIL import Image

from deploy_helpers import fashion_checkpoint
from test_cli import PREDICT, cli

from minivgg.data.folder import TooManyPixelsError, load_image


def test_load_image_refuses_more_pixels_than_allowed_before_decoding(tmp_path):
    Image.new("L", (8000, 8000)).save(tmp_path / "big.png")   # 64 M pixels in a few tens of kB
    with pytest.raises(TooManyPixelsError, match=r"big\.png of 8000x8000 pixels is larger than the 40,000,000"):
        load_image(tmp_path / "big.png", (32, 32), 1, max_pixels=40_000_000)
    assert load_image(tmp_path / "big.png", (4, 4), 1, max_pixels=64_000_000).shape == (1, 4, 4)


def test_predict_refuses_a_huge_image_in_one_line_naming_the_flag(tmp_path):
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    Image.new("L", (8000, 8000)).save(tmp_path / "big.png")
    r = cli(PREDICT, "--checkpoint", ckpt, tmp_path / "big.png", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "8000x8000 pixels is larger than" in lines[0] and "--max-pixels" in lines[0], r.stderr
    Image.new("L", (50, 40)).save(tmp_path / "small.png")
    r = cli(PREDICT, "--checkpoint", ckpt, "--max-pixels", "1000", tmp_path / "small.png", cwd=tmp_path)
    assert r.returncode == 2 and "50x40 pixels is larger than the 1,000" in r.stderr, r.stderr
    r = cli(PREDICT, "--checkpoint", ckpt, "--max-pixels", "2000", tmp_path / "small.png", cwd=tmp_path)
    assert r.returncode == 0 and "small.png" in r.stdout, r.stderr


def test_predict_explain_writes_gradcam_saliency_and_block_maps(tmp_path):
    """--explain: three PNGs per image, the Grad-CAM one drawn from the heatmap grad_cam computes
    (grad_cam and saliency themselves are checked against torch autograd in test_explain.py)."""
    import numpy as np
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)).save(tmp_path / "shoe.png")
    r = cli(PREDICT, "--checkpoint", ckpt, "--explain", tmp_path / "why", tmp_path / "shoe.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for kind in ("gradcam", "saliency", "blocks"):
        path = tmp_path / "why" / f"shoe_{kind}.png"
        assert path.is_file(), r.stdout
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 50
    assert "explained" in r.stdout and "shoe_gradcam.png" in r.stdout
    (tmp_path / "afile").write_text("x")
    r = cli(PREDICT, "--checkpoint", ckpt, "--explain", tmp_path / "afile", tmp_path / "shoe.png", cwd=tmp_path)
    assert r.returncode in (2, 4) and r.stderr.strip().startswith("error:"), r.stderr
