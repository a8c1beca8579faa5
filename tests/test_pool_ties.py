# Max-pool ties, on purpose: the gradient checks avoid them, so this file pins the rule
# (first maximum in row-major order gets the gradient, overlaps add up) against PyTorch and the loop reference.
import numpy as np
import pytest

from minivgg import backend
from minivgg.layers import MaxPool2d, maxpool2d_naive


def pool(x, dout, device, k, s=None, p=0):
    """minivgg's MaxPool2d forward and backward on `device`, returned as NumPy arrays."""
    layer = MaxPool2d(k, stride=s, padding=p)
    out = layer.forward(backend.to_device(x, device))
    dx = layer.backward(backend.to_device(dout, device))
    return backend.to_numpy(out), backend.to_numpy(dx)


def torch_pool(x, dout, k, s=None, p=0):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle for tie-breaking")
    xt = torch.tensor(x, requires_grad=True)
    out = torch.nn.functional.max_pool2d(xt, k, stride=s, padding=p)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), xt.grad.numpy()


def int_dout(rng, shape, dtype):
    """Small integers: sums of them are exact, so overlapping windows compare bit for bit."""
    return rng.integers(1, 9, shape).astype(dtype)


def test_constant_windows_send_gradient_to_top_left(device, rng):
    x = np.full((2, 3, 6, 8), 1.5, dtype=np.float32)
    dout = int_dout(rng, (2, 3, 3, 4), np.float32)
    out, dx = pool(x, dout, device, 2)
    expected = np.zeros_like(x)
    expected[:, :, ::2, ::2] = dout                     # each window's first element, row-major
    assert np.array_equal(out, np.full_like(dout, 1.5))
    assert np.array_equal(dx, expected)


@pytest.mark.parametrize("first,second", [((0, 1), (1, 0)), ((0, 0), (1, 1)), ((1, 0), (1, 2))])
def test_repeated_maximum_goes_to_first_in_row_major_order(device, first, second):
    x = -np.arange(6, dtype=np.float64).reshape(1, 1, 2, 3)   # all distinct, all below 1
    x[0, 0][first] = x[0, 0][second] = 1.0                    # two equal maxima in one 2x3 window
    out, dx = pool(x, np.array([[[[4.0]]]]), device, (2, 3))
    expected = np.zeros_like(x)
    expected[0, 0][first] = 4.0
    assert out.item() == 1.0
    assert np.array_equal(dx, expected)


def test_overlapping_windows_add_up_at_a_shared_maximum(device, rng):
    # In a 5x5 image pooled 3x3 with stride 2, pixel (2, 2) lies in all four windows.
    x = rng.uniform(-1, 0, (1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0
    dout = int_dout(rng, (1, 1, 2, 2), np.float64)
    out, dx = pool(x, dout, device, 3, 2)
    expected = np.zeros_like(x)
    expected[0, 0, 2, 2] = dout.sum()
    assert np.array_equal(out, np.ones_like(dout))
    assert np.array_equal(dx, expected)


# (H, W, kernel, stride, padding): overlapping, padded, non-square, the VGG pool.
TIE_CASES = [(6, 6, 2, 2, 0), (7, 9, 3, 2, 0), (5, 6, 3, 2, 1), (6, 7, (2, 3), (1, 2), (1, 1)),
             (5, 5, 3, 1, 1), (4, 4, 2, 1, 0)]


@pytest.mark.parametrize("H,W,k,s,p", TIE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_ties_match_torch_and_the_loop_reference(device, rng, dtype, H, W, k, s, p):
    x = rng.integers(0, 3, (2, 3, H, W)).astype(dtype)            # three values: ties everywhere
    x[0, 0] = 2.0                                                  # and one constant plane
    out_ref, backward_ref = maxpool2d_naive(x, k, s, p)
    dout = int_dout(rng, out_ref.shape, dtype)
    out, dx = pool(x, dout, device, k, s, p)
    out_torch, dx_torch = torch_pool(x, dout, k, s, p)
    assert out.dtype == dx.dtype == dtype
    assert np.array_equal(out, out_torch) and np.array_equal(out, out_ref)
    assert np.array_equal(dx, dx_torch), "tie-breaking differs from PyTorch"
    assert np.array_equal(dx, backward_ref(dout)), "tie-breaking differs from maxpool2d_naive"
    assert np.array_equal(dx.sum(axis=(2, 3)), dout.sum(axis=(2, 3))), "gradient was lost or duplicated"


def test_negative_ties_beat_padding(device):
    # Padding counts as -inf: an all-negative tied window must still route to a real pixel.
    x = np.full((1, 1, 3, 3), -5.0)
    dout = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    out, dx = pool(x, dout, device, 2, 2, 1)
    _, dx_torch = torch_pool(x, dout, 2, 2, 1)
    assert np.array_equal(out, np.full_like(dout, -5.0))
    assert np.array_equal(dx, dx_torch)
    assert dx.sum() == dout.sum()
