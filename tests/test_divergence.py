"""A diverging run stops before its weights reach a checkpoint, and says truly what is kept and what to try."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from minivgg.data import DataLoader
from minivgg.optim import SGD
from minivgg.train import NonFiniteLossError, load_checkpoint

_spec = importlib.util.spec_from_file_location(
    "train_vgg11", Path(__file__).resolve().parents[1] / "examples" / "train_vgg11.py")
_train_vgg11 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_vgg11)
divergence_advice = _train_vgg11.divergence_advice
from test_trainer import NaNOnCall, quiet, tiny_vgg, toy_data


class NaNValidationFrom:
    """A validation loader whose images turn NaN from its n-th pass on (weights that overflowed)."""

    def __init__(self, images, labels, n):
        self.x = (images.astype(np.float32) - 128) / 64                # (B, 1, 32, 32)
        self.y, self.n, self.passes = labels, n, 0

    def __len__(self):
        return 1

    def __iter__(self):
        self.passes += 1
        yield (self.x * np.float32("nan") if self.passes >= self.n else self.x), self.y


def test_nonfinite_validation_stops_before_last_and_best_are_overwritten(tmp_path):
    images, labels = toy_data(n=16)
    loader = DataLoader(images, labels, batch_size=8, seed=0)
    model = tiny_vgg(width_ratio=64)                                    # with BatchNorm
    trainer = quiet(model, SGD(model, lr=0.01), loader, tmp_path, val_loader=NaNValidationFrom(images, labels, 2))
    with pytest.raises(NonFiniteLossError, match=r"non-finite validation loss \(nan\) in the validation after "
                                                 r"epoch 2 \(step 4\).*last\.npz is untouched \(epoch 1\)") as err:
        trainer.fit(3)
    msg = str(err.value)   # facts, not flags: the command line turns them into advice
    assert "the model has BatchNorm" in msg and "gradients were not clipped" in msg and "--" not in msg, msg
    assert divergence_advice(err.value) == "a lower --lr or --clip-norm"   # BN is on already
    assert load_checkpoint(tmp_path / "last.npz")["epoch"] == 1
    assert load_checkpoint(tmp_path / "best.npz")["epoch"] == 1


def test_a_checkpoint_from_an_earlier_run_is_not_called_this_runs_last_good_one(tmp_path):
    images, labels = toy_data(n=16)
    loader = DataLoader(images, labels, batch_size=8, seed=0)
    model = tiny_vgg(width_ratio=64, bn=False)
    quiet(model, SGD(model, lr=0.01), loader, tmp_path).fit(1)          # an earlier run in the same folder
    model = tiny_vgg(width_ratio=64, bn=False)
    trainer = quiet(model, SGD(model, lr=0.01), loader, tmp_path, loss_fn=NaNOnCall(1), clip_norm=1.0)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(2)
    msg = str(err.value)
    assert "no checkpoint of this run had been written yet" in msg and "from an earlier run" in msg, msg
    assert "is untouched" not in msg
    assert "the model has no BatchNorm" in msg and "gradients were clipped" in msg and "--" not in msg, msg
    assert divergence_advice(err.value) == "a lower --lr or BatchNorm (--bn)"   # no BN here; clipping is on


class ExplodeOnCall(NaNOnCall):
    """Cross-entropy that returns a huge but finite loss on its n-th call."""
    factor = np.float32(1e28)


def test_a_finite_explosion_stops_the_run(tmp_path):
    images, labels = toy_data(n=24)
    loader = DataLoader(images, labels, batch_size=8, seed=0)           # 3 steps per epoch
    model = tiny_vgg(width_ratio=64)
    trainer = quiet(model, SGD(model, lr=0.01), loader, tmp_path, loss_fn=ExplodeOnCall(5))
    with pytest.raises(NonFiniteLossError, match=r"exploding loss \(.*e\+28\), over 10000 x the run's first "
                                                 r"loss .* at epoch 2, step 5") as err:
        trainer.fit(3)
    assert err.value.step == 5
    assert load_checkpoint(tmp_path / "last.npz")["global_step"] == 3


def test_the_explosion_bound_can_be_turned_off(tmp_path):
    images, labels = toy_data(n=24)
    loader = DataLoader(images, labels, batch_size=8, seed=0)
    model = tiny_vgg(width_ratio=64)
    trainer = quiet(model, SGD(model, lr=0.0), loader, tmp_path, loss_fn=ExplodeOnCall(2), explode_factor=None)
    trainer.fit(1)                                                      # lr 0: the weights stay finite
    assert trainer.global_step == 3
