# Every max-pool shape class, not just VGG's 2x2/2: kernel 1..4, stride 1..5, padding 0..kernel//2, on
# odd sizes and on sizes the windows tile exactly; each backend against the loop reference and PyTorch.
import math

import numpy as np
import pytest

from minivgg import backend
from minivgg.layers import MaxPool2d, maxpool2d_naive

torch = pytest.importorskip("torch", reason="PyTorch is the oracle: pip install torch==2.13.0")

SWEEP = [(k, s, p) for k in range(1, 5) for s in range(1, 6) for p in range(k // 2 + 1)]


def sizes(k, s, p):
    """Odd sizes, plus one where s*OH == H + 2p exactly (stride > kernel then leaves unvisited rows)."""
    exact = s * (math.ceil(k / s) + 1) - 2 * p            # H + 2p = s * OH, OH >= 2
    return [(7, 9), (5, 6), (exact, exact + s)]


def poison_heap(shape):
    """Free a NaN-filled block of this size first, so a buffer left uninitialised shows up as NaN."""
    junk = np.full(shape, np.nan)
    del junk


@pytest.mark.parametrize("k,s,p", SWEEP, ids=[f"k{k}s{s}p{p}" for k, s, p in SWEEP])
def test_maxpool_sweep_equals_loop_reference_and_torch(device, rng, k, s, p):
    for H, W in sizes(k, s, p):
        x = rng.standard_normal((2, 3, H, W))                # float64, distinct values: no ties
        out_ref, backward_ref = maxpool2d_naive(x, k, s, p)
        dout = rng.standard_normal(out_ref.shape)
        dx_ref = backward_ref(dout)
        xt = torch.tensor(x, requires_grad=True)
        out_t = torch.nn.functional.max_pool2d(xt, k, stride=s, padding=p)
        out_t.backward(torch.tensor(dout))
        np.testing.assert_array_equal(out_ref, out_t.detach().numpy())   # the reference is right
        np.testing.assert_allclose(dx_ref, xt.grad.numpy(), rtol=1e-12, atol=0)

        layer = MaxPool2d(k, stride=s, padding=p)
        out = layer.forward(backend.to_device(x, device))
        poison_heap(x.shape)
        dx = backend.to_numpy(layer.backward(backend.to_device(dout, device)))
        where = f"kernel {k}, stride {s}, padding {p}, input {H}x{W}"
        np.testing.assert_array_equal(backend.to_numpy(out), out_ref, err_msg=where)
        # a pixel hears from its windows in another order only when windows overlap
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=0, err_msg=where)
