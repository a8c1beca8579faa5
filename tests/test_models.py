"""The VGG zoo: torchvision's parameter counts, the paper's layer tables, config round trips,
input checks with useful messages, heads, widths and the statistics of both inits."""
import json
import math

import numpy as np
import pytest

import minivgg
from minivgg.layers import BatchNorm2d, Conv2d, Dropout, Linear, MaxPool2d, ReLU
from minivgg.models import (CONFIGS, VGG, build_model, vgg11, vgg11_bn, vgg13, vgg16, vgg16_bn,
                            vgg19, vgg19_bn)


def small(make=vgg11, **kw):
    """A VGG that runs on 32x32 inputs in milliseconds."""
    args = dict(width_ratio=8, pool_size=1, hidden=(32, 32), num_classes=5)
    args.update(kw)
    return make(**args)


# -- torchvision's parameter counts (1000 classes, 224x224) --------------------------------
# init="xavier" only because its uniform draws are faster than normal ones; counts don't care.
@pytest.mark.parametrize("make, kwargs, expected", [
    (vgg11, {}, 132_863_336),
    (vgg13, {}, 133_047_848),
    (vgg16, {}, 138_357_544),
    (vgg19, {}, 143_667_240),
    (vgg16_bn, {}, 138_365_992),
    (vgg16, {"num_classes": 3}, 134_272_835),
    (vgg16, {"num_classes": 3, "hidden": (1024, 256)}, 40_668_995),   # the "lightweight" VGG-16
], ids=["vgg11", "vgg13", "vgg16", "vgg19", "vgg16_bn", "vgg16_3cls", "vgg16_light"])
def test_parameter_counts_equal_torchvision(make, kwargs, expected):
    model = make(init="xavier", **kwargs)
    assert model.num_params() == expected
    assert sum(p.size for p in model.state_dict().values() if p.dtype.kind == "f") >= expected
    del model


# -- the paper's Table 1 ------------------------------------------------------------------
# Written out by hand from the paper (conv3-N, maxpool), independent of CONFIGS.
TABLE1 = {
    "vgg11": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "vgg13": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "vgg16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "vgg19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}
WEIGHT_LAYERS = {"vgg11": 11, "vgg13": 13, "vgg16": 16, "vgg19": 19}


def sequence(model):
    """The features as the paper writes them: conv out-channels and 'M'; BN and ReLU checked."""
    out, layers = [], list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.stride == (1, 1)
            out.append(str(layer.out_channels))
            nxt = layers[i + 1]
            if isinstance(nxt, BatchNorm2d):
                assert nxt.num_features == layer.out_channels
                nxt = layers[i + 2]
            assert isinstance(nxt, ReLU)
        elif isinstance(layer, MaxPool2d):
            assert layer.kernel_size == (2, 2) and layer.stride == (2, 2)
            out.append("M")
    return " ".join(out)


@pytest.mark.parametrize("arch", list(TABLE1))
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_config_table_layer_sequence(arch, bn):
    model = VGG(arch + ("_bn" if bn else ""), width_ratio=16, hidden=(8, 8), pool_size=1)
    assert sequence(model) == TABLE1[arch].replace("64", "4").replace("128", "8").replace(
        "256", "16").replace("512", "32")
    convs = [m for m in model.features if isinstance(m, Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, Linear)]
    assert len(convs) + len(linears) == WEIGHT_LAYERS[arch]
    assert sum(isinstance(m, BatchNorm2d) for m in model.features) == (len(convs) if bn else 0)
    assert " ".join(str(v) for v in CONFIGS["ABDE"[list(TABLE1).index(arch)]]) == TABLE1[arch]


def test_state_dict_keys_are_torchvisions():
    # torchvision.models.vgg11().state_dict().keys(), written out.
    expected = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13, 16, 18) for p in ("weight", "bias")]
    expected += [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert list(small(vgg11).state_dict()) == expected
    bn = small(vgg11_bn).state_dict()
    assert "features.1.running_var" in bn and "features.1.num_batches_tracked" in bn
    assert max(int(k.split(".")[1]) for k in bn if k.startswith("features")) == 26  # vgg11_bn
    assert max(int(k.split(".")[1]) for k in small(vgg19_bn).state_dict() if k.startswith("features")) == 50
    # vgg16: features.28 is the last conv, as torchvision (features has 31 layers).
    assert len(small(vgg16).features) == 31 and isinstance(small(vgg16).features[28], Conv2d)


# -- config round trip --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(arch="vgg13_bn", num_classes=7, in_channels=1, width_ratio=8, head="classic",
         hidden=(24, 12), pool_size=2, dropout=0.25, init="xavier"),
    dict(arch="vgg11", num_classes=3, width_ratio=16, head="gap"),
])
def test_build_model_round_trip(kwargs):
    minivgg.seed(3)
    model = VGG(**kwargs)
    cfg = json.loads(json.dumps(model.config))      # as a checkpoint stores it
    assert cfg["arch"] == kwargs["arch"]
    minivgg.seed(3)
    again = build_model(cfg)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])   # same seed -> same weights
    x = np.random.default_rng(0).standard_normal((2, kwargs.get("in_channels", 3), 32, 32)).astype(np.float32)
    model.eval(), again.eval()
    np.testing.assert_array_equal(model.forward(x), again.forward(x))


def test_build_model_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown config keys.*colour"):
        build_model({"arch": "vgg11", "colour": "red"})
    with pytest.raises(ValueError, match="unknown VGG architecture 'vgg12'.*vgg16_bn"):
        build_model({"arch": "vgg12"})
    with pytest.raises(ValueError, match="head"):
        vgg11(head="dense")
    with pytest.raises(ValueError, match="init"):
        vgg11(init="orthogonal")
    with pytest.raises(ValueError, match="width_ratio"):
        vgg11(width_ratio=128)
    with pytest.raises(ValueError, match="num_classes"):
        vgg11(num_classes=0)


def test_seed_makes_init_repeatable():
    minivgg.seed(11)
    a = small().state_dict()
    minivgg.seed(11)
    b = small().state_dict()
    c = small().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.0.weight"], c["features.0.weight"])


# -- width_ratio, in_channels, heads ---------------------------------------------------------
def test_width_ratio_and_grayscale():
    model = vgg11(width_ratio=4, in_channels=1, num_classes=10, pool_size=1, hidden=(64, 64))
    convs = [m for m in model.features if isinstance(m, Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert model.params == {} and convs[0].params["weight"].shape == (16, 1, 3, 3)
    assert model.classifier[0].params["weight"].shape == (64, 128)   # hidden widths set separately
    y = model.forward(np.zeros((2, 1, 32, 32), np.float32))
    assert y.shape == (2, 10) and y.dtype == np.float32
    dx = model.backward(np.ones_like(y))
    assert dx.shape == (2, 1, 32, 32)


def test_classic_head_pool_size_7_on_small_input():
    # torchvision's head on a 32x32 input: the 1x1 map is copied into 7x7 bins.
    model = small(pool_size=7)
    assert model.classifier[0].in_features == 64 * 49
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert model.forward(x).shape == (2, 5)


def test_gap_head():
    model = vgg16(head="gap", num_classes=4, width_ratio=8)
    assert model.avgpool.output_size == (1, 1)
    linears = [m for m in model.classifier if isinstance(m, Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (64, 4)
    assert model.config["hidden"] == []
    rng = np.random.default_rng(0)
    for size in (32, 48, 64):   # global pooling takes any size of at least 32
        y = model.forward(rng.standard_normal((2, 3, size, size)).astype(np.float32))
        assert y.shape == (2, 4)
    # A Keras-style Dense layer between pool and logits.
    with_dense = vgg11(head="gap", hidden=(16,), width_ratio=8, num_classes=4)
    assert [type(m).__name__ for m in with_dense.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]


def test_custom_hidden_and_dropout():
    model = vgg16(num_classes=3, hidden=(1024, 256), dropout=0.3, width_ratio=8, pool_size=1)
    assert [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, Linear)] == \
        [(64, 1024), (1024, 256), (256, 3)]
    assert [m.p for m in model.classifier if isinstance(m, Dropout)] == [0.3, 0.3]
    assert [type(m).__name__ for m in vgg11(hidden=(), width_ratio=8, pool_size=1).classifier] == ["Linear"]


# -- input checks ---------------------------------------------------------------------------------
def test_too_small_input_names_size_and_minimum_not_cli_flags():
    model = small()
    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((2, 3, 28, 28), np.float32))    # raw Fashion-MNIST
    msg = str(e.value)
    assert "28x28" in msg and "at least 32x32" in msg
    assert "--" not in msg                     # a library error carries facts; the CLI adds advice
    with pytest.raises(ValueError, match="31x40"):
        model.forward(np.zeros((1, 3, 31, 40), np.float32))
    assert model.forward(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 5)


def test_channel_mismatch_message():
    gray = small(in_channels=1)
    with pytest.raises(ValueError, match="in_channels=1.*3 channels.*in_channels=3"):
        gray.forward(np.zeros((2, 3, 32, 32), np.float32))
    rgb = small()
    with pytest.raises(ValueError, match="in_channels=3.*1 channels"):
        rgb.forward(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        rgb.forward(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        rgb.forward(np.zeros((3, 32, 32), np.float32))


# -- init statistics ------------------------------------------------------------------------------
def _assert_std(w, std, what):
    """Sample std within 6 standard errors of the target: se(s) ~ std / sqrt(2n) for a normal."""
    n = w.size
    tol = 6 * std / math.sqrt(2 * n)
    assert abs(float(w.std()) - std) < tol, f"{what}: std {w.std():.5g}, expected {std:.5g} +- {tol:.2g}"
    assert abs(float(w.mean())) < 6 * std / math.sqrt(n), f"{what}: mean {w.mean():.3g} is not ~0"


def test_kaiming_init_statistics():
    minivgg.seed(0)
    model = vgg11_bn(width_ratio=2, hidden=(512, 512), pool_size=1, num_classes=10)
    for name, m in model.modules():
        if isinstance(m, Conv2d):
            F, C, KH, KW = m.params["weight"].shape
            _assert_std(m.params["weight"], math.sqrt(2.0 / (F * KH * KW)), name)   # fan_out, ReLU gain
            assert not m.params["bias"].any()
        elif isinstance(m, Linear):
            _assert_std(m.params["weight"], 0.01, name)
            assert not m.params["bias"].any()
        elif isinstance(m, BatchNorm2d):
            assert (m.params["weight"] == 1).all() and not m.params["bias"].any()


def test_xavier_init_statistics():
    minivgg.seed(0)
    model = vgg11(width_ratio=2, hidden=(512, 512), pool_size=1, num_classes=10, init="xavier")
    for name, m in model.modules():
        if isinstance(m, (Conv2d, Linear)):
            w = m.params["weight"]
            fan_in, fan_out = int(np.prod(w.shape[1:])), w.shape[0] * int(np.prod(w.shape[2:]))
            a = math.sqrt(6.0 / (fan_in + fan_out))
            assert np.abs(w).max() <= a and np.abs(w).max() > 0.95 * a, name   # U(-a, a) fills its range
            # The std of U(-a, a) is a/sqrt(3); the std of the sample std is ~ a/sqrt(3) * sqrt(0.2/n)
            n = w.size
            assert abs(float(w.std()) - a / math.sqrt(3)) < 6 * a / math.sqrt(3) * math.sqrt(0.2 / n), name
            assert not m.params["bias"].any()


def test_init_is_not_the_layer_default():
    # Kaiming's conv std sqrt(2/fan_out) for the first conv (F=64): 0.0589; the layer default
    # U(+-1/sqrt(27)) has std 0.111. A model that forgot init_weights fails here.
    minivgg.seed(0)
    w = vgg11(width_ratio=1, hidden=(8, 8), pool_size=1).features[0].params["weight"]
    assert abs(w.std() - math.sqrt(2 / (64 * 9))) < 0.006


# -- forward/backward composition -------------------------------------------------------------
def test_backward_matches_numerical_gradient_float64():
    """A whole (tiny) VGG in float64: dL/dx against central differences on a few inputs."""
    from minivgg.gradcheck import relative_error
    minivgg.seed(1)
    model = vgg11(width_ratio=16, hidden=(8,), pool_size=1, num_classes=3, dropout=0.0).astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32, 32))
    G = rng.standard_normal((2, 3))
    model.forward(x)
    dx = model.backward(G)
    idx = [tuple(rng.integers(0, s) for s in x.shape) for _ in range(12)]
    num, h = [], 1e-6
    for i in idx:
        old = x[i]
        x[i] = old + h
        fp = float((model.forward(x) * G).sum())
        x[i] = old - h
        fm = float((model.forward(x) * G).sum())
        x[i] = old
        num.append((fp - fm) / (2 * h))
    assert relative_error(np.array([dx[i] for i in idx]), np.array(num)) < 1e-6


def test_same_results_on_every_device(device):
    """The VGG on `device` (NumPy, or CuPy where a GPU is present) against the CPU model."""
    from minivgg import backend
    from minivgg.gradcheck import relative_error
    minivgg.seed(4)
    cpu = small(vgg11_bn, dropout=0.0)
    moved = build_model(cpu.config)
    moved.load_state_dict(cpu.state_dict())
    moved.to(device)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    G = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    y = cpu.forward(x)
    dx = cpu.backward(G)
    y_d = moved.forward(backend.to_device(x, device))
    dx_d = moved.backward(backend.to_device(G, device))
    assert relative_error(y_d, y) < 1e-5 and relative_error(dx_d, dx) < 1e-4
    grads = {n: g for n, _, g in moved.named_parameters()}
    for n, _, g in cpu.named_parameters():
        if not (n.startswith("features.") and n.endswith(".bias") and g is not None
                and np.linalg.norm(g) < 1e-6):      # conv biases before BN: exact gradient 0
            assert relative_error(grads[n], g) < 1e-4, n
