"""ImageNet-style VGG weights in torchvision's and timm's layouts, as .pth and .safetensors.

Each file is written from a torch module holding random weights (nothing is downloaded):
torchvision's layout is the torch twin of a minivgg VGG (its state_dict keys are
torchvision's); timm's is a torch module built as timm's VGG is (features, then ConvMlp's
7x7 and 1x1 convolutions, then a Linear head). minivgg's logits after loading must equal
the torch module's own forward, float32 tolerance.
"""
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import minivgg  # noqa: E402
from minivgg.models import VGG  # noqa: E402
from minivgg.models.pretrained import (imagenet_classes, imagenet_preprocess, load_pretrained,  # noqa: E402
                                       read_safetensors, vgg_config_of)
from minivgg.models.torch_interop import to_torch  # noqa: E402

ARCHS = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
SMALL = dict(num_classes=7, in_channels=3, width_ratio=8, hidden=(24, 20), pool_size=7)


def _randomise_bn(model):
    """Non-trivial running statistics and affine parameters, so BN's mapping is tested too."""
    rng = np.random.default_rng(1)
    for _, m in model.modules():
        if hasattr(m, "buffers") and "running_mean" in getattr(m, "buffers", {}):
            c = m.buffers["running_mean"].shape[0]
            m.buffers["running_mean"][...] = rng.normal(0, 0.1, c)
            m.buffers["running_var"][...] = rng.uniform(0.5, 1.5, c)
            m.params["weight"][...] = rng.uniform(0.5, 1.5, c)
            m.params["bias"][...] = rng.normal(0, 0.1, c)


def _torchvision_module(arch, **kw):
    minivgg.seed(0)
    model = VGG(arch, **kw)
    _randomise_bn(model)
    twin = to_torch(model).eval()
    return twin


class _TimmVGG(torch.nn.Module):
    """timm's VGG structure: features -> ConvMlp (fc1 PxP conv, fc2 1x1 conv) -> pool -> head.fc."""

    def __init__(self, features, fc1, fc2, fc, pool):
        super().__init__()
        self.features, self.pool = features, pool
        self.pre_logits = torch.nn.Module()
        self.pre_logits.fc1, self.pre_logits.fc2 = fc1, fc2
        self.head = torch.nn.Module()
        self.head.fc = fc

    def forward(self, x):
        x = self.features(x)
        if x.shape[-1] < self.pool:                 # as timm's ConvMlp does for small inputs
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.pool)
        x = torch.relu(self.pre_logits.fc1(x))
        x = torch.relu(self.pre_logits.fc2(x))
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head.fc(x)


def _timm_module(twin, pool):
    lin = [m for m in twin.classifier if isinstance(m, torch.nn.Linear)]
    c = lin[0].in_features // (pool * pool)
    fc1 = torch.nn.Conv2d(c, lin[0].out_features, pool)
    fc2 = torch.nn.Conv2d(lin[1].in_features, lin[1].out_features, 1)
    with torch.no_grad():
        fc1.weight.copy_(lin[0].weight.reshape(fc1.weight.shape))
        fc1.bias.copy_(lin[0].bias)
        fc2.weight.copy_(lin[1].weight.reshape(fc2.weight.shape))
        fc2.bias.copy_(lin[1].bias)
    return _TimmVGG(twin.features, fc1, fc2, lin[2], pool).eval()


def _compare(model, module, size, seed=0):
    x = np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)
    model.eval()
    ours = model.forward(x)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * scale + 1e-7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout,fmt", [("torchvision", "pth"), ("torchvision", "safetensors"),
                                        ("timm", "safetensors"), ("timm", "pth")])
def test_logits_equal_the_torch_module_the_file_came_from(arch, layout, fmt, tmp_path):
    twin = _torchvision_module(arch, **SMALL)
    module = twin if layout == "torchvision" else _timm_module(twin, SMALL["pool_size"])
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if layout == "timm":
        assert "pre_logits.fc1.weight" in state and state["pre_logits.fc1.weight"].ndim == 4
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        safetensors_torch.save_file(state, str(path))
    model = load_pretrained(path)
    assert model.arch == arch
    assert model.config["hidden"] == [24, 20] and model.config["num_classes"] == 7
    _compare(model, module, size=32)


def test_full_size_vgg11_at_224_in_timm_layout(tmp_path):
    """ImageNet's shapes: 1,000 classes, 4096-wide head, a 7x7 fc1 kernel over a 7x7 map."""
    twin = _torchvision_module("vgg11", num_classes=1000)
    module = _timm_module(twin, 7)
    safetensors_torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                                str(tmp_path / "vgg11.safetensors"))
    del twin
    model = load_pretrained(tmp_path / "vgg11.safetensors")
    assert model.config["hidden"] == [4096, 4096] and model.config["pool_size"] == 7
    _compare(model, module, size=224)


def test_read_safetensors_agrees_with_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
               "b": torch.from_numpy(rng.normal(size=(5,))).to(torch.float64),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "h": torch.from_numpy(rng.normal(size=(2, 2)).astype(np.float16)),
               "bf": torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16)}
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].dtype == want.dtype and got[k].shape == want.shape
        np.testing.assert_array_equal(got[k], want)


def _small_safetensors(tmp_path, arch="vgg11"):
    twin = _torchvision_module(arch, **SMALL)
    path = tmp_path / f"{arch}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(path))
    return path


def test_another_architecture_is_named(tmp_path):
    path = _small_safetensors(tmp_path, "vgg13")
    with pytest.raises(ValueError, match=r"holds vgg13 weights, not vgg16"):
        load_pretrained(path, arch="vgg16")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = _small_safetensors(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors: tensor .*\(truncated or corrupt\)"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"shorter than the 8-byte header length"):
        read_safetensors(tmp_path / "tiny.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"truncated: its header claims"):
        read_safetensors(tmp_path / "head.safetensors")


def test_a_pickle_that_is_not_weights_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": Boom()}))
    with pytest.raises(ValueError, match=r"evil.pth: not a file of weights that torch.load"):
        load_pretrained(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"not a state_dict of tensors"):
        load_pretrained(tmp_path / "list.pth")


def test_weights_of_something_else_are_not_a_vgg(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8, 2))
    safetensors_torch.save_file(net.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"not VGG weights"):
        load_pretrained(tmp_path / "other.safetensors")
    config = vgg_config_of({k: v.numpy() for k, v in
                            _torchvision_module("vgg16_bn", **SMALL).state_dict().items()})
    assert config["arch"] == "vgg16_bn" and config["width_ratio"] == 8


def test_a_new_head_for_fine_tuning_keeps_every_other_weight(tmp_path):
    path = _small_safetensors(tmp_path)
    base = load_pretrained(path)
    tuned = load_pretrained(path, num_classes=3)
    assert tuned.config["num_classes"] == 3
    a, b = base.state_dict(), tuned.state_dict()
    for k in a:
        if k.startswith("classifier.6."):
            assert b[k].shape[0] == 3
        else:
            np.testing.assert_array_equal(a[k], b[k])


def test_imagenet_class_names_ship_with_the_package():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) >= 998   # 'crane' and 'maillot' appear twice
    assert names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"


def test_imagenet_preprocessing_resizes_the_short_side_crops_the_centre_and_normalises():
    from PIL import Image
    from minivgg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    img = np.zeros((300, 600, 3), np.uint8)          # 600 wide, 300 high: 512x256 after resize
    img[:, :, 0] = 200
    img[100:200, 250:350, 1] = 255                   # a green square in the centre
    x = imagenet_preprocess(Image.fromarray(img).convert("RGBA"))   # RGBA in, RGB out
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    want_r = (200 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    np.testing.assert_allclose(x[0, 0], want_r, rtol=1e-5)
    green = (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    np.testing.assert_allclose(x[0, 1, 112, 112], green, rtol=1e-5)      # the centre is kept
    np.testing.assert_allclose(x[0, 1, 0, 0], -IMAGENET_MEAN[1] / IMAGENET_STD[1], rtol=1e-5)


def test_predict_prints_imagenet_top5_with_pretrained_weights(tmp_path):
    """predict.py --pretrained: ImageNet's class names and the model's own top-5, from a file."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image
    root = Path(__file__).resolve().parents[1]
    twin = _torchvision_module("vgg11", num_classes=1000, width_ratio=16, hidden=(32, 32))
    safetensors_torch.save_file({k: v.contiguous() for k, v in twin.state_dict().items()},
                                str(tmp_path / "w.safetensors"))
    img = (np.random.default_rng(0).random((300, 260, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "cat.png")
    r = subprocess.run([sys.executable, str(root / "examples" / "predict.py"), "--pretrained",
                        "w.safetensors", "cat.png"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cat.png" and len(lines) == 6
    x = imagenet_preprocess(Image.open(tmp_path / "cat.png"))
    with torch.no_grad():
        p = torch.softmax(twin(torch.from_numpy(x)), 1)[0].numpy()
    names = imagenet_classes()
    for line, c in zip(lines[1:], np.argsort(-p)[:5]):
        assert names[c] in line and f"{p[c]:7.2%}".strip() in line
    r = subprocess.run([sys.executable, str(root / "examples" / "predict.py"), "--pretrained",
                        "missing.safetensors", "cat.png"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 2 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr
