"""Mixed precision (minivgg/amp.py): float16 steps agree with float32, overflows skip, the scale moves, resume is exact."""
import numpy as np
import pytest

from minivgg import backend, random_stream
from minivgg.amp import LossScaler, MixedPrecision
from minivgg.data import DataLoader
from minivgg.layers import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, ReLU, Sequential
from minivgg.losses import SoftmaxCrossEntropy
from minivgg.models import vgg11_bn
from minivgg.optim import SGD, Adam
from minivgg.train import Trainer, load_checkpoint

U = 2.0 ** -11   # float16's unit roundoff


def smooth_net(device):
    """Conv-BN-ReLU x2, pool, Linear with BN betas of +5: every ReLU input stays far above 0.

    Away from ReLU's kink a float16 rounding moves the gradient by O(u); at the kink it
    flips a whole per-sample term, which no float16 tolerance covers (the same reason the
    float64 gradient checks keep inputs off kinks).
    """
    random_stream.seed(0)
    net = Sequential(Conv2d(3, 16, 3, padding=1, bias=False), BatchNorm2d(16), ReLU(),
                     Conv2d(16, 16, 3, padding=1, bias=False), BatchNorm2d(16), ReLU(),
                     AdaptiveAvgPool2d(1), Flatten(), Linear(16, 10))
    for _, m in net.modules():
        if isinstance(m, BatchNorm2d):
            m.params["bias"][...] = 5.0
    return net.to(device)


def batch(device, n=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return backend.to_device(x, device), backend.to_device(y, device)


def sgd_update(net, step_fn, lr=0.1):
    """The SGD step -lr * g that step_fn's gradients give (taken, then read off the grads:
    W' - W itself would lose digits to float32 cancellation against W)."""
    step_fn()
    step = {k: -lr * backend.to_numpy(g) for k, _, g in net.named_parameters()}
    SGD(net, lr=lr).step()
    return step


def test_float16_step_agrees_with_float32_step(device):
    """Tolerance: each float16 rounding costs at most u = 2^-11 relative. Per weight layer
    a step rounds ~3 times forward (its weight, its output, BatchNorm's output) and ~3 times
    backward (dout, dW, dx); to first order the errors add along the path, so a gradient
    of a net with D weight layers is within 6*D*u (normwise) of float32's. D = 3: 8.8e-3.
    """
    x, y = batch(device)
    loss_fn = SoftmaxCrossEntropy()
    ref_net, amp_net = smooth_net(device), smooth_net(device)

    def fp32():
        loss_fn(ref_net.forward(x), y)
        ref_net.backward(loss_fn.backward())

    # 2^10, not 2^16: this Linear's scaled dW would overflow (the overflow test covers that)
    amp = MixedPrecision(amp_net, LossScaler(init_scale=2.0 ** 10))
    found = []

    def fp16():
        logits = amp.forward(x)
        assert logits.dtype == np.float32
        loss_fn(logits, y)
        found.append(bool(backend.to_numpy(amp.backward(loss_fn.backward()))))

    ref, got = sgd_update(ref_net, fp32), sgd_update(amp_net, fp16)
    assert found == [False]
    tol = 6 * 3 * U
    for k in ref:
        err = np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()
        assert err < tol, (k, err, tol)
    # the precisions: float16 weights for compute, float32 BatchNorm, master and grads
    w = dict(amp.working.modules())
    assert w["0"].params["weight"].dtype == np.float16 and w["8"].params["weight"].dtype == np.float16
    for _, p, g in amp_net.named_parameters():
        assert p.dtype == np.float32 and g.dtype == np.float32
    assert amp_net[1].buffers["running_mean"].dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(amp_net[1].buffers["running_mean"]),
                               backend.to_numpy(ref_net[1].buffers["running_mean"]), rtol=6 * U, atol=6 * U)


def test_vgg_logits_agree_with_float32(device):
    """The forward pass has no kinks in its values: logits within 3*D*u, D = 11 weight layers."""
    random_stream.seed(0)
    model = vgg11_bn(num_classes=10, in_channels=1, width_ratio=16, hidden=(32, 32), pool_size=1,
                     dropout=0.0).to(device)
    x = backend.to_device(np.random.default_rng(2).standard_normal((8, 1, 32, 32)).astype(np.float32), device)
    model.eval()
    ref = backend.to_numpy(model.forward(x))
    got = backend.to_numpy(MixedPrecision(model).forward(x))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 3 * 11 * U, err


def tiny_trainer(device, tmp_path, amp, steps=None, lr=1e-2, **kw):
    random_stream.seed(0)
    model = vgg11_bn(num_classes=10, in_channels=1, width_ratio=32, hidden=(16, 16), pool_size=1, dropout=0.0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 1, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 32)
    loader = DataLoader(images, labels, batch_size=8, shuffle=True, seed=3, normalize=((0.5,), (0.25,)),
                        device=device)
    model = model.to(device)
    return Trainer(model, Adam(model, lr=lr), loader, out_dir=tmp_path, progress=False, plots=False,
                   device=device, max_steps=steps, amp=amp, **kw)


def state(trainer):
    w = {k: backend.to_numpy(v).copy() for k, v in trainer.model.state_dict().items()}
    o = {k: np.array(backend.to_numpy(v)).copy() for k, v in trainer.optimizer.state_dict().items()}
    return w, o


def test_overflow_skips_the_step_and_halves_the_scale(device, tmp_path):
    tr = tiny_trainer(device, tmp_path, LossScaler(init_scale=2.0 ** 4), steps=2, checkpoints=False)
    tr.fit(1)                                   # two clean steps: Adam state exists
    assert tr.amp.scaler.skipped_steps == 0
    w0, o0 = state(tr)
    tr.amp.scaler.scale = 2.0 ** 40             # dlogits * S > 65504: inf in float16
    tr.max_steps = 3
    tr.fit(1)
    assert tr.global_step == 3 and tr.amp.scaler.skipped_steps == 1
    assert tr.amp.scaler.scale == 2.0 ** 39 and tr.amp.scaler.clean_steps == 0
    w1, o1 = state(tr)
    for k in w0:
        if "running" not in k and "num_batches" not in k:   # BatchNorm statistics move in forward
            np.testing.assert_array_equal(w1[k], w0[k], err_msg=k)
    assert o1.keys() == o0.keys()
    for k in o0:
        np.testing.assert_array_equal(o1[k], o0[k], err_msg=k)


def test_scale_grows_after_growth_interval_clean_steps(device, tmp_path):
    tr = tiny_trainer(device, tmp_path, LossScaler(init_scale=2.0 ** 4, growth_interval=3), steps=7,
                      checkpoints=False)
    tr.fit(2)
    s = tr.amp.scaler
    assert s.skipped_steps == 0 and s.scale == 2.0 ** 6 and s.clean_steps == 1


def test_loss_scaler_rules_and_state():
    s = LossScaler(init_scale=8.0, growth_interval=2)
    assert [s.update(False), s.scale, s.update(False), s.scale] == [True, 8.0, True, 16.0]
    assert s.update(True) is False and s.scale == 8.0 and s.skipped_steps == 1
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    big = LossScaler(init_scale=2.0 ** 127, growth_interval=1)
    big.update(False)
    assert big.scale == 2.0 ** 127          # 2^128 overflows float32: kept, as GradScaler does
    for bad in (dict(init_scale=0), dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0)):
        with pytest.raises(ValueError):
            LossScaler(**bad)
    with pytest.raises(ValueError, match="expected keys"):
        t.load_state_dict({"scale": 1.0})


def test_resume_is_exact_with_amp(device, tmp_path):
    """N steps + save + load + N steps == 2N steps: master weights, Adam state, loss scale."""
    straight = tiny_trainer(device, tmp_path / "a", LossScaler(growth_interval=3))
    straight.fit(2)
    first = tiny_trainer(device, tmp_path / "b", LossScaler(growth_interval=3), steps=6)
    first.fit(2)
    ckpt = load_checkpoint(first.last_path)
    assert ckpt["extra"]["trainer"]["loss_scaler"] == first.amp.scaler.state_dict()
    assert all(v.dtype != np.float16 for v in ckpt["model"].values())
    resumed = tiny_trainer(device, tmp_path / "b", LossScaler(growth_interval=3))
    resumed.fit(2, resume=first.last_path)
    assert resumed.amp.scaler.state_dict() == straight.amp.scaler.state_dict()
    assert resumed.amp.scaler.scale != 2.0 ** 16                 # it moved, so the restore mattered
    w_a, o_a = state(straight)
    w_b, o_b = state(resumed)
    for k in w_a:
        np.testing.assert_array_equal(w_b[k], w_a[k], err_msg=k)
    for k in o_a:
        np.testing.assert_array_equal(o_b[k], o_a[k], err_msg=k)


@pytest.mark.slow
def test_amp_reaches_float32_accuracy_on_fashion_mnist(tmp_path):
    """300 steps (3 epochs of 6,400 images) of VGG-11-BN at 1/16 width, 32x32, float32 and mixed
    precision from the same weights and batches, over four seeds: on average within a point.

    One seed is not a measure: the two runs part ways at the first rounding difference, and
    what the 10,000 test images then give moves by more than a point either way. Measured
    on this machine (commit 2b7e5a8, seeds 0-3): float32 82.72, 83.41, 83.48, 80.24%;
    mixed precision minus float32 -0.19, +0.02, -0.80, +2.61 points (mean +0.41).
    With the bias trick in Conv2d (new roundings): float32 83.38, 83.13, 83.58, 80.65%;
    differences -1.78, +0.22, -0.24, +1.02 (mean -0.20). So: the mean within 1 point, and
    no seed off by more than 3 points, about float32's own spread across the seeds (3.24
    and 2.93 points in those two runs).
    """
    from minivgg.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, prepare_images
    from minivgg.optim import CosineAnnealingLR
    from minivgg.train import evaluate
    data = "/usr/share/datasets/fashion-mnist"
    images, labels = load_fashion_mnist("train", data, download=False)
    test_images, test_labels = load_fashion_mnist("test", data, download=False)
    x = prepare_images(images[:6400], size=(32, 32), channels=1)
    x_test = prepare_images(test_images, size=(32, 32), channels=1)
    norm = (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    acc = {}
    for seed in range(4):
        for amp in (False, True):
            random_stream.seed(seed)
            model = vgg11_bn(num_classes=10, in_channels=1, width_ratio=16, hidden=(256, 256), pool_size=1,
                             dropout=0.0, init="xavier")
            opt = Adam(model, lr=2e-3)
            train = DataLoader(x, labels[:6400], batch_size=64, shuffle=True, seed=seed, normalize=norm)
            tr = Trainer(model, opt, train, scheduler=CosineAnnealingLR(opt, T_max=3),
                         out_dir=tmp_path / f"{seed}_{amp}", progress=False, plots=False, checkpoints=False, amp=amp)
            tr.fit(3)
            acc[seed, amp] = evaluate(model, DataLoader(x_test, test_labels, batch_size=500, shuffle=False,
                                                        normalize=norm))["top1"]
    float32 = [acc[s, False] for s in range(4)]
    differences = [acc[s, True] - acc[s, False] for s in range(4)]
    assert min(float32) > 0.78, acc                               # every float32 run learned
    assert abs(sum(differences) / 4) < 0.01, acc
    assert max(abs(d) for d in differences) < 0.03, acc


@pytest.mark.skipif(not getattr(backend.cupy, "is_fake", False), reason="transfer counts come from the CuPy stand-in")
@pytest.mark.parametrize("clip_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_amp_adds_no_copy_back_per_step(tmp_path, clip_norm):
    """The overflow flag rides in the step's one device-to-host copy; the scale stays on the host."""
    tr = tiny_trainer("gpu", tmp_path, LossScaler(), checkpoints=False, clip_norm=clip_norm)
    tr.train_loader.prefetch = 0
    with backend.cupy.counting() as c:
        tr.train_epoch(0, 1)
    steps = len(tr.train_loader)
    assert tr.global_step == steps == 4
    assert c["d2h"] == steps, c
    assert c["h2d"] == 2 * steps, c      # x and y of each batch: the float16 copy is made on the device
    assert c["sync"] == 0, c
