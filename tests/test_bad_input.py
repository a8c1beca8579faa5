# Bad input fails early with a message that names the layer and says what was expected; good input
# is never written to, and float32 stays float32 through every forward and backward.
import re
import types

import numpy as np
import pytest

from minivgg import backend
from minivgg.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                            MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy)

# name -> (factory, a good input shape)
LAYERS = {
    "Conv2d": (lambda: Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6)),
    "ReLU": (ReLU, (2, 3, 5, 6)),
    "MaxPool2d": (lambda: MaxPool2d(3, stride=2, padding=1), (2, 3, 5, 6)),
    "AdaptiveAvgPool2d": (lambda: AdaptiveAvgPool2d((3, 5)), (2, 3, 7, 8)),
    "AdaptiveAvgPool2d-global": (lambda: AdaptiveAvgPool2d(1), (2, 3, 4, 4)),
    "Linear": (lambda: Linear(6, 4), (2, 6)),
    "Flatten": (Flatten, (2, 3, 4, 5)),
    "Dropout": (lambda: Dropout(0.5, seed=0), (2, 3, 4, 5)),
    "Dropout-eval": (lambda: Dropout(0.5).eval(), (2, 3, 4, 5)),
    "BatchNorm2d": (lambda: BatchNorm2d(3), (2, 3, 4, 5)),
    "BatchNorm2d-eval": (lambda: BatchNorm2d(3).eval(), (2, 3, 4, 5)),
    "Sequential": (lambda: Sequential(Conv2d(3, 2, 3), BatchNorm2d(2), ReLU(), MaxPool2d(2), Flatten(),
                                      Linear(2 * 2 * 2, 3)), (2, 3, 6, 6)),
}


def make(name, device):
    factory, shape = LAYERS[name]
    return factory().to(device), shape


def named(layer):
    """A regex that matches the start of a message naming this layer (its repr)."""
    return "^" + re.escape(repr(layer))


def good_input(rng, shape, device, dtype=np.float32):
    return backend.to_device(rng.standard_normal(shape).astype(dtype), device)


# -- forward: rank, layout, dtype, size ------------------------------------------------------
@pytest.mark.parametrize("name,shape,expected", [
    ("Conv2d", (3, 5, 6), r"expected a 4-D input laid out NCHW, got shape \(3, 5, 6\) \(3-D\)"),
    ("MaxPool2d", (2, 1, 3, 5, 6), r"expected a 4-D input laid out NCHW, got shape \(2, 1, 3, 5, 6\)"),
    ("AdaptiveAvgPool2d", (3, 7, 8), r"expected a 4-D input laid out NCHW"),
    ("BatchNorm2d", (2, 3), r"expected a 4-D input laid out NCHW, got shape \(2, 3\) \(2-D\)"),
    ("Linear", (2, 6, 1), r"expected a 2-D input laid out \(N, in_features\), got shape \(2, 6, 1\)"),
    ("ReLU", (), r"expected an input with a batch dimension, got a 0-d array"),
    ("Dropout", (), r"expected an input with a batch dimension, got a 0-d array"),
])
def test_wrong_ndim(device, rng, name, shape, expected):
    layer, _ = make(name, device)
    with pytest.raises(ValueError, match=named(layer) + ": " + expected):
        layer.forward(good_input(rng, shape, device))


def test_flatten_needs_a_batch_dimension(device, rng):
    with pytest.raises(ValueError, match=r"^Flatten: expected an input with a batch dimension, got \(5,\)"):
        Flatten().forward(good_input(rng, (5,), device))


@pytest.mark.parametrize("name", ["Conv2d", "BatchNorm2d"])
def test_nhwc_input_suggests_transpose(device, rng, name):
    layer, (N, C, H, W) = make(name, device)
    with pytest.raises(ValueError, match=named(layer) + r": expected 3 channels in dim 1 \(NCHW\), got shape "
                                       r"\(2, 5, 6, 3\)\. It looks like NHWC: "
                                       r"transpose with x\.transpose\(0, 3, 1, 2\)"):
        layer.forward(good_input(rng, (N, 5, 6, C), device))


def test_wrong_channels_without_nhwc_hint(device, rng):
    layer = Conv2d(3, 4, 3).to(device)
    with pytest.raises(ValueError, match=named(layer) + r": expected 3 channels in dim 1 \(NCHW\), got shape "
                                       r"\(2, 4, 5, 6\)\.$"):
        layer.forward(good_input(rng, (2, 4, 5, 6), device))


def test_linear_wrong_features(device, rng):
    layer = Linear(6, 4).to(device)
    with pytest.raises(ValueError, match=named(layer) + r": expected 6 channels in dim 1 \(\(N, in_features\)\), "
                                       r"got shape \(2, 5\)"):
        layer.forward(good_input(rng, (2, 5), device))


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize("name", list(LAYERS))
def test_integer_input_is_rejected(device, name, dtype):
    layer, shape = make(name, device)
    first = layer[0] if isinstance(layer, Sequential) else layer
    x = backend.to_device(np.ones(shape, dtype=dtype), device)
    with pytest.raises(TypeError, match=named(first) + r": expected a floating-point input .* got dtype "
                                        + np.dtype(dtype).name + r"; convert with x\.astype\(np\.float32\)"):
        layer.forward(x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_batch(device, name):
    layer, shape = make(name, device)
    first = layer[0] if isinstance(layer, Sequential) else layer
    with pytest.raises(ValueError,
                       match=named(first) + r": got an empty batch, shape \(0, .*expected at least one"):
        layer.forward(backend.to_device(np.ones((0,) + shape[1:], np.float32), device))


@pytest.mark.parametrize("layer,shape,expected", [
    (lambda: Conv2d(1, 1, 5, padding=1), (1, 1, 2, 2), r"kernel 5x5 is larger than the padded input 4x4"),
    (lambda: Conv2d(1, 1, (1, 5)), (1, 1, 5, 3), r"kernel 1x5 is larger than the padded input 5x3"),
    (lambda: MaxPool2d(3), (1, 1, 2, 2), r"window 3x3 is larger than the padded input 2x2"),
    (lambda: MaxPool2d((2, 4), padding=(1, 1)), (1, 1, 2, 1), r"window 2x4 is larger than the padded input 4x3"),
])
def test_kernel_larger_than_padded_input(device, rng, layer, shape, expected):
    layer = layer().to(device)
    with pytest.raises(ValueError, match=named(layer) + ": " + expected):
        layer.forward(good_input(rng, shape, device))
    with pytest.raises(ValueError) as e:
        layer.forward(good_input(rng, shape, device))
    assert "--" not in str(e.value)            # facts only: advice about flags belongs to the CLI


@pytest.mark.parametrize("name", ["Conv2d", "Linear", "BatchNorm2d", "Sequential"])
@pytest.mark.parametrize("layer_dtype,input_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_input_dtype_differs_from_parameters(device, rng, name, layer_dtype, input_dtype):
    layer, shape = make(name, device)
    layer.astype(layer_dtype)
    first = layer[0] if isinstance(layer, Sequential) else layer
    in_name, p_name = np.dtype(input_dtype).name, np.dtype(layer_dtype).name
    with pytest.raises(TypeError, match=named(first) + f": input dtype {in_name} differs from parameter dtype "
                                        f"{p_name}; cast the input, or the layer with .astype\\({in_name}\\)"):
        layer.forward(good_input(rng, shape, device, input_dtype))


# -- backward: order, shape, dtype -------------------------------------------------------------
def first_to_run_backward(layer):
    return layer[-1] if isinstance(layer, Sequential) else layer


@pytest.mark.parametrize("name", list(LAYERS))
def test_backward_before_forward(device, name):
    layer, _ = make(name, device)
    with pytest.raises(RuntimeError, match=named(first_to_run_backward(layer)) +
                       r": backward called before forward.*run forward"):
        layer.backward(backend.to_device(np.ones((2, 4, 5, 6), np.float32), device))


@pytest.mark.parametrize("name", list(LAYERS))
def test_dout_of_wrong_shape(device, rng, name):
    layer, shape = make(name, device)
    out = layer.forward(good_input(rng, shape, device))
    bad = out.shape[:-1] + (out.shape[-1] + 1,)
    with pytest.raises(ValueError, match=named(first_to_run_backward(layer)) +
                       rf": dout has shape {re.escape(str(bad))}, expected the forward output's shape "
                       + re.escape(str(tuple(out.shape)))):
        layer.backward(good_input(rng, bad, device))


@pytest.mark.parametrize("name", list(LAYERS))
def test_dout_of_wrong_dtype(device, rng, name):
    layer, shape = make(name, device)
    out = layer.forward(good_input(rng, shape, device))
    with pytest.raises(TypeError, match=named(first_to_run_backward(layer)) +
                       r": dout dtype float64 differs from the forward input's dtype float32"):
        layer.backward(good_input(rng, out.shape, device, np.float64))


# -- the loss ------------------------------------------------------------------------------------
LOSS = re.escape(repr(SoftmaxCrossEntropy()))


@pytest.mark.parametrize("labels,error,expected", [
    (np.array([0, -1, 2]), ValueError, r"labels must lie in \[0, 3\] for 4 classes, got min -1, max 2"),
    (np.array([0, 4, 2]), ValueError, r"labels must lie in \[0, 3\] for 4 classes, got min 0, max 4"),
    (np.array([0., 1., 2.]), TypeError, r"labels must be integers \(class indices in \[0, 4\)\), got dtype "
                                        r"float64; convert with labels\.astype\(np\.int64\)"),
    (np.array([[0], [1], [2]]), ValueError,
     r"expected labels of shape \(3,\) to match logits \(3, 4\), got \(3, 1\)"),
    (np.array([0, 1]), ValueError, r"expected labels of shape \(3,\) to match logits \(3, 4\), got \(2,\)"),
    ([0, 1, 2], ValueError, r"expected labels of shape \(3,\) .* got list"),
])
def test_bad_labels(device, rng, labels, error, expected):
    logits = good_input(rng, (3, 4), device)
    if isinstance(labels, np.ndarray):
        labels = backend.to_device(labels, device)
    fn = SoftmaxCrossEntropy()
    if device == "gpu" and "must lie in" in expected:
        # on the GPU the range check runs on the device: a NaN loss, then check_labels names the label
        assert np.isnan(float(fn(logits, labels)))
        with pytest.raises(error, match="^" + LOSS + ": " + expected):
            fn.check_labels(labels, 4)
        return
    with pytest.raises(error, match="^" + LOSS + ": " + expected):
        fn(logits, labels)


@pytest.mark.parametrize("logits,error,expected", [
    (np.zeros((3, 4, 1), np.float32), ValueError, r"expected logits of shape \(N, K\), got \(3, 4, 1\)"),
    (np.zeros((3, 4), np.int64), TypeError, r"logits must be floating point, got dtype int64"),
    (np.zeros((0, 4), np.float32), ValueError, r"got an empty batch \(logits shape \(0, 4\)\)"),
])
def test_bad_logits(device, logits, error, expected):
    labels = backend.to_device(np.zeros(len(logits), np.int64), device)
    with pytest.raises(error, match="^" + LOSS + ": " + expected):
        SoftmaxCrossEntropy()(backend.to_device(logits, device), labels)


def test_loss_backward_before_forward():
    with pytest.raises(RuntimeError, match="^" + LOSS + ": backward called before forward.*run forward"):
        SoftmaxCrossEntropy().backward()


# -- numpy and cupy mixed in one call ---------------------------------------------------------------
@pytest.mark.skipif(not backend.gpu_available(), reason="no GPU backend (CuPy or its stand-in) to hold device arrays")
def test_numpy_input_to_a_gpu_layer(rng):
    device = "gpu"
    layer = Linear(6, 4).to(device)
    with pytest.raises(TypeError, match=named(layer) + r": the input and the parameters are on different "
                                        r"devices; .*to_device"):
        layer.forward(rng.standard_normal((2, 6)).astype(np.float32))
    layer.forward(good_input(rng, (2, 6), device))
    with pytest.raises(TypeError, match=named(layer) + r": dout and the forward input are on different devices"):
        layer.backward(np.ones((2, 4), np.float32))
    fn = SoftmaxCrossEntropy()
    with pytest.raises(TypeError, match="^" + LOSS + ": logits and labels are on different devices"):
        fn(good_input(rng, (2, 4), device), np.array([0, 1]))


class FakeGpuArray(np.ndarray):
    """A NumPy array that the backend is told is a CuPy array: mixing without a GPU."""


@pytest.fixture
def fake_cupy(monkeypatch):
    monkeypatch.setattr(backend, "cupy", types.SimpleNamespace(ndarray=FakeGpuArray))


def test_fake_gpu_arrays_mixed_in_forward(fake_cupy, rng):
    layer = Linear(6, 4)
    layer.params["weight"] = layer.params["weight"].view(FakeGpuArray)
    with pytest.raises(TypeError, match=named(layer) + r": the input and the parameters are on different "
                                        r"devices; arrays from different devices in one call \(numpy\.ndarray, "
                                        r".*FakeGpuArray.*to_device"):
        layer.forward(rng.standard_normal((2, 6)).astype(np.float32))


@pytest.mark.parametrize("name", list(LAYERS))
def test_fake_gpu_arrays_mixed_in_backward(fake_cupy, rng, name):
    layer, shape = make(name, "cpu")
    out = layer.forward(good_input(rng, shape, "cpu"))
    dout = np.ones(out.shape, np.float32).view(FakeGpuArray)
    with pytest.raises(TypeError, match=named(first_to_run_backward(layer)) + r": dout .*different device"):
        layer.backward(dout)


def test_fake_gpu_labels(fake_cupy, rng):
    with pytest.raises(TypeError, match="^" + LOSS + ": logits and labels are on different devices"):
        SoftmaxCrossEntropy()(rng.standard_normal((2, 3)), np.array([0, 1]).view(FakeGpuArray))


# -- good input: never written to, never re-typed ----------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_arguments_untouched_and_float32_kept(device, rng, name):
    layer, shape = make(name, device)
    x = good_input(rng, shape, device)
    x_before = backend.to_numpy(x).copy()
    params_before = {k: backend.to_numpy(v).copy() for k, v in layer.state_dict().items() if "running" not in k
                     and "num_batches" not in k}
    out = layer.forward(x)
    dout = good_input(rng, out.shape, device)
    dout_before = backend.to_numpy(dout).copy()
    dx = layer.backward(dout)
    for arr, before, what in ((x, x_before, "x"), (dout, dout_before, "dout")):
        assert arr.dtype == np.float32, f"{what} changed dtype"
        assert backend.to_numpy(arr).tobytes() == before.tobytes(), f"{name} wrote into its {what}"
    for k, v in layer.state_dict().items():
        if k in params_before:
            assert backend.to_numpy(v).tobytes() == params_before[k].tobytes(), f"{name} changed {k}"
    assert out.dtype == np.float32 and dx.dtype == np.float32
    assert dx.shape == x.shape
    for pname, _, g in layer.named_parameters():
        assert g.dtype == np.float32, f"{name}: grad {pname} is {g.dtype}"
    if device == "cpu":
        assert dx.flags.writeable, f"{name}: dx is a read-only view"


def test_loss_arguments_untouched_and_float32_kept(device, rng):
    logits = good_input(rng, (5, 7), device)
    labels = backend.to_device(rng.integers(0, 7, 5), device)
    before = backend.to_numpy(logits).copy(), backend.to_numpy(labels).copy()
    fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    loss = fn(logits, labels)
    dlogits = fn.backward()
    assert loss.dtype == dlogits.dtype == np.float32
    assert backend.to_numpy(logits).tobytes() == before[0].tobytes()
    assert backend.to_numpy(labels).tobytes() == before[1].tobytes()
