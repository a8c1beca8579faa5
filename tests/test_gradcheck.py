# Every hand-written backward pass, checked against central differences in float64:
# dx and every parameter gradient of every layer, over shapes chosen to hit the edge cases.
import numpy as np
import pytest

from minivgg import backend, random_stream
from minivgg.gradcheck import check_function, check_layer
from minivgg.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                            MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy)

TOL = 1e-6   # float64 central differences with h = 1e-6 give about 1e-9 on a right gradient


def away_from_zero(rng, shape, gap=1e-2):
    """Normal samples pushed at least `gap` from 0, so ReLU's kink is never crossed."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, x + gap, x - gap)


def distinct(rng, shape, step=0.05):
    """A scaled random permutation: every value differs from every other by >= step (no pool ties)."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - np.prod(shape) / 2) * step


def assert_gradcheck(layer, x, device, seed=0):
    """Run check_layer in float64 on `device`; every key (x and every parameter) must pass."""
    layer.astype(np.float64).to(device)
    x = backend.to_device(np.asarray(x, dtype=np.float64), device)
    errors = check_layer(layer, x, seed=seed)
    expected = {"x"} | {name for name, _, _ in layer.named_parameters(trainable_only=False)}
    assert set(errors) == expected, f"check_layer skipped gradients: {expected - set(errors)}"
    assert max(errors.values()) < TOL, f"{layer!r}: {errors}"
    return errors


# (N, C, H, W, F, kernel, stride, padding, bias)
CONV_CASES = [
    (1, 1, 5, 5, 2, 1, 1, 0, True),             # batch 1, kernel 1
    (2, 3, 5, 7, 2, 3, 1, 1, True),             # odd, non-square image, "same" padding
    (1, 2, 7, 6, 3, 5, 2, 2, True),             # kernel 5, stride 2, padding 2
    (2, 2, 6, 5, 2, 3, 2, 0, False),            # stride 2, no bias, odd width
    (1, 2, 5, 6, 2, (1, 3), (2, 1), (0, 1), True),  # non-square kernel, stride, padding
    (2, 1, 3, 4, 2, 5, 1, 2, True),             # kernel larger than the unpadded image
]


@pytest.mark.parametrize("N,C,H,W,F,k,s,p,bias", CONV_CASES)
def test_conv2d(device, rng, N, C, H, W, F, k, s, p, bias):
    layer = Conv2d(C, F, k, stride=s, padding=p, bias=bias)
    errors = assert_gradcheck(layer, rng.standard_normal((N, C, H, W)), device)
    assert ("bias" in errors) == bias


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4, 6)])
def test_relu(device, rng, shape):
    assert_gradcheck(ReLU(), away_from_zero(rng, shape), device)


# (N, C, H, W, kernel, stride, padding)
POOL_CASES = [
    (2, 2, 6, 6, 2, None, 0),        # the VGG pool
    (1, 2, 7, 9, 3, 2, 0),           # overlapping windows, odd sizes
    (2, 1, 5, 6, 3, 2, 1),           # overlapping, with padding
    (1, 2, 5, 7, (2, 3), (1, 2), 0), # non-square window and stride
    (1, 1, 4, 5, 3, 1, 1),           # stride 1, padding 1
    (1, 1, 1, 1, 1, 1, 0),           # 1x1 image, 1x1 window
]


@pytest.mark.parametrize("N,C,H,W,k,s,p", POOL_CASES)
def test_maxpool2d(device, rng, N, C, H, W, k, s, p):
    assert_gradcheck(MaxPool2d(k, stride=s, padding=p), distinct(rng, (N, C, H, W)), device)


@pytest.mark.parametrize("in_hw,out_hw", [
    ((4, 6), (1, 1)),      # global average pool
    ((14, 14), (7, 7)),    # divisible: 2x2 bins
    ((7, 7), (7, 7)),      # identity
    ((7, 8), (3, 5)),      # non-divisible: overlapping bins of unequal size
    ((1, 1), (7, 7)),      # one pixel copied 49 times
    ((5, 3), (2, 4)),      # shrink one dimension, grow the other
])
def test_adaptive_avgpool2d(device, rng, in_hw, out_hw):
    assert_gradcheck(AdaptiveAvgPool2d(out_hw), rng.standard_normal((2, 2) + in_hw), device)


@pytest.mark.parametrize("N,I,O,bias", [(1, 5, 3, True), (4, 7, 2, False), (3, 1, 1, True)])
def test_linear(device, rng, N, I, O, bias):
    errors = assert_gradcheck(Linear(I, O, bias=bias), rng.standard_normal((N, I)), device)
    assert ("bias" in errors) == bias


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3)])
def test_flatten(device, rng, shape):
    assert_gradcheck(Flatten(), rng.standard_normal(shape), device)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("training", [True, False])
def test_dropout(device, rng, p, training):
    layer = Dropout(p, seed=7).train(training)
    assert_gradcheck(layer, rng.standard_normal((3, 4, 5)), device)


def randomise_affine(bn, rng):
    """gamma = 1, beta = 0 would hide a gradient that forgets them."""
    C = bn.num_features
    bn.params["weight"][...] = rng.uniform(0.5, 2.0, C)
    bn.params["bias"][...] = rng.standard_normal(C)
    return bn


@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (1, 2, 3, 3), (3, 2, 1, 2)])
def test_batchnorm2d_train(device, rng, shape):
    bn = randomise_affine(BatchNorm2d(shape[1]), rng)
    assert_gradcheck(bn, 3.0 + 2.0 * rng.standard_normal(shape), device)


def test_batchnorm2d_eval_after_training(device, rng):
    bn = randomise_affine(BatchNorm2d(3), rng).astype(np.float64).to(device)
    for _ in range(3):  # a few training batches move the running statistics
        bn.forward(backend.to_device(2.0 + 3.0 * rng.standard_normal((4, 3, 4, 4)), device))
    running_var = backend.to_numpy(bn.buffers["running_var"])
    assert not np.allclose(running_var, 1.0), "training did not move the running statistics"
    bn.eval()
    assert_gradcheck(bn, rng.standard_normal((2, 3, 3, 5)), device)


def test_sequential(device, rng):
    # the weights come from the shared stream: seeded here, so the check does not depend on which
    # tests ran before (an unseeded draw once put a ReLU input within h of its kink)
    random_stream.seed(0)
    net = Sequential(Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                     Sequential(Linear(3 * 2 * 3, 4), ReLU(), Linear(4, 2)))
    x = rng.standard_normal((2, 2, 4, 7))
    pre = net.layers[0].astype(np.float64).forward(x)                 # the first ReLU's input
    assert np.abs(pre).min() > 1e-4, "central differences would straddle ReLU's kink"
    errors = assert_gradcheck(net, x, device)
    assert {"0.weight", "0.bias", "4.0.weight", "4.2.bias"} <= set(errors)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("N,K", [(1, 3), (5, 4)])
def test_softmax_cross_entropy(device, rng, label_smoothing, N, K):
    fn = SoftmaxCrossEntropy(label_smoothing=label_smoothing)
    logits = backend.to_device(2.0 * rng.standard_normal((N, K)), device)
    labels = backend.to_device(rng.integers(0, K, N), device)
    errors = check_function(lambda: fn(logits, labels),
                            lambda G: {"logits": fn.backward(G)},
                            {"logits": logits})
    assert errors["logits"] < TOL, errors


def test_a_wrong_gradient_points_at_itself(device, rng):
    """GradError: the global figure, and the element that is most wrong with both its values."""
    layer = Linear(3, 2).astype(np.float64).to(device)
    broken = Linear.backward

    def backward_with_one_wrong_entry(self, dout):
        dx = broken(self, dout)
        self.grads["weight"][1, 2] += 0.5          # the planted error
        return dx

    layer.backward = backward_with_one_wrong_entry.__get__(layer)
    errors = check_layer(layer, backend.to_device(rng.standard_normal((4, 3)), device))
    assert errors["x"] < TOL and errors["bias"] < TOL
    w = errors["weight"]
    assert w > 1e-3 and w.index == (1, 2)
    assert abs(w.analytic - w.numeric - 0.5) < 1e-6 and w.element_error > 0.1
    assert "worst at (1, 2): analytic" in repr(w)
