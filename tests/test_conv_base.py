"""ConvBase (include_top=False) equals torchvision's features + pooling; its backward is gradchecked."""
import numpy as np
import pytest

import minivgg
from minivgg.gradcheck import check_layer
from minivgg.models import VGG
from minivgg.models.conv_base import ConvBase, GlobalMaxPool2d

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("pooling", [None, "avg", "max"])
def test_features_equal_torch_features_then_pooling(pooling):
    from minivgg.models.torch_interop import to_torch
    minivgg.seed(0)
    model = VGG("vgg11", num_classes=4, in_channels=3, width_ratio=8, hidden=(16,), pool_size=1)
    twin = to_torch(model).eval()
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    base = ConvBase(model, pooling)
    got = base.extract(x, batch_size=2, progress=False)
    with torch.no_grad():
        f = twin.features(torch.from_numpy(x))
        want = {None: f, "avg": f.mean(dim=(2, 3)), "max": f.amax(dim=(2, 3))}[pooling].numpy()
    assert got.shape == want.shape == ((5, 64, 2, 2) if pooling is None else (5, 64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert base.features is model.features      # shared, not copied


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_conv_base_backward_equals_torch_autograd(pooling):
    """The pools are gradchecked on their own (below; the features' layers in test_gradcheck.py)."""
    from minivgg.models.torch_interop import to_torch
    minivgg.seed(2)
    model = VGG("vgg11_bn", num_classes=3, in_channels=1, width_ratio=16, hidden=(8,), pool_size=1)
    model.eval()
    twin = to_torch(model).eval()
    x = np.random.default_rng(3).normal(size=(2, 1, 64, 64)).astype(np.float32)
    dout = np.random.default_rng(4).normal(size=(2, 32)).astype(np.float32)
    base = ConvBase(model, pooling)
    base.features.layers[0].needs_input_grad = True
    base.forward(x)
    dx = base.backward(dout)
    xt = torch.from_numpy(x).requires_grad_(True)
    f = twin.features(xt)
    y = f.mean(dim=(2, 3)) if pooling == "avg" else f.amax(dim=(2, 3))
    y.backward(torch.from_numpy(dout))
    want = xt.grad.numpy()
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    w = twin.features[0].weight.grad.numpy()
    np.testing.assert_allclose(model.features.layers[0].grads["weight"], w, rtol=1e-4,
                               atol=1e-4 * np.abs(w).max())


def test_global_max_pool_gradcheck_and_first_maximum_on_ties():
    rng = np.random.default_rng(1)
    x = rng.permutation(2 * 3 * 5 * 4).reshape(2, 3, 5, 4).astype(np.float64) / 7  # no ties
    errors = check_layer(GlobalMaxPool2d(), x)
    assert set(errors) == {"x"} and errors["x"] < 1e-6, errors
    tie = np.zeros((1, 1, 2, 2))
    pool = GlobalMaxPool2d()
    pool.forward(tie)
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1))), [[[[1, 0], [0, 0]]]])


def test_bad_arguments_are_named():
    minivgg.seed(0)
    model = VGG("vgg11", num_classes=4, in_channels=1, width_ratio=8, hidden=(16,), pool_size=1)
    with pytest.raises(ValueError, match="pooling must be one of"):
        ConvBase(model, "mean")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\)"):
        ConvBase(model).extract(np.zeros((3, 32, 32), np.float32))
