"""Elementwise layers: ReLU and inverted Dropout."""
from __future__ import annotations

import numpy as np

from .. import backend, random_stream
from .base import Layer


class ReLU(Layer):
    """out = max(x, 0).

    Backward: the slope is 1 where x > 0 and 0 elsewhere (0 at x == 0 exactly,
    as in PyTorch):  dL/dx = dout * (x > 0).
    (out=backend.out_like(x): the result keeps x's memory order on CuPy too, see there.)
    """

    def forward(self, x):
        self.check_input(x, ndim=x.ndim if hasattr(x, "ndim") else -1)
        xp = backend.get_array_module(x)
        self.cache = x
        return xp.maximum(x, 0, out=backend.out_like(x))               # same shape (and memory order) as x

    def backward(self, dout):
        x = self.saved()
        self.check_dout(dout, x.shape, like=x)
        xp = backend.get_array_module(x)
        return xp.multiply(dout, x > 0, out=backend.out_like(dout))    # dout * (x > 0), a new array


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability p and
    scale the survivors by 1/(1-p), so evaluation needs no rescaling.

    Forward (train): mask = (u >= p) / (1 - p), u ~ U[0, 1);  out = x * mask
    Forward (eval):  out = x
    Backward:        dL/dx = dout * mask  (dout in eval)

    seed: give the layer its own generator, drawn on the host (and copied to
    the GPU), so its masks repeat on both devices; otherwise it draws from the
    one minivgg.seed() sets.
    """

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self._rng = np.random.default_rng(seed) if seed is not None else None

    def forward(self, x):
        self.check_input(x, ndim=x.ndim if hasattr(x, "ndim") else -1)
        if not self.training or self.p == 0.0:
            self.cache = (None, x)                                     # no mask: identity
            return x.copy()
        xp = backend.get_array_module(x)
        if self._rng is not None:
            u = xp.asarray(self._rng.random(x.shape, dtype=np.float64).astype(x.dtype))
        else:
            u = random_stream.random_uniform(xp, x.shape, x.dtype)           # same shape as x
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        mask = (u >= self.p).astype(x.dtype) * x.dtype.type(scale)     # same shape as x
        self.cache = (mask, x)
        return xp.multiply(x, mask, out=backend.out_like(x))           # x * mask

    def backward(self, dout):
        mask, x = self.saved()
        self.check_dout(dout, x.shape, like=x)
        if mask is None:
            return dout.copy()
        xp = backend.get_array_module(dout)
        return xp.multiply(dout, mask, out=backend.out_like(dout))     # dout * mask, same shape as x

    def __repr__(self):
        return f"Dropout(p={self.p})"
