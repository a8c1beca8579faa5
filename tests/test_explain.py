"""Grad-CAM, saliency and block feature maps against PyTorch autograd on the same weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minivgg  # noqa: E402
from minivgg.models import VGG  # noqa: E402
from minivgg.models.explain import (block_feature_maps, grad_cam, saliency,  # noqa: E402
                                    upsample_bilinear)
from minivgg.models.torch_interop import to_torch  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    minivgg.seed(3)
    model = VGG("vgg11_bn", num_classes=5, in_channels=3, width_ratio=8, hidden=(32,), pool_size=2)
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    model.train()
    model.forward(np.random.default_rng(1).normal(size=(8, 3, 64, 64)).astype(np.float32))  # BN stats
    model.eval()
    return model, to_torch(model).eval(), x


def _torch_cam(twin, x, c, split):
    acts = {}
    h = twin.features[split].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    xt = torch.from_numpy(x).requires_grad_(True)
    y = twin(xt)
    h.remove()
    a = acts["a"]
    a.retain_grad()
    y[0, c].backward()
    alpha = a.grad[0].mean(dim=(1, 2))
    cam = torch.relu((alpha[:, None, None] * a[0]).sum(0))
    return y.detach().numpy()[0], alpha.numpy(), cam.detach().numpy(), xt.grad[0].numpy()


@pytest.mark.parametrize("target", [None, 0, 3])
def test_grad_cam_and_saliency_equal_torch_autograd(pair, target):
    model, twin, x = pair
    got = grad_cam(model, x, target=target)
    split = max(i for i, m in enumerate(twin.features) if isinstance(m, torch.nn.ReLU))
    logits, alpha, cam, dx = _torch_cam(twin, x, got["class"], split)
    if target is None:
        assert got["class"] == int(np.argmax(logits))
    np.testing.assert_allclose(got["logits"], logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_allclose(got["alpha"], alpha, rtol=1e-4, atol=1e-4 * np.abs(alpha).max())
    np.testing.assert_allclose(got["cam"], cam, rtol=1e-4, atol=1e-4 * max(cam.max(), 1e-6))
    assert got["cam"].shape == (4, 4) and got["heatmap"].shape == (64, 64)
    assert got["heatmap"].max() == pytest.approx(1.0) or got["cam"].max() == 0
    sal = saliency(model, x, target=got["class"])
    np.testing.assert_allclose(sal["gradient"], dx, rtol=1e-4, atol=1e-4 * np.abs(dx).max())
    np.testing.assert_allclose(sal["map"], np.abs(dx).max(axis=0), rtol=1e-4,
                               atol=1e-4 * np.abs(dx).max())


def test_upsampling_equals_torch_interpolate():
    m = np.random.default_rng(2).random((3, 5))
    want = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(13, 8),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(upsample_bilinear(m, (13, 8)), want, rtol=1e-12, atol=1e-12)


def test_block_feature_maps_halve_in_size_and_grow_in_number(pair):
    model, twin, x = pair
    maps = block_feature_maps(model, x)
    assert [n for n, _ in maps] == [f"block{i}" for i in range(1, 6)]
    assert [m.shape for _, m in maps] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4),
                                          (64, 2, 2)]
    with torch.no_grad():
        ref = twin.features(torch.from_numpy(x)).numpy()[0]
    np.testing.assert_allclose(maps[-1][1], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_explain_refuses_a_batch_and_a_class_out_of_range(pair):
    model, _, x = pair
    with pytest.raises(ValueError, match=r"one image as a batch of shape \(1, C, H, W\)"):
        grad_cam(model, np.concatenate([x, x]))
    with pytest.raises(ValueError, match=r"class 9 is outside the model's 5 classes"):
        saliency(model, x, target=9)
