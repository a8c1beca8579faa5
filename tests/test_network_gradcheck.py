# A whole small network end to end: the layers' backward passes must also compose, through
# the loss, into the right gradient for the input and every parameter (float64 check, PyTorch twin).
import numpy as np
import pytest

from minivgg import backend
from minivgg.gradcheck import check_function, numerical_gradient
from minivgg.layers import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy

N, C, H, W, K = 3, 2, 6, 8, 4   # batch, channels, a non-square image, classes


def make_net(rng):
    net = Sequential(Conv2d(C, 3, 3, padding=1), BatchNorm2d(3), ReLU(), MaxPool2d(2), Flatten(),
                     Linear(3 * (H // 2) * (W // 2), K))
    bn = net[1]
    bn.params["weight"][...] = rng.uniform(0.5, 2.0, 3)     # not 1 and 0: those would hide mistakes
    bn.params["bias"][...] = rng.standard_normal(3)
    return net


def data(rng):
    return rng.standard_normal((N, C, H, W)), rng.integers(0, K, N)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_network_gradcheck_float64(device, rng, mode, label_smoothing):
    net = make_net(rng).astype(np.float64).to(device)
    if mode == "eval":   # running statistics from a few batches, then frozen
        for _ in range(3):
            net.forward(backend.to_device(2.0 * rng.standard_normal((N, C, H, W)), device))
        net.eval()
    x, labels = (backend.to_device(a, device) for a in data(rng))
    loss_fn = SoftmaxCrossEntropy(label_smoothing=label_smoothing)
    params = {name: p for name, p, _ in net.named_parameters(trainable_only=False)}
    assert set(params) == {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"}
    bn, saved = net[1], {k: v.copy() for k, v in net[1].buffers.items()}

    def forward():
        bn.buffers = {k: v.copy() for k, v in saved.items()}   # no drift between evaluations
        return loss_fn(net.forward(x), labels)

    def backward(G):
        dx = net.backward(loss_fn.backward(G))
        return {"x": dx, **{name: g.copy() for name, _, g in net.named_parameters(trainable_only=False)}}

    checked = dict(params)
    if mode == "train":
        # BatchNorm subtracts each channel's batch mean, so the conv bias before it has an exact
        # zero gradient: both sides are rounding noise, whose relative error means nothing. Check the zero.
        bias = checked.pop("0.bias")
        forward()
        grads = backward(1.0)
        scale = float(np.linalg.norm(backend.to_numpy(grads["0.weight"])))
        assert np.linalg.norm(backend.to_numpy(grads["0.bias"])) < 1e-12 * scale
        assert np.abs(backend.to_numpy(numerical_gradient(forward, bias))).max() < 1e-8
    errors = check_function(forward, backward, {"x": x, **checked})
    assert set(errors) == {"x"} | set(checked)
    assert max(errors.values()) < 1e-6, errors


def test_network_matches_torch_twin(device, rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle for the network twin")
    nn = torch.nn
    net = make_net(rng)
    tnet = nn.Sequential(nn.Conv2d(C, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * (H // 2) * (W // 2), K))
    tnet.load_state_dict({k: torch.tensor(v) for k, v in net.state_dict().items()}, strict=True)
    net.to(device)
    loss_fn = SoftmaxCrossEntropy()

    def rel(a, b):
        a, b = backend.to_numpy(a).astype(np.float64), b.detach().numpy().astype(np.float64)
        assert a.shape == b.shape
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for step in range(3):   # several batches: running statistics must follow as well
        x, labels = data(rng)
        x = x.astype(np.float32)
        loss = loss_fn(net.forward(backend.to_device(x, device)), backend.to_device(labels, device))
        dx = net.backward(loss_fn.backward())
        xt = torch.tensor(x, requires_grad=True)
        tnet.zero_grad()
        loss_t = nn.functional.cross_entropy(tnet(xt), torch.tensor(labels))
        loss_t.backward()
        assert loss.dtype == dx.dtype == np.float32
        assert rel(loss, loss_t) < 1e-5, f"step {step}: loss"
        assert rel(dx, xt.grad) < 1e-4, f"step {step}: dx"
        tgrads = dict(tnet.named_parameters())
        names = [name for name, _, _ in net.named_parameters()]
        assert sorted(names) == sorted(tgrads)
        for name, _, g in net.named_parameters():
            if name == "0.bias":   # exactly zero before a train-mode BatchNorm: compare noise to scale
                scale = float(np.linalg.norm(backend.to_numpy(net[0].grads["weight"])))
                assert np.linalg.norm(backend.to_numpy(g)) < 1e-5 * scale, f"step {step}: {name}"
                assert tgrads[name].grad.norm().item() < 1e-5 * scale
                continue
            assert rel(g, tgrads[name].grad) < 1e-4, f"step {step}: {name}"
    tstate = tnet.state_dict()
    for name in ("1.running_mean", "1.running_var"):
        assert rel(net.state_dict()[name], tstate[name]) < 1e-5, name
    x, _ = data(rng)
    x = x.astype(np.float32)
    out = net.eval().forward(backend.to_device(x, device))
    assert rel(out, tnet.eval()(torch.tensor(x))) < 1e-5, "eval-mode logits"
