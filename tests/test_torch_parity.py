# PyTorch as the oracle: every layer and the loss, given the same float32 input, weights and
# upstream gradient as its torch twin, must give the same output, dx and parameter gradients.
import numpy as np
import pytest

from minivgg import backend
from minivgg.layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear,
                            MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy)

torch = pytest.importorskip("torch", reason="PyTorch is the test oracle: pip install torch==2.13.0")
nn = torch.nn

OUT_TOL = 1e-5    # float32 forward: a few roundings apart
GRAD_TOL = 1e-4   # float32 backward: longer sums, summed in another order


def rel(a, b):
    """||a - b|| / ||b||, with a, b NumPy/CuPy arrays or torch tensors."""
    a = backend.to_numpy(a.detach().numpy() if torch.is_tensor(a) else a).astype(np.float64)
    b = backend.to_numpy(b.detach().numpy() if torch.is_tensor(b) else b).astype(np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs torch {b.shape}"
    nb = np.linalg.norm(b)
    assert nb > 0, "the reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm(a - b) / nb)


def twin(layer, tlayer):
    """Copy minivgg's parameters and buffers into the torch layer (names must match exactly)."""
    state = {k: torch.tensor(backend.to_numpy(v)) for k, v in layer.state_dict().items()}
    tlayer.load_state_dict(state, strict=True)
    return tlayer


def assert_parity(layer, tlayer, x, device, rng):
    """Forward and backward both; compare output, dx and every named parameter gradient."""
    layer.to(device)
    out = layer.forward(backend.to_device(x, device))
    xt = torch.tensor(x, requires_grad=True)
    out_t = tlayer(xt)
    assert out.dtype == np.float32
    assert rel(out, out_t) < OUT_TOL
    dout = rng.standard_normal(tuple(out_t.shape)).astype(np.float32)
    dx = layer.backward(backend.to_device(dout, device))
    out_t.backward(torch.tensor(dout))
    assert dx.dtype == np.float32
    assert rel(dx, xt.grad) < GRAD_TOL, "dx"
    grads = {name: g for name, _, g in layer.named_parameters()}
    tgrads = {name: p.grad for name, p in tlayer.named_parameters()}
    assert set(grads) == set(tgrads)
    for name in grads:
        assert grads[name].dtype == np.float32, name
        assert rel(grads[name], tgrads[name]) < GRAD_TOL, name
    return out, dx


def distinct(rng, shape):
    """Values that differ pairwise, so no max-pool window has a tie (ties: test_pool_ties.py)."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) / n).reshape(shape).astype(np.float32)


# (N, C, H, W, F, kernel, stride, padding, bias)
@pytest.mark.parametrize("N,C,H,W,F,k,s,p,bias", [
    (2, 3, 8, 8, 4, 3, 1, 1, True),
    (1, 2, 7, 5, 3, 5, 2, 2, True),
    (3, 4, 6, 9, 5, 1, 1, 0, False),
    (2, 3, 9, 10, 2, (3, 5), (2, 1), (1, 2), True),
])
def test_conv2d(device, rng, N, C, H, W, F, k, s, p, bias):
    layer = Conv2d(C, F, k, stride=s, padding=p, bias=bias)
    tlayer = twin(layer, nn.Conv2d(C, F, k, stride=s, padding=p, bias=bias))
    assert_parity(layer, tlayer, rng.standard_normal((N, C, H, W)).astype(np.float32), device, rng)


def test_relu(device, rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0    # exact zeros: the gradient there is 0 in both
    assert_parity(ReLU(), nn.ReLU(), x, device, rng)


@pytest.mark.parametrize("k,s,p", [(2, None, 0), (3, 2, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 1))])
def test_maxpool2d(device, rng, k, s, p):
    assert_parity(MaxPool2d(k, stride=s, padding=p), nn.MaxPool2d(k, stride=s, padding=p),
                  distinct(rng, (2, 3, 7, 8)), device, rng)


@pytest.mark.parametrize("in_hw,out_hw", [((6, 4), 1), ((14, 14), 7), ((7, 8), (3, 5)), ((1, 1), 7),
                                          ((5, 3), (2, 4))])
def test_adaptive_avgpool2d(device, rng, in_hw, out_hw):
    x = rng.standard_normal((2, 3) + in_hw).astype(np.float32)
    assert_parity(AdaptiveAvgPool2d(out_hw), nn.AdaptiveAvgPool2d(out_hw), x, device, rng)


@pytest.mark.parametrize("N,I,O,bias", [(4, 7, 3, True), (1, 16, 5, False)])
def test_linear(device, rng, N, I, O, bias):
    layer = Linear(I, O, bias=bias)
    tlayer = twin(layer, nn.Linear(I, O, bias=bias))
    assert_parity(layer, tlayer, rng.standard_normal((N, I)).astype(np.float32), device, rng)


def test_flatten(device, rng):
    assert_parity(Flatten(), nn.Flatten(), rng.standard_normal((2, 3, 4, 5)).astype(np.float32), device, rng)


def test_sequential(device, rng):
    layer = Sequential(Conv2d(3, 4, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                       Sequential(Linear(4 * 3 * 4, 6), ReLU(), Linear(6, 2)))
    tlayer = twin(layer, nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                       nn.Sequential(nn.Linear(4 * 3 * 4, 6), nn.ReLU(), nn.Linear(6, 2))))
    assert_parity(layer, tlayer, rng.standard_normal((3, 3, 6, 8)).astype(np.float32), device, rng)


def test_dropout_eval_is_identity(device, rng):
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)
    out, dx = assert_parity(Dropout(0.5).eval(), nn.Dropout(0.5).eval(), x, device, rng)
    np.testing.assert_array_equal(backend.to_numpy(out), x)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_train_scales_survivors_like_torch(device, rng, p):
    # The RNGs differ, so take the mask minivgg drew and check everything else against torch.
    x = rng.standard_normal((64, 32, 8, 8)).astype(np.float32)
    x[x == 0] = 1.0
    layer = Dropout(p, seed=3).train()
    out = backend.to_numpy(layer.forward(backend.to_device(x, device)))
    keep = out != 0
    assert abs((~keep).mean() - p) < 0.01, "the fraction dropped is not p"   # 7 standard deviations
    t_ones = nn.functional.dropout(torch.ones(10_000), p, training=True)
    torch_scale = t_ones[t_ones != 0].unique()
    assert torch_scale.numel() == 1
    assert rel(out[keep] / x[keep], np.full(int(keep.sum()), torch_scale.item(), np.float32)) < OUT_TOL
    xt = torch.tensor(x, requires_grad=True)
    out_t = xt * torch.tensor(keep) * torch_scale                 # torch's dropout with minivgg's mask
    assert rel(out, out_t) < OUT_TOL
    dout = rng.standard_normal(x.shape).astype(np.float32)
    dx = backend.to_numpy(layer.backward(backend.to_device(dout, device)))
    out_t.backward(torch.tensor(dout))
    np.testing.assert_array_equal(dx == 0, ~keep)
    assert rel(dx, xt.grad) < GRAD_TOL


def test_dropout_p1_drops_everything(device, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    layer = Dropout(1.0).train()
    out = backend.to_numpy(layer.forward(backend.to_device(x, device)))
    dx = backend.to_numpy(layer.backward(backend.to_device(np.ones_like(x), device)))
    expected = nn.functional.dropout(torch.tensor(x), 1.0, training=True).numpy()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(dx, np.zeros_like(x))


def random_bn(C, rng, momentum=0.1):
    bn = BatchNorm2d(C, momentum=momentum)
    bn.params["weight"][...] = rng.uniform(0.5, 2.0, C)
    bn.params["bias"][...] = rng.standard_normal(C)
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm2d_train_then_eval(device, rng, momentum):
    C = 3
    bn = random_bn(C, rng, momentum)
    tbn = twin(bn, nn.BatchNorm2d(C, momentum=momentum))
    for step in range(4):  # batches of different mean and scale move the running statistics
        x = (rng.uniform(-3, 3) + rng.uniform(0.5, 4) * rng.standard_normal((4, C, 5, 6))).astype(np.float32)
        tbn.zero_grad()
        assert_parity(bn.train(), tbn.train(), x, device, rng)
    for name in ("running_mean", "running_var"):
        assert rel(bn.buffers[name], getattr(tbn, name)) < OUT_TOL, name
    assert int(bn.buffers["num_batches_tracked"]) == int(tbn.num_batches_tracked) == 4
    tbn.zero_grad()
    x = rng.standard_normal((2, C, 3, 5)).astype(np.float32)
    assert_parity(bn.eval(), tbn.eval(), x, device, rng)


def test_batchnorm2d_eval(device, rng):
    C = 4
    bn = random_bn(C, rng)
    bn.buffers["running_mean"][...] = rng.standard_normal(C)
    bn.buffers["running_var"][...] = rng.uniform(0.2, 3.0, C)
    tbn = twin(bn, nn.BatchNorm2d(C)).eval()
    assert_parity(bn.eval(), tbn, rng.standard_normal((1, C, 4, 3)).astype(np.float32), device, rng)
    np.testing.assert_array_equal(backend.to_numpy(bn.buffers["running_mean"]), tbn.running_mean.numpy())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("N,K", [(1, 5), (8, 10)])
def test_softmax_cross_entropy(device, rng, label_smoothing, N, K):
    logits = (3 * rng.standard_normal((N, K))).astype(np.float32)
    labels = rng.integers(0, K, N)
    dloss = np.float32(rng.uniform(0.5, 2.0))          # the same upstream gradient in both
    fn = SoftmaxCrossEntropy(label_smoothing=label_smoothing)
    loss = fn(backend.to_device(logits, device), backend.to_device(labels, device))
    dlogits = fn.backward(dloss)
    zt = torch.tensor(logits, requires_grad=True)
    loss_t = nn.functional.cross_entropy(zt, torch.tensor(labels), label_smoothing=label_smoothing)
    (loss_t * dloss).backward()
    assert loss.dtype == dlogits.dtype == np.float32
    assert rel(loss, loss_t) < OUT_TOL
    assert rel(dlogits, zt.grad) < GRAD_TOL


def test_batchnorm_backward_with_a_large_mean(device):
    """Inputs far from zero (mean 1000, std 1): BatchNorm's backward must centre x before
    it sums, or float32 cancellation spoils dx and dgamma. Reference: torch in float64."""
    torch = pytest.importorskip("torch", reason="torch is the oracle for these tests")
    rng = np.random.default_rng(7)
    x = (1000.0 + rng.standard_normal((8, 3, 5, 5))).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    bn = BatchNorm2d(3).to(device)
    bn.forward(backend.to_device(x, device))
    dx = backend.to_numpy(bn.backward(backend.to_device(dout, device)))
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tbn = torch.nn.BatchNorm2d(3).double()
    tbn(tx).backward(torch.tensor(dout, dtype=torch.float64))
    assert rel(dx, tx.grad.numpy()) < 1e-4
    assert rel(backend.to_numpy(bn.grads["weight"]), tbn.weight.grad.numpy()) < 1e-4
