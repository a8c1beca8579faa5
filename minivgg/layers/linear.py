"""Linear (fully connected) and Flatten: the layers of a VGG classifier head.

Notation: N batch, I in_features, O out_features.
"""
from __future__ import annotations

import math

import numpy as np

from .. import random_stream
from .base import Layer


class Linear(Layer):
    """y = x W^T + b, with W laid out (out_features, in_features) as in PyTorch.

    Shapes: x (N, I), weight (O, I), bias (O,), out (N, O)
    Backward:
        dL/dx = dout @ W        (N, I)
        dL/dW = dout^T @ x      (O, I)
        dL/db = sum_n dout      (O,)
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default init
        rng = random_stream.get_rng()
        self.params["weight"] = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        if bias:
            self.params["bias"] = rng.uniform(-bound, bound, (out_features,)).astype(dtype)

    def forward(self, x):
        self.check_input(x, ndim=2, channels=self.in_features, layout="(N, in_features)")
        out = x @ self.params["weight"].T                              # (N, O)
        if "bias" in self.params:
            out += self.params["bias"]
        self.cache = x
        return out

    def backward(self, dout):
        x = self.saved()
        self.check_dout(dout, (x.shape[0], self.out_features), like=x)
        if not self.frozen:   # a frozen layer makes no weight gradient
            self.grads["weight"] = dout.T @ x                          # (O, I)
            if "bias" in self.params:
                self.grads["bias"] = dout.sum(axis=0)                  # (O,)
        return dout @ self.params["weight"]                            # (N, I)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={'bias' in self.params})")


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), the bridge from feature maps to Linear.

    Backward only restores the shape: dL/dx = dout.reshape(N, C, H, W).
    """

    def forward(self, x):
        if not hasattr(x, "ndim") or x.ndim < 2:
            raise ValueError(f"Flatten: expected an input with a batch dimension, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        self.check_input(x, ndim=x.ndim)
        self.cache = x
        return x.reshape(x.shape[0], -1)                               # (N, C*H*W)

    def backward(self, dout):
        x = self.saved()
        self.check_dout(dout, (x.shape[0], x[0].size), like=x)
        return dout.reshape(x.shape)                                   # (N, C, H, W)
