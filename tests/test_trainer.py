"""The training loop: exact resume, gradient accumulation, NaN stops, early stopping, overfitting a batch."""
import json
import math

import numpy as np
import pytest

from minivgg import random_stream
from minivgg.data import DataLoader, transforms
from minivgg.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from minivgg.losses import SoftmaxCrossEntropy
from minivgg.models import vgg11, vgg11_bn
from minivgg.optim import SGD, Adam, CosineAnnealingLR, LinearWarmup
from minivgg.train import NonFiniteLossError, Trainer, evaluate, freeze_features, load_checkpoint


def toy_data(n=48, size=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    return images, labels


def tiny_vgg(seed=0, bn=True, dropout=0.5, width_ratio=32, head="classic"):
    """VGG-11 with 2..16 channels: the real architecture, milliseconds per step."""
    random_stream.seed(seed)
    make = vgg11_bn if bn else vgg11
    hidden = (16, 16) if head == "classic" else ()
    return make(num_classes=10, in_channels=1, width_ratio=width_ratio, head=head, hidden=hidden,
                pool_size=1, dropout=dropout)


def weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def quiet(model, opt, loader, out_dir, **kw):
    kw.setdefault("plots", False)
    return Trainer(model, opt, loader, out_dir=out_dir, progress=False, **kw)


# -- resume ------------------------------------------------------------------------------
def resumable_run(out_dir, model_seed, max_steps=None, resume=None, scramble_rng=False):
    """Adam + warmup + cosine, BN, dropout, shuffled and augmented batches: every kind of state."""
    images, labels = toy_data()
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    train = DataLoader(images, labels, batch_size=8, shuffle=True, seed=3, transform=augment,
                       normalize=((0.5,), (0.25,)))
    val = DataLoader(images[:16], labels[:16], batch_size=8, shuffle=False, normalize=((0.5,), (0.25,)))
    model = tiny_vgg(seed=model_seed)
    opt = Adam(model, lr=1e-2)
    sched = LinearWarmup(opt, warmup_steps=4, after=CosineAnnealingLR(opt, T_max=3))
    if scramble_rng:
        random_stream.seed(987654)   # a resumed process starts from some other generator state
    trainer = quiet(model, opt, train, out_dir, val_loader=val, scheduler=sched, max_steps=max_steps)
    trainer.fit(3, resume=resume)
    return model, trainer


@pytest.mark.parametrize("stop_at", [9, 6], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_bit_exact(tmp_path, stop_at):
    full, full_trainer = resumable_run(tmp_path / "full", model_seed=0)          # 3 epochs x 6 = 18 steps
    _, first = resumable_run(tmp_path / "split", model_seed=0, max_steps=stop_at)
    assert first.global_step == stop_at and first.stop_reason == "max_steps"
    resumed, second = resumable_run(tmp_path / "resumed", model_seed=1, scramble_rng=True,
                                    resume=tmp_path / "split" / "last.npz")
    assert second.global_step == full_trainer.global_step == 18
    for name, a in full.state_dict().items():
        assert np.array_equal(a, resumed.state_dict()[name]), f"{name} differs after resume"
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in full_trainer.history]
    assert second.history[-1]["val_top1"] == full_trainer.history[-1]["val_top1"]


# -- gradient accumulation -----------------------------------------------------------------
def test_accumulating_two_micro_batches_equals_one_double_batch(tmp_path):
    images, labels = toy_data(n=32)
    runs = {}
    for accum, batch in ((1, 8), (2, 4)):
        model = tiny_vgg(seed=0, bn=False, dropout=0.0, width_ratio=32)
        loader = DataLoader(images, labels, batch_size=batch, shuffle=True, seed=1, prefetch=0)
        quiet(model, SGD(model, lr=0.5, momentum=0.9), loader, tmp_path / str(accum), accum_steps=accum,
              checkpoints=False).fit(1)
        runs[accum] = weights(model)
    start = weights(tiny_vgg(seed=0, bn=False, dropout=0.0, width_ratio=32))
    for name in start:
        assert not np.allclose(runs[1][name], start[name]), f"{name} did not train"
        np.testing.assert_allclose(runs[2][name], runs[1][name], rtol=1e-4, atol=1e-6, err_msg=name)


# -- stopping ------------------------------------------------------------------------------------
class NaNOnCall(SoftmaxCrossEntropy):
    """Cross-entropy that returns NaN on its n-th call, as an overflowing run would."""
    factor = np.float32("nan")   # what the n-th loss is multiplied by

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits, labels):
        self.calls += 1
        loss = super().forward(logits, labels)
        return loss * self.factor if self.calls == self.n else loss


def test_nonfinite_loss_stops_at_that_step_and_keeps_the_last_checkpoint(tmp_path):
    images, labels = toy_data(n=24)
    loader = DataLoader(images, labels, batch_size=8, seed=0)          # 3 steps per epoch
    model = tiny_vgg(width_ratio=64)
    trainer = quiet(model, SGD(model, lr=0.01), loader, tmp_path, loss_fn=NaNOnCall(5))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 5 .*"
                                                 r"last good checkpoint .*last\.npz is untouched") as err:
        trainer.fit(5)
    assert err.value.epoch == 2 and err.value.step == 5
    saved = load_checkpoint(tmp_path / "last.npz")
    assert saved["epoch"] == 1 and saved["global_step"] == 3           # the end of epoch 1
    assert all(np.isfinite(a).all() for a in saved["model"].values() if a.dtype.kind == "f")
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 1


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    images, labels = toy_data(n=16)
    loader = DataLoader(images, labels, batch_size=8, seed=0)
    model = tiny_vgg(width_ratio=64, dropout=0.0)
    trainer = quiet(model, SGD(model, lr=0.0), loader, tmp_path, val_loader=loader, patience=2)
    history = trainer.fit(10)                                          # lr 0: accuracy never improves
    assert trainer.stop_reason == "early_stopping" and len(history) == 3
    assert load_checkpoint(tmp_path / "best.npz")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.npz")["epoch"] == 3


# -- learning ------------------------------------------------------------------------------------
def test_initial_loss_is_ln10_and_a_tiny_vgg_overfits_one_batch(tmp_path):
    images, labels = toy_data(n=8)
    labels = np.arange(8)
    loader = DataLoader(images, labels, batch_size=8, shuffle=False, normalize=((0.5,), (0.29,)))
    model = tiny_vgg(seed=0, dropout=0.0, head="gap")
    start = evaluate(model, loader)["loss"]          # torchvision's init: last layer N(0, 0.01^2)
    assert abs(start - math.log(10)) < 0.1, start
    history = quiet(model, Adam(model, lr=1e-2), loader, tmp_path, checkpoints=False).fit(40)
    assert history[-1]["train_loss"] < 0.05, [round(h["train_loss"], 3) for h in history[::10]]
    assert history[-1]["train_acc"] == 1.0


def test_freeze_features_trains_only_the_head(tmp_path):
    images, labels = toy_data(n=16)
    model = tiny_vgg(width_ratio=64, dropout=0.0)
    trainable = freeze_features(model)
    assert trainable == sum(p.size for n, p, _ in model.named_parameters(trainable_only=False)
                            if n.startswith("classifier"))
    before = weights(model)
    loader = DataLoader(images, labels, batch_size=8, seed=0)
    quiet(model, SGD(model, lr=0.1), loader, tmp_path, checkpoints=False).fit(1)
    after = weights(model)
    for name in before:
        if name.startswith("features") and not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert np.array_equal(before[name], after[name]), name
    assert not np.array_equal(before["classifier.6.weight"], after["classifier.6.weight"])
    freeze_features(model, False)
    assert len(list(model.named_parameters())) == len(list(model.named_parameters(trainable_only=False)))


def test_a_run_writes_history_checkpoints_and_plots(tmp_path, device):
    images, labels = toy_data(n=24)
    loader = DataLoader(images, labels, batch_size=8, seed=0, normalize=((0.5,), (0.25,)), device=device)
    model = Sequential(Conv2d(1, 4, 3, padding=1), ReLU(), MaxPool2d(4), Flatten(),
                       Linear(4 * 8 * 8, 10)).to(device)
    trainer = Trainer(model, SGD(model, lr=0.05), loader, val_loader=loader, out_dir=tmp_path, progress=True,
                      class_names=[f"c{i}" for i in range(10)], extra={"note": "toy"}, device=device)
    history = trainer.fit(2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.npz", "confusion.png", "eval.json", "history.csv", "history.json", "history.png",
                     "last.npz", "mistakes.png", "predictions.png"]
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "val_top1" in rows[0] and len(rows) == 3
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(json.dumps(history))
    ckpt = load_checkpoint(tmp_path / "last.npz")
    assert ckpt["extra"]["class_names"][3] == "c3" and ckpt["extra"]["note"] == "toy"
    assert len(json.loads((tmp_path / "eval.json").read_text())["confusion"]) == 10
