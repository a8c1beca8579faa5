"""The training loop with nothing around it: read this before minivgg.train.Trainer, which wraps
the same five lines (forward, loss, backward, step) in accumulation, evaluation, checkpoints and plots.

    PYTHONPATH=. python3 examples/minimal_train.py   # 12 s on the 2-core dev machine: 84.7% on 1,000 test images
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as it is
from minivgg import random_stream  # noqa: E402
from minivgg.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist  # noqa: E402
from minivgg.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy  # noqa: E402
from minivgg.optim import SGD  # noqa: E402


def as_input(images):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalised with the training set's mean and std."""
    return ((images[:, None] / 255.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]).astype(np.float32)


def train(steps=300, batch_size=64, lr=0.05, train_images=6000, test_images=1000, seed=0, log_every=50):
    """Train a conv-ReLU-pool-linear network; returns (losses per step, test accuracy)."""
    random_stream.seed(seed)                                                   # same weights every run
    images, labels = load_fashion_mnist("train")
    X, Y = as_input(images[:train_images]), labels[:train_images]        # (n, 1, 28, 28), (n,)
    model = Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(8 * 14 * 14, 10))
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model, lr=lr, momentum=0.9)
    rng, losses = np.random.default_rng(seed), []
    for step in range(steps):
        idx = rng.integers(0, len(X), batch_size)                       # a random mini-batch
        logits = model.forward(X[idx])                                   # (B, 10)
        loss = loss_fn.forward(logits, Y[idx])                           # () mean cross-entropy
        model.backward(loss_fn.backward())     # every layer's grads, last layer first: dL/dW
        opt.step()                             # W <- W - lr * (momentum-smoothed) dL/dW
        losses.append(float(loss))
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    test_x, test_y = load_fashion_mnist("test")
    model.eval()
    accuracy = float((model.forward(as_input(test_x[:test_images])).argmax(axis=1) == test_y[:test_images]).mean())
    print(f"test accuracy on {test_images} images: {accuracy:.3f}")
    return losses, accuracy


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
