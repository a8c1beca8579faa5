"""Channel pruning: the smaller dense VGG equals the original with the dropped channels zeroed."""
import numpy as np
import pytest

import minivgg
from minivgg.models import VGG, build_model
from minivgg.models.prune import prune, select_channels, zero_pruned_channels


def _trained_like(arch, **kw):
    """A VGG whose BN scales and statistics are spread out, as after training with a penalty."""
    minivgg.seed(0)
    model = VGG(arch, **kw)
    rng = np.random.default_rng(5)
    for _, m in model.modules():
        if "running_mean" in getattr(m, "buffers", {}):
            c = m.buffers["running_mean"].shape[0]
            m.params["weight"][...] = rng.choice([-1, 1], c) * rng.uniform(0.01, 1.5, c)
            m.params["bias"][...] = rng.normal(0, 0.1, c)
            m.buffers["running_mean"][...] = rng.normal(0, 0.2, c)
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
    return model


CASES = [("vgg11_bn", "bn", dict(head="classic", hidden=(24,), pool_size=2)),
         ("vgg11_bn", "bn", dict(head="gap")),
         ("vgg13", "l1", dict(head="classic", hidden=(16, 16), pool_size=1))]


@pytest.mark.parametrize("arch,rule,head", CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pruned_equals_unpruned_with_the_channels_zeroed(arch, rule, head, mode):
    model = _trained_like(arch, num_classes=6, in_channels=2, width_ratio=8, dropout=0.0, **head)
    getattr(model, mode)()
    keep = select_channels(model, 0.5, rule)
    small = prune(model, 0.5, rule)
    assert small.config["channels"] == [len(k) for k in keep]
    assert small.num_params() < model.num_params()
    zero_pruned_channels(model, keep)
    x = np.random.default_rng(1).normal(size=(3, 2, 64, 64)).astype(np.float32)
    want, got = model.forward(x), small.forward(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_global_threshold_removes_the_smallest_scales_and_rebuilds_from_config():
    model = _trained_like("vgg11_bn", num_classes=4, in_channels=1, width_ratio=8, hidden=(16,),
                          pool_size=1)
    keep = select_channels(model, 0.6, "bn", min_channels=2)
    gammas = [np.abs(m.params["weight"]) for _, m in model.modules()
              if "running_mean" in getattr(m, "buffers", {})]
    threshold = np.quantile(np.concatenate(gammas), 0.6)
    for g, k in zip(gammas, keep):
        assert set(k) == set(np.flatnonzero(g > threshold)) or len(k) == 2
    small = prune(model, 0.6, "bn", min_channels=2)
    again = build_model(small.config)               # an ordinary checkpoint config
    assert [m.params["weight"].shape for _, m in again.modules() if "weight" in getattr(m, "params", {})] == \
        [m.params["weight"].shape for _, m in small.modules() if "weight" in getattr(m, "params", {})]


def test_bad_arguments_are_named():
    model = VGG("vgg11", num_classes=3, in_channels=1, width_ratio=16, hidden=(8,), pool_size=1)
    with pytest.raises(ValueError, match="rule 'bn' needs a BatchNorm after every convolution"):
        prune(model, 0.5, "bn")
    with pytest.raises(ValueError, match=r"ratio .* must be in \[0, 1\)"):
        prune(model, 1.0, "l1")
    with pytest.raises(ValueError, match="channels must list 8 positive widths"):
        VGG("vgg11", channels=[4] * 7)


def test_l1_penalty_subgradient_gradcheck_away_from_zero(device):
    """dL/dgamma of (sum(G * out) + lam * sum|gamma|): the layer's gradient plus lam * sign(gamma)."""
    from minivgg import backend
    from minivgg.gradcheck import numerical_gradient, relative_error
    from minivgg.layers import BatchNorm2d
    rng = np.random.default_rng(0)
    bn = BatchNorm2d(3).astype(np.float64).to(device)
    bn.params["weight"][...] = backend.to_device(np.array([0.7, -0.4, 1.3]), device)  # away from 0
    x = backend.to_device(rng.normal(size=(4, 3, 3, 2)), device)
    G = backend.to_device(rng.normal(size=(4, 3, 3, 2)), device)
    lam = 0.3

    def loss():
        return (G * bn.forward(x)).sum() + lam * np.abs(backend.to_numpy(bn.params["weight"])).sum()

    bn.forward(x)
    bn.backward(G)
    penalty = bn.l1_penalty(lam)
    assert float(backend.to_numpy(penalty)) == pytest.approx(lam * 2.4)
    numeric = numerical_gradient(loss, bn.params["weight"])
    assert relative_error(bn.grads["weight"], numeric) < 1e-6
    bn.params["weight"][...] = 0                                  # at the kink: subgradient 0
    bn.forward(x)
    bn.backward(G)
    before = backend.to_numpy(bn.grads["weight"]).copy()
    bn.l1_penalty(lam)
    np.testing.assert_array_equal(backend.to_numpy(bn.grads["weight"]), before)
