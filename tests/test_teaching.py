# The reader's programs run and teach what they say: the minimal loop learns Fashion-MNIST, and
# constructing a Trainer leaves the model's backward as it was unless asked (skip_input_grad=True).
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivgg import random_stream
from minivgg.data import DataLoader
from minivgg.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from minivgg.optim import SGD
from minivgg.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason=(
    "Fashion-MNIST absent: apt-get install dataset-fashion-mnist (CI installs it)"))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@needs_data
def test_minimal_loop_learns_fashion_mnist(capsys):
    losses, accuracy = load_example("minimal_train").train(steps=120, log_every=0)
    assert len(losses) == 120
    assert np.mean(losses[-20:]) < 0.5 * losses[0], "the loss did not fall"
    assert accuracy > 0.6, f"test accuracy {accuracy:.3f}: the loop did not learn (chance is 0.1)"


def tiny_model():
    random_stream.seed(0)
    return Sequential(Conv2d(1, 2, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(2 * 4 * 4, 3))


def input_grad(model, rng):
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    out = model.forward(x)
    return model.backward(np.ones_like(out))


@pytest.mark.parametrize("skip", [False, True])
def test_constructing_a_trainer_changes_the_model_only_when_asked(tmp_path, rng, skip):
    model = tiny_model()
    loader = DataLoader(np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64), batch_size=2)
    Trainer(model, SGD(model, lr=0.1), loader, out_dir=tmp_path, progress=False, plots=False,
            skip_input_grad=skip)
    assert model[0].needs_input_grad is (not skip)
    dx = input_grad(model, rng)
    if skip:   # the documented opt-in: the first layer skips dL/dx of the images
        assert dx is None
    else:
        assert dx is not None and dx.shape == (2, 1, 8, 8)


@needs_data
def test_backprop_walkthrough_checks_every_gradient():
    lines = []
    errors = load_example("backprop_walkthrough").walkthrough(out=lines.append)
    assert set(errors) == {"dL/dlogits", "dL/dfc.weight", "dL/dfc.bias", "dL/d(input of fc)",
                           "dL/d(input of flatten)", "dL/d(input of pool)", "dL/d(input of relu)",
                           "dL/dconv.weight", "dL/dconv.bias", "dL/dimage"}
    assert max(errors.values()) < 1e-6
    text = "\n".join(lines)
    for shape in ["(1, 1, 28, 28)", "(1, 4, 28, 28)", "(1, 4, 14, 14)", "(1, 784)", "(1, 10)"]:
        assert shape in text


@needs_data
def test_backprop_walkthrough_catches_a_wrong_gradient(monkeypatch):
    monkeypatch.setattr(ReLU, "backward", lambda self, dout: dout.copy())   # forgets the (x > 0) mask
    with pytest.raises(AssertionError, match=r"dL/d\(input of relu\) disagrees with central differences: "
                                             r"GradError\(.*worst at \(0, "):
        load_example("backprop_walkthrough").walkthrough(out=lambda line: None)


def test_grad_flow_records_the_first_steps_and_writes_a_png(tmp_path, rng):
    from minivgg.layers import SoftmaxCrossEntropy
    from minivgg.train import GradFlowRecorder, gradient_norms
    model, loss_fn = tiny_model(), SoftmaxCrossEntropy()
    opt = SGD(model, lr=0.1)
    recorder = GradFlowRecorder(opt, steps=3, path=tmp_path / "grad_flow.png")
    expected = []
    for step in range(5):
        x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
        loss_fn(model.forward(x), np.arange(4) % 3)
        model.backward(loss_fn.backward())
        expected.append(gradient_norms(model))
        opt.step()
        assert (tmp_path / "grad_flow.png").exists() == (step >= 2)      # written after the 3rd step
    assert recorder.norms == expected[:3]
    assert list(expected[0]) == ["0.weight", "4.weight"]                 # weights, in forward order
    w = model[0].grads["weight"]
    assert expected[-1]["0.weight"] == pytest.approx(float(np.sqrt((w.astype(np.float64) ** 2).sum())), rel=1e-6)
    assert Image.open(tmp_path / "grad_flow.png").size[0] > 600


@pytest.mark.slow
@needs_data
def test_cli_grad_flow_flag_writes_grad_flow_png(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_vgg11.py"), "--width-ratio", "64",
                        "--hidden", "16", "--batch-size", "8", "--no-progress", "--no-plots",
                        "--train-subset", "24", "--val-size", "8", "--test-subset", "8", "--epochs", "1",
                        "--grad-flow", "10", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "grad_flow.png").stat().st_size > 0     # 3 steps < 10: written at the end of the run
