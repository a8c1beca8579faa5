"""The distillation loss and its backward: against PyTorch, and by float64 central differences."""
import numpy as np
import pytest

from minivgg import backend
from minivgg.distill import DistillationLoss
from minivgg.gradcheck import check_function

torch = pytest.importorskip("torch")


def _torch_loss(s, y, t, T, a):
    F = torch.nn.functional
    soft = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
    return a * T * T * soft + (1 - a) * F.cross_entropy(s, y)


@pytest.mark.parametrize("T,a", [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.0, 0.0)])
def test_loss_and_gradient_equal_torch(T, a, device):
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(7, 5)) * 3).astype(np.float32)
    t = (rng.normal(size=(7, 5)) * 3).astype(np.float32)
    y = rng.integers(0, 5, 7)
    loss_fn = DistillationLoss(T, a)
    loss = loss_fn.forward(backend.to_device(s, device), backend.to_device(y, device),
                           backend.to_device(t, device))
    ds = backend.to_numpy(loss_fn.backward())
    st = torch.from_numpy(s).requires_grad_(True)
    ref = _torch_loss(st, torch.from_numpy(y), torch.from_numpy(t), T, a)
    ref.backward()
    assert float(backend.to_numpy(loss)) == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g = st.grad.numpy()
    np.testing.assert_allclose(ds, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())


@pytest.mark.parametrize("T,a", [(3.0, 0.7), (1.0, 1.0)])
def test_gradcheck_float64(T, a, device):
    rng = np.random.default_rng(1)
    s = backend.to_device(rng.normal(size=(3, 4)) * 2, device)
    t = backend.to_device(rng.normal(size=(3, 4)) * 2, device)
    y = backend.to_device(np.array([0, 3, 1]), device)
    loss_fn = DistillationLoss(T, a)
    errors = check_function(lambda: loss_fn.forward(s, y, t),
                            lambda G: {"s": loss_fn.backward(G)}, {"s": s})
    assert errors["s"] < 1e-6, errors


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationLoss(0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationLoss(2.0, 1.5)
    with pytest.raises(ValueError, match=r"teacher logits must have the student's shape \(2, 3\)"):
        DistillationLoss().forward(np.zeros((2, 3), np.float32), np.array([0, 1]),
                                   np.zeros((2, 4), np.float32))
