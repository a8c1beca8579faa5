"""One full VGG-11 training step in minivgg and in its torch twin, from the same weights and batch:
the same logits, loss, every gradient, BatchNorm statistics and weights after Adam steps;
and torchvision-style state_dicts loaded into a fresh minivgg model give the same logits."""
import numpy as np
import pytest

import minivgg
from minivgg.gradcheck import relative_error
from minivgg.layers import BatchNorm2d, Conv2d
from minivgg.losses import SoftmaxCrossEntropy
from minivgg.models import VGG, vgg16_bn
from minivgg.models.torch_interop import export_npz, load_torchvision_weights, to_torch

torch = pytest.importorskip("torch")
F = torch.nn.functional


def make_pair(arch, seed=0, **kw):
    minivgg.seed(seed)
    args = dict(width_ratio=8, pool_size=1, hidden=(64, 64), num_classes=10, dropout=0.0)
    args.update(kw)
    model = VGG(arch, **args)
    return model, to_torch(model)


def batch(n=4, c=3, size=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c, size, size)).astype(np.float32), rng.integers(0, classes, n)


def zero_grad_by_math(model):
    """Conv biases right before a BatchNorm in training: BN subtracts the batch mean, so their
    exact gradient is 0 and both frameworks return rounding noise (~1e-10) there."""
    names, layers = set(), list(model.features)
    for i, m in enumerate(layers[:-1]):
        if isinstance(m, Conv2d) and isinstance(layers[i + 1], BatchNorm2d) and layers[i + 1].training:
            names.add(f"features.{i}.bias")
    return names


def step_both(model, twin, x, y):
    """Forward, loss and backward in both frameworks; returns (loss, logits, dx) for each."""
    loss_fn = SoftmaxCrossEntropy()
    logits = model.forward(x)
    loss = loss_fn(logits, y)
    dx = model.backward(loss_fn.backward())
    xt = torch.from_numpy(x).requires_grad_(True)
    logits_t = twin(xt)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(y))
    loss_t.backward()
    return (loss, logits, dx), (loss_t.detach().numpy(), logits_t.detach().numpy(), xt.grad.numpy())


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_training_step_matches_torch(arch):
    model, twin = make_pair(arch)
    assert model.training and twin.training
    x, y = batch()
    (loss, logits, dx), (loss_t, logits_t, dx_t) = step_both(model, twin, x, y)
    assert relative_error(logits, logits_t) < 1e-5
    assert relative_error(loss, loss_t) < 1e-5
    assert relative_error(dx, dx_t) < 1e-4
    torch_params = dict(twin.named_parameters())
    ours = list(model.named_parameters())
    assert [n for n, _, _ in ours] == list(torch_params)
    zero = zero_grad_by_math(model)
    assert len(zero) == (8 if arch.endswith("_bn") else 0)
    for name, p, g in ours:
        g_t = torch_params[name].grad.numpy()
        assert g.shape == g_t.shape and g.dtype == np.float32
        if name in zero:
            scale = np.linalg.norm(model.state_dict()[name.replace("bias", "weight")])
            assert np.linalg.norm(g) < 1e-6 * max(scale, 1) and np.linalg.norm(g_t) < 1e-6 * max(scale, 1)
        else:
            assert relative_error(g, g_t) < 1e-4, name
    # BatchNorm's running statistics moved the same way.
    state_t = twin.state_dict()
    for name, a in model.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert relative_error(a, state_t[name].numpy()) < 1e-5, name


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_adam_steps_match_torch(arch):
    optim = pytest.importorskip("minivgg.optim")
    model, twin = make_pair(arch, seed=1)
    opt = optim.Adam(model, lr=1e-3)
    opt_t = torch.optim.Adam(twin.parameters(), lr=1e-3)
    zero = zero_grad_by_math(model)
    for step in range(2):   # two steps: the second uses Adam's moments and bias correction
        x, y = batch(seed=10 + step)
        twin.zero_grad()
        (loss, _, _), (loss_t, _, _) = step_both(model, twin, x, y)
        assert relative_error(loss, loss_t) < 1e-5
        opt.step()
        opt_t.step()
        state_t = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
        for name, p, _ in model.named_parameters():
            if name in zero:
                # Adam turns noise g ~ 1e-10 into a step lr * g / (|g| + eps) << lr, in both.
                assert np.abs(p).max() < 0.1 * 1e-3 * (step + 1)
                assert np.abs(state_t[name]).max() < 0.1 * 1e-3 * (step + 1)
            else:
                assert relative_error(p, state_t[name]) < 1e-5, (step, name)


def test_eval_mode_with_dropout_matches_torch():
    model, twin = make_pair("vgg11_bn", dropout=0.5, pool_size=7)   # torchvision's 7x7 head
    x, y = batch()
    model.forward(x)          # one training pass so the running statistics are not trivial
    twin(torch.from_numpy(x))
    model.eval()
    twin.eval()
    x2, _ = batch(seed=5)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x2)).numpy()
    assert relative_error(model.forward(x2), expected) < 1e-5


def test_to_torch_mirrors_mode_dtype_and_frozen_layers():
    model, _ = make_pair("vgg11_bn")
    model.eval()
    model.features.freeze()
    twin = to_torch(model)
    assert not twin.training and not any(m.training for m in twin.modules())
    assert not twin.features[0].weight.requires_grad and twin.classifier[0].weight.requires_grad
    twin64 = to_torch(model.astype(np.float64))
    assert twin64.features[0].weight.dtype == torch.float64
    assert [type(m).__name__ for m in twin.children()] == ["Sequential", "AdaptiveAvgPool2d", "Sequential"]
    assert list(twin.state_dict()) == list(model.state_dict())


def _reinit_(twin, seed):
    """Give the torch model weights and BN statistics of its own, unlike any minivgg init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()                       # torch's default init
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
@pytest.mark.parametrize("via", ["state_dict", "npz"])
def test_load_torchvision_weights_gives_torch_logits(arch, via, tmp_path):
    _, twin = make_pair(arch, seed=2, dropout=0.5)
    _reinit_(twin, seed=3)
    twin.eval()
    x, _ = batch(seed=4)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    src = twin.state_dict()
    if via == "npz":
        src = export_npz(src, tmp_path / "weights")
        assert src.endswith("weights.npz")
    fresh, _ = make_pair(arch, seed=9, dropout=0.5)
    loaded = load_torchvision_weights(fresh, src)
    assert loaded == sorted(fresh.state_dict())
    fresh.eval()
    assert relative_error(fresh.forward(x), expected) < 1e-5


def test_load_torchvision_weights_errors_name_the_mismatch(tmp_path):
    model, twin = make_pair("vgg11")
    state = twin.state_dict()
    with pytest.raises(ValueError, match=r"missing from the source \(1\): features.3.weight"):
        load_torchvision_weights(model, {k: v for k, v in state.items() if k != "features.3.weight"})
    with pytest.raises(ValueError, match=r"not in the model \(1\): features.99.weight"):
        load_torchvision_weights(model, {**state, "features.99.weight": torch.zeros(1)})

    other, other_twin = make_pair("vgg11", seed=7, num_classes=3)
    with pytest.raises(ValueError) as e:
        load_torchvision_weights(model, other_twin.state_dict())
    msg = str(e.value)
    assert "classifier.6.weight: source (3, 64), model (10, 64)" in msg
    assert "skip=('classifier.6',)" in msg

    _, bn_twin = make_pair("vgg11_bn")
    with pytest.raises(ValueError, match="vgg16 vs vgg16_bn"):
        load_torchvision_weights(model, bn_twin.state_dict())
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_torchvision_weights(model, tmp_path / "nope.npz")
    # Every failed call checked before copying: the model still equals its twin.
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v.numpy())

    # Fine-tuning: take everything but the last layer, keep the new head.
    before = model.classifier[6].params["weight"].copy()
    load_torchvision_weights(model, other_twin.state_dict(), skip=("classifier.6",))
    np.testing.assert_array_equal(model.classifier[6].params["weight"], before)
    np.testing.assert_array_equal(model.features[0].params["weight"], other.features[0].params["weight"])
    assert not np.array_equal(model.features[0].params["weight"], twin.features[0].weight.detach().numpy())


def test_load_accepts_dataparallel_prefix_and_old_bn_checkpoints():
    model, twin = make_pair("vgg11_bn")
    state = {"module." + k: v for k, v in twin.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh, _ = make_pair("vgg11_bn", seed=5)
    load_torchvision_weights(fresh, state)
    np.testing.assert_array_equal(fresh.features[0].params["weight"], model.features[0].params["weight"])


def test_full_size_twin_keys_match_torchvision_vgg16_bn():
    # torchvision.models.vgg16_bn(): 13 convs with BN; last conv features.40, last BN features.41.
    model = vgg16_bn(width_ratio=64, hidden=(4, 4), pool_size=1)
    keys = list(to_torch(model).state_dict())
    assert keys[:7] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                        "features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"]
    assert "features.40.weight" in keys and "features.41.running_var" in keys and "features.43.weight" not in keys
    assert keys[-6:] == ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight",
                         "classifier.3.bias", "classifier.6.weight", "classifier.6.bias"]
    assert len(keys) == 13 * 2 + 13 * 5 + 6
