"""Freezing by blocks (no weight-gradient work in frozen layers, no work at all below the lowest
trainable one), the frozen-BatchNorm rule, and the two-phase schedule's exact resume."""
import numpy as np
import pytest
import torch

from minivgg import backend, random_stream
from minivgg.data import DataLoader
from minivgg.layers import BatchNorm2d, Conv2d, Linear, Sequential
from minivgg.models import vgg11_bn
from minivgg.models.torch_interop import to_torch
from minivgg.optim import Adam, CosineAnnealingLR
from minivgg.train import Trainer, Unfreeze, conv_blocks, freeze_blocks, frozen_blocks, skip_input_grad


def tiny(seed=0, dtype=np.float32):
    random_stream.seed(seed)
    model = vgg11_bn(num_classes=5, in_channels=1, width_ratio=16, hidden=(8,), pool_size=1, dropout=0.0)
    return model.astype(dtype)


def test_blocks_are_the_convolutions_up_to_each_max_pool():
    model = tiny()
    blocks = conv_blocks(model)
    # VGG-11-BN: conv1 | conv2 | conv3-4 | conv5-6 | conv7-8, each conv with BN and ReLU, then a pool
    assert [len(b) for b in blocks] == [4, 4, 7, 7, 7]
    assert sum(blocks, []) == list(range(len(model.features.layers)))
    trainable = freeze_blocks(model, 2)
    for b, indices in enumerate(blocks):
        for i in indices:
            assert model.features.layers[i].frozen is (b < 2)
    assert frozen_blocks(model) == 2
    assert trainable == sum(p.size for n, p, _ in model.named_parameters(trainable_only=False)
                            if not n.startswith(("features.0.", "features.1.", "features.4.", "features.5.")))
    freeze_blocks(model, "all")
    assert frozen_blocks(model) == 5 and not any(n.startswith("features") for n, _, _ in model.named_parameters())
    assert all(not m.frozen for m in model.classifier.layers)
    freeze_blocks(model, 0)
    assert frozen_blocks(model) == 0
    for bad in (-1, 6, 2.0, "some", True):
        with pytest.raises(ValueError, match="k must be an integer from 0 to 5"):
            freeze_blocks(model, bad)


def count_backward(model):
    """Wrap every layer's backward: {name: [returned None?, ...]} for each call."""
    calls = {}
    for name, m in model.modules():
        if m.children():
            continue
        calls[name] = []

        def wrapped(dout, _m=m, _orig=m.backward, _name=name):
            dx = _orig(dout)
            calls[_name].append(dx is None)
            return dx
        m.backward = wrapped
    return calls


def test_frozen_blocks_skip_weight_gradients_and_everything_below_the_lowest_trainable_layer():
    model = tiny()
    freeze_blocks(model, 3)
    skip_input_grad(model)                       # the images need no gradient, as in training
    calls = count_backward(model)
    x = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    model.train()
    out = model.forward(x)
    assert model.backward(np.ones_like(out)) is None
    blocks = conv_blocks(model)
    lowest = blocks[3][0]                        # block 4's first convolution
    for i, m in enumerate(model.features.layers):
        name = f"features.{i}"
        if i < lowest:                           # below the lowest trainable layer: never run backward
            assert calls[name] == [], name
            assert not m.grads, name
        elif i == lowest:                        # weight gradient only, no dL/dx
            assert calls[name] == [True] and set(m.grads) == {"weight", "bias"}
            assert m.needs_input_grad is True, "the container put the layer's flag back"
        else:
            assert len(calls[name]) == 1, name
    # and a frozen layer above a trainable one still passes dL/dx down but makes no weight gradient
    model2 = tiny()
    model2.features.freeze()
    model2.classifier[0].freeze()                # the head's first Linear frozen, its last trains
    model2.train()
    out = model2.forward(x)
    dx = model2.backward(np.ones_like(out))
    assert dx.shape == x.shape                   # the first conv's flag asks for dL/dx: it comes back
    assert not model2.classifier[0].grads and set(model2.classifier[-1].grads) == {"weight", "bias"}
    assert not any(m.grads for m in model2.features.layers)


def test_frozen_blocks_equal_pytorch_autograd_with_frozen_batchnorm_in_eval_mode():
    """The gradients that are made are the right ones: PyTorch with requires_grad=False on the frozen
    blocks and their BatchNorm layers in eval mode (the rule minivgg applies by itself)."""
    model = tiny(seed=1, dtype=np.float64)
    for _, m in model.modules():   # running statistics that are not the defaults
        if isinstance(m, BatchNorm2d):
            m.buffers["running_mean"] += np.random.default_rng(2).normal(size=m.num_features) * 0.1
            m.buffers["running_var"] *= 1.5
    freeze_blocks(model, 2)
    model.train()
    twin = to_torch(model).train()
    for name, m in twin.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad:
            m.eval()
    x = np.random.default_rng(3).normal(size=(3, 1, 32, 32))
    dout = np.random.default_rng(4).normal(size=(3, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = twin(xt)
    yt.backward(torch.from_numpy(dout))
    y = model.forward(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-12)
    dx = model.backward(dout)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12 * np.abs(dx).max())
    grads = {n: g for n, _, g in model.named_parameters()}
    for name, p in twin.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
        else:
            assert name not in grads
    state = model.state_dict()
    for name, b in twin.named_buffers():   # the trained blocks moved their statistics exactly as torch did
        np.testing.assert_allclose(backend.to_numpy(state[name]), b.numpy(), rtol=1e-12, err_msg=name)


def test_frozen_batchnorm_normalises_with_its_running_statistics_and_keeps_them():
    random_stream.seed(0)
    bn = BatchNorm2d(3)
    bn.buffers["running_mean"][...] = [0.5, -1.0, 2.0]
    bn.buffers["running_var"][...] = [4.0, 0.25, 1.0]
    bn.params["weight"][...] = [1.5, 0.5, 2.0]
    before = {k: v.copy() for k, v in bn.buffers.items()}
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    bn.freeze().train()
    out = bn.forward(x)
    for k, v in bn.buffers.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    want = bn.eval().forward(x)                     # eval mode: the running statistics
    np.testing.assert_array_equal(out, want)
    bn.train().forward(x)
    dx = bn.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, np.ones_like(x) * (bn.params["weight"] / np.sqrt(bn.buffers["running_var"]
                                                                                     + bn.eps)).reshape(1, 3, 1, 1),
                               rtol=1e-6)
    assert not bn.grads
    bn.freeze(False).train()                        # released: batch statistics again, and they move
    bn.forward(x)
    assert not np.array_equal(bn.buffers["running_mean"], before["running_mean"])
    assert int(bn.buffers["num_batches_tracked"]) == 1


def test_freezing_drops_old_gradients_and_a_plain_sequential_honours_the_rule():
    random_stream.seed(0)
    net = Sequential(Conv2d(1, 2, 3, padding=1), BatchNorm2d(2), Linear(2, 2))
    x = np.random.default_rng(0).normal(size=(2, 1, 4, 4)).astype(np.float32)
    first = Sequential(*net.layers[:2])
    first.forward(x)
    first.backward(np.ones((2, 2, 4, 4), np.float32))
    assert net[0].grads
    net[0].freeze()
    assert not net[0].grads, "freeze() leaves no stale gradient behind"
    net[0].needs_input_grad = False
    first.forward(x)
    assert first.backward(np.ones((2, 2, 4, 4), np.float32)) is None   # only BN trains: conv not run
    assert not net[0].grads and set(net[1].grads) == {"weight", "bias"}


# -- the two-phase schedule --------------------------------------------------------------------------
def two_phase_run(out_dir, max_steps=None, resume=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 5, 40)
    loader = DataLoader(images, labels, batch_size=8, shuffle=True, seed=1, normalize=((0.5,), (0.25,)))
    model = tiny(seed=0)
    freeze_blocks(model, "all")
    opt = Adam(model, lr=1e-2)
    sched = CosineAnnealingLR(opt, T_max=4)
    phase2 = Unfreeze(at=2, frozen=3, lr=1e-3, schedule=lambda o, n: CosineAnnealingLR(o, T_max=n))
    trainer = Trainer(model, opt, loader, out_dir=out_dir, progress=False, plots=False, scheduler=sched,
                      max_steps=max_steps, skip_input_grad=True, unfreeze=phase2)
    trainer.fit(4, resume=resume)
    return model, trainer


@pytest.mark.parametrize("stop_at", [7, 10, 13], ids=["phase1-mid-epoch", "at-the-change", "phase2-mid-epoch"])
def test_two_phase_resume_is_bit_exact(tmp_path, stop_at):
    whole, ref = two_phase_run(tmp_path / "whole")
    _, first = two_phase_run(tmp_path / "split", max_steps=stop_at)
    assert first.global_step == stop_at
    resumed, second = two_phase_run(tmp_path / "split2", resume=tmp_path / "split" / "last.npz")
    assert [r["phase"] for r in second.history] == [1, 1, 2, 2] == [r["phase"] for r in ref.history]
    a, b = whole.state_dict(), resumed.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [r["train_loss"] for r in ref.history] == [r["train_loss"] for r in second.history]
    assert second.optimizer.state.keys() == ref.optimizer.state.keys()
    for name, entry in ref.optimizer.state.items():
        assert entry["step"] == second.optimizer.state[name]["step"] == 10, name   # restarted at the change
        np.testing.assert_array_equal(entry["exp_avg"], second.optimizer.state[name]["exp_avg"])


def test_the_second_phase_unfreezes_the_top_blocks_at_its_learning_rate(tmp_path):
    model, trainer = two_phase_run(tmp_path)
    assert frozen_blocks(model) == 3 and trainer.second_phase
    trained = {n for n, _, _ in model.named_parameters()}
    assert "features.15.weight" in trained and "features.11.weight" not in trained
    start = tiny(seed=0).state_dict()
    after = model.state_dict()
    assert np.array_equal(start["features.0.weight"], after["features.0.weight"])       # never trained
    assert not np.array_equal(start["features.15.weight"], after["features.15.weight"])  # phase 2 trained it
    lrs = [r["lr"] for r in trainer.history]
    assert lrs[2] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-2)


def test_unfreeze_checks_its_arguments():
    with pytest.raises(ValueError, match="at must be an epoch >= 1"):
        Unfreeze(at=0)
    with pytest.raises(ValueError, match="frozen must be"):
        Unfreeze(at=1, frozen=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        Unfreeze(at=1, lr=0.0)
    model = tiny()
    freeze_blocks(model, 2)
    with pytest.raises(ValueError, match="froze 2 block"):
        Unfreeze(at=1, frozen=3).apply(model, Adam(model, lr=1e-3), 4)
