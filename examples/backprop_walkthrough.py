"""Backpropagation by hand, on one Fashion-MNIST image: every forward shape and every gradient printed,
each gradient checked against central differences the moment it is computed (docs/BACKPROP.md explains it).

    PYTHONPATH=. python3 examples/backprop_walkthrough.py          # a few seconds
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as it is
from minivgg import random_stream  # noqa: E402
from minivgg.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist  # noqa: E402
from minivgg.gradcheck import GradError, numerical_gradient  # noqa: E402
from minivgg.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, SoftmaxCrossEntropy  # noqa: E402

TOL = 1e-6   # float64 central differences with h = 1e-6: a right gradient is about 1e-9 off

# What each layer's backward computes (the equations in its docstring), printed beside its result.
RULES = {
    "SoftmaxCrossEntropy": "dL/dz = (softmax(z) - onehot(y)) / N",
    "Linear": "dx = dout @ W,  dW = dout^T @ x,  db = sum_n dout",
    "Flatten": "dx = dout reshaped back to (N, C, H, W)",
    "MaxPool2d": "dx = dout routed to each window's argmax, 0 elsewhere",
    "ReLU": "dx = dout * (x > 0)",
    "Conv2d": "dx = col2im(W^T D),  dW = D cols^T,  db = sum D   (D = dout as (F, OH*OW*N))",
}


def one_image(index, noise, seed):
    """Image `index` of the test split as float64 (1, 1, 28, 28), normalised, and its label (1,).

    The dark background is one value repeated, so the conv outputs there tie in every
    max-pool window, where the max has no derivative; `noise` (tiny) breaks the ties.
    """
    images, labels = load_fashion_mnist("test")
    x = (images[index:index + 1, None] / 255.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    x = x + noise * np.random.default_rng(seed).standard_normal(x.shape)   # (1, 1, 28, 28)
    return x.astype(np.float64), labels[index:index + 1]


def tied_maxima(a):
    """Elements of a (N, C, H, W) that share their 2x2 window's maximum with another element."""
    N, C, H, W = a.shape
    windows = a.reshape(N, C, H // 2, 2, W // 2, 2)                                  # (N, C, H/2, 2, W/2, 2)
    is_max = windows == windows.max(axis=(3, 5), keepdims=True)
    tied = is_max & (is_max.sum(axis=(3, 5), keepdims=True) > 1)
    return tied.reshape(N, C, H, W)                                                   # (N, C, H, W)


def walkthrough(index=0, channels=4, noise=1e-3, seed=0, out=print):
    """Forward, then backward one layer at a time, checking each gradient numerically.

    Returns {gradient name: GradError}; raises AssertionError at the first wrong gradient.
    """
    random_stream.seed(seed)
    x, y = one_image(index, noise, seed)
    net = [("conv", Conv2d(1, channels, 3, padding=1)), ("relu", ReLU()), ("pool", MaxPool2d(2)),
           ("flatten", Flatten()), ("fc", Linear(channels * 14 * 14, 10))]
    for _, layer in net:
        layer.astype(np.float64)                     # float64: differences precise to ~1e-9
    loss_fn = SoftmaxCrossEntropy()

    out(f"image {index}: a {FASHION_MNIST_CLASSES[int(y[0])]} (label {int(y[0])})\n")
    out("forward: each layer's output, kept (in its cache) for backward")
    acts = [x]                                       # acts[i] is the input of layer i
    out(f"  {'input':8s} {str(x.shape):>16s}")
    for name, layer in net:
        acts.append(layer.forward(acts[-1]))
        out(f"  {name:8s} {str(acts[-1].shape):>16s}   {layer!r}")
    loss = loss_fn.forward(acts[-1], y)
    out(f"  {'loss':8s} {str(loss.shape):>16s}   L = {float(loss):.6f}\n")

    def loss_from(i):
        """L as a function of layer i's input: run layers i.. and the loss again."""
        def f():
            h = acts[i]
            for _, layer in net[i:]:
                h = layer.forward(h)
            return loss_fn.forward(h, y)
        return f

    errors = {}

    def check(what, analytic, wrt, f, kinks=None):
        numeric = numerical_gradient(f, wrt)
        size, note = np.linalg.norm(analytic), ""
        if kinks is not None and kinks.any():   # no derivative there: compare everywhere else
            analytic, numeric = np.where(kinks, 0.0, analytic), np.where(kinks, 0.0, numeric)
            note = f" (skipping {int(kinks.sum())} tied elements, see below)"
        err = GradError(analytic, numeric)
        errors[what] = err
        ok = "ok" if err < TOL else "WRONG"
        out(f"    {what:22s} {str(analytic.shape):>16s}   |grad| {size:.3e}   "
            f"rel err {float(err):.1e} {ok}{note}")
        if not err < TOL:
            raise AssertionError(f"{what} disagrees with central differences: {err!r}")

    out("backward: last layer first; each gradient checked against (L(a + h) - L(a - h)) / 2h")
    dout = loss_fn.backward()                        # dL/dlogits (1, 10)
    logits = acts[-1].copy()
    out(f"  loss: {RULES['SoftmaxCrossEntropy']}")
    check("dL/dlogits", dout, logits, lambda: loss_fn.forward(logits, y))
    for i in reversed(range(len(net))):
        name, layer = net[i]
        out(f"  {name}: {RULES[type(layer).__name__]}")
        dx = layer.backward(dout)                    # dL/d(input of layer i), and layer.grads
        for key, p in layer.params.items():          # dL/dW, dL/db: perturb the parameter itself
            check(f"dL/d{name}.{key}", layer.grads[key], p, loss_from(i))
        what = f"dL/d(input of {name})" if i else "dL/dimage"
        check(what, dx, acts[i], loss_from(i), kinks=tied_maxima(acts[i]) if name == "pool" else None)
        dout = dx                                    # the chain rule: hand dx to the layer before
    out(f"\nall {len(errors)} gradients agree with central differences (worst {max(map(float, errors.values())):.1e})")
    out("Tied elements: where ReLU zeroed a whole 2x2 window, its four zeros tie for the maximum. Nudging one\n"
        "up by h makes it the maximum, nudging it down does not, so L has a kink there and central differences\n"
        "give half the one-sided slope. Backward picks the first of them, as PyTorch does (tests/test_pool_ties.py).")
    return errors


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=int, default=0, help="which test image (0..9999, default 0)")
    ap.add_argument("--channels", type=int, default=4, help="conv filters (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="weights and tie-breaking noise")
    a = ap.parse_args()
    walkthrough(a.index, a.channels, seed=a.seed)
