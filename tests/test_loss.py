# SoftmaxCrossEntropy's numerics: stable for huge logits, ln(K) at uniform logits, the closed-form
# gradient (softmax - target)/N, and label smoothing as PyTorch defines it.
import math

import numpy as np
import pytest

from minivgg import backend
from minivgg.layers import SoftmaxCrossEntropy


def softmax(z):
    """Direct float64 softmax, written here independently of minivgg."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run(fn, logits, labels, device, dout=1.0):
    loss = fn(backend.to_device(logits, device), backend.to_device(labels, device))
    return backend.to_numpy(loss), backend.to_numpy(fn.backward(dout))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_stay_finite(device, dtype):
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    labels = np.array([0, 2, 1])
    loss, dlogits = run(SoftmaxCrossEntropy(), logits, labels, device)
    assert loss.dtype == dlogits.dtype == dtype
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    # rows: right class at 1e4 -> 0; right class at -1e4 vs 1e4 -> 2e4; uniform -> ln 3
    expected = (0.0 + 2e4 + math.log(3)) / 3
    assert abs(float(loss) - expected) <= 1e-6 * expected
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(dlogits, (softmax(logits.astype(np.float64)) - onehot) / 3, atol=1e-7)


@pytest.mark.parametrize("K", [2, 10, 1000])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_uniform_logits_give_log_k(device, rng, K, dtype, tol):
    logits = np.full((4, K), rng.uniform(-5, 5), dtype=dtype)
    loss, _ = run(SoftmaxCrossEntropy(), logits, rng.integers(0, K, 4), device)
    assert abs(float(loss) - math.log(K)) <= tol * math.log(K)


@pytest.mark.parametrize("N,K", [(1, 2), (7, 5), (16, 100)])
def test_gradient_is_softmax_minus_onehot_over_n(device, rng, N, K):
    logits = 4 * rng.standard_normal((N, K))
    labels = rng.integers(0, K, N)
    dout = rng.uniform(0.5, 2.0)
    expected = (softmax(logits) - np.eye(K)[labels]) / N
    _, dlogits = run(SoftmaxCrossEntropy(), logits, labels, device)
    np.testing.assert_allclose(dlogits, expected, rtol=1e-12, atol=1e-15)
    _, scaled = run(SoftmaxCrossEntropy(), logits, labels, device, dout=dout)
    np.testing.assert_allclose(scaled, dout * expected, rtol=1e-12, atol=1e-15)
    assert np.abs(dlogits.sum(axis=1)).max() < 1e-15   # each row of softmax - onehot sums to 0


def test_loss_value_is_mean_negative_log_softmax(device, rng):
    logits, labels = 3 * rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    loss, _ = run(SoftmaxCrossEntropy(), logits, labels, device)
    expected = -np.log(softmax(logits)[np.arange(6), labels]).mean()
    assert abs(float(loss) - expected) <= 1e-12 * expected


@pytest.mark.parametrize("label_smoothing", [0.05, 0.1, 0.5, 1.0])
def test_label_smoothing_matches_torch(device, rng, label_smoothing):
    torch = pytest.importorskip("torch", reason="PyTorch defines label smoothing here")
    logits, labels = 3 * rng.standard_normal((8, 6)), rng.integers(0, 6, 8)
    loss, dlogits = run(SoftmaxCrossEntropy(label_smoothing), logits, labels, device)
    zt = torch.tensor(logits, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), label_smoothing=label_smoothing)
    loss_t.backward()
    assert abs(float(loss) - loss_t.item()) <= 1e-12 * abs(loss_t.item())
    np.testing.assert_allclose(dlogits, zt.grad.numpy(), rtol=1e-12, atol=1e-15)
    plain, _ = run(SoftmaxCrossEntropy(), logits, labels, device)
    assert float(loss) != float(plain), "label smoothing had no effect"


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5])
def test_label_smoothing_out_of_range_is_rejected(label_smoothing):
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: label_smoothing must be in \[0, 1\]"):
        SoftmaxCrossEntropy(label_smoothing)


def test_loss_module_does_not_import_the_layers():
    """Imports run downhill: minivgg.layers re-exports the loss, so losses.py must not import
    minivgg.layers (that closed a loop). Read from the source, since the package imports both."""
    import ast
    import minivgg.losses
    tree = ast.parse(open(minivgg.losses.__file__).read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("layers", "minivgg.layers"))], imported
