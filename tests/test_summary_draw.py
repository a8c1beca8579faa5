"""summary(): shapes by propagation agree with a real forward, torchsummary's and torchvision's
numbers for VGG-16; draw_architecture(): a readable PNG for every depth."""
import numpy as np
import pytest

import minivgg
from minivgg.models import VGG, draw_architecture, summary, vgg11, vgg16
from minivgg.models.summary import trace


def real_shapes(model, x):
    """Run the leaves one by one on a real batch and record each output shape."""
    shapes = []
    for name, layer in [(n, m) for n, m in model.modules() if not m.children()]:
        x = layer.forward(x)
        shapes.append((name, tuple(x.shape[1:])))
    return shapes


@pytest.mark.parametrize("arch, kw, size", [
    ("vgg11", dict(pool_size=1), (32, 32)),
    ("vgg13_bn", dict(pool_size=7), (45, 50)),       # odd sizes: floor at every pool
    ("vgg16", dict(head="gap"), (64, 40)),
    ("vgg19_bn", dict(pool_size=2, hidden=(16,)), (33, 35)),
])
def test_shape_propagation_equals_real_forward(arch, kw, size):
    minivgg.seed(0)
    model = VGG(arch, width_ratio=16, num_classes=7, **kw)
    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    rows = trace(model, (3, *size))
    assert [(r["name"], r["out_shape"]) for r in rows] == real_shapes(model, x)
    assert sum(r["params"] for r in rows) == model.num_params()


def test_macs_by_hand_on_a_tiny_model():
    model = vgg11(width_ratio=16, hidden=(8,), pool_size=1, num_classes=3)   # channels 4, 8, 16, 32
    rows = {r["name"]: r for r in trace(model, (3, 32, 32))}
    assert rows["features.0"]["macs"] == 32 * 32 * 4 * 3 * 9            # OH*OW*F*C*KH*KW
    assert rows["features.3"]["macs"] == 16 * 16 * 8 * 4 * 9
    assert rows["features.18"]["macs"] == 2 * 2 * 32 * 32 * 9
    assert rows["classifier.0"]["macs"] == 32 * 8 and rows["classifier.3"]["macs"] == 8 * 3
    assert rows["features.2"]["macs"] == 0                               # max-pool


def test_vgg16_summary_matches_torchsummary_and_torchvision():
    model = vgg16(init="xavier")   # the full 138M model; only shapes are propagated
    text = summary(model, (3, 224, 224))
    lines = text.splitlines()
    assert sum(1 for line in lines if line.startswith(("features.", "classifier.", "avgpool", "flatten"))) == 40
    row = next(line for line in lines if line.startswith("classifier.0 "))
    assert "Linear" in row and "[-1, 4096]" in row and "102,764,544" in row and "102,760,448" in row
    assert "features.30      MaxPool2d          [-1, 512, 7, 7]" in text
    assert "Total params: 138,357,544" in text
    assert "Trainable params: 138,357,544" in text
    # torchvision's documented cost of VGG-16: 15.47 GFLOPS (multiply-adds).
    assert "Mult-adds per sample: 15,470,264,320 (15.47 G)" in text
    # torchsummary on torchvision's vgg16 (with avgpool; the old model without it read 218.59 / 746.96).
    assert "Input size (MB): 0.57" in text
    assert "Forward/backward pass size (MB): 218.78" in text
    assert "Params size (MB): 527.79" in text
    assert "Estimated Total Size (MB): 747.15" in text
    model.features.freeze()
    text = summary(model, (1, 3, 224, 224))
    assert "Trainable params: 123,642,856" in text and "Non-trainable params: 14,714,688" in text
    del model


def test_summary_batch_size_prints_and_checks_input(capsys):
    model = vgg11(width_ratio=8, pool_size=1, hidden=(16, 16), num_classes=4, in_channels=1)
    one = summary(model, (1, 32, 32))
    assert capsys.readouterr().out == ""
    eight = summary(model, (1, 32, 32), batch_size=8, show=True)
    assert capsys.readouterr().out.strip() == eight.strip()
    assert "batch 8" in eight and "32.0 KB" in one and "256.0 KB" in eight   # features.0: 8x32x32 floats
    with pytest.raises(ValueError, match="28x28.*at least 32x32"):
        summary(model, (1, 28, 28))
    with pytest.raises(ValueError, match="in_channels=1"):
        summary(model, (3, 32, 32))


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("arch, kw, shape", [
    ("vgg11", dict(), (3, 224, 224)),
    ("vgg19_bn", dict(), (3, 224, 224)),
    ("vgg16", dict(head="gap", num_classes=10), (3, 224, 224)),
    ("vgg13", dict(in_channels=1, pool_size=1, hidden=(256, 256), num_classes=10), (1, 32, 32)),
])
def test_draw_architecture_writes_a_png(arch, kw, shape, tmp_path):
    # width_ratio=8 keeps the build fast; the drawing reads channels and sizes from the model.
    model = VGG(arch, width_ratio=8, **kw)
    path = draw_architecture(model, shape, tmp_path / f"{arch}.png", dpi=50)
    w, h = _png_size(path)
    assert 400 < w < 1400 and 250 < h < 400     # about 8-26 x 6.2 inches
    # Deeper networks draw wider, not smaller.
    if arch == "vgg19_bn":
        w11, _ = _png_size(draw_architecture(VGG("vgg11", width_ratio=8), shape, tmp_path / "a.png", dpi=50))
        assert w > w11


def test_draw_rejects_too_small_input(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        draw_architecture(vgg11(width_ratio=8, pool_size=1), (3, 28, 28), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_title_unit_fits_the_model_size():
    from minivgg.models.draw import format_macs
    assert format_macs(15_470_264_320) == "15.47 G"      # VGG-16 at 224x224
    assert format_macs(2_345_678) == "2.3 M"              # a width-1/8 VGG-11 at 32x32 read "0.00 G"
    assert format_macs(920_000) == "920.0 K"
    assert format_macs(512) == "512"
    model = vgg11(width_ratio=8, hidden=(256, 256), pool_size=1, num_classes=10, in_channels=1)
    macs = sum(r["macs"] for r in trace(model, (1, 32, 32)))   # the README's default model
    assert 1e6 <= macs < 1e9 and format_macs(macs) == f"{macs / 1e6:.1f} M"
