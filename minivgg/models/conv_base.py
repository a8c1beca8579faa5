"""A VGG without its head, as Keras's ``VGG16(include_top=False, pooling=...)``.

    pooling=None   x (N, C, H, W) -> the last block's maps (N, 512, H/32, W/32)
    pooling='avg'  -> their global average (N, 512): mean over each map
    pooling='max'  -> their global maximum (N, 512): max over each map

The base shares the VGG's own `features` (its layers and weights, not copies), so features
extracted from it are the ones the full network would compute. `extract(images)` runs it over
an array of images in batches with a progress bar: the classic fast route to transfer
learning is to extract the features once and train only a small head on them
(examples/extract_features.py).

Global max pooling, forward and backward (gradient to the first maximum of each map, as
PyTorch's max-pool sends it):
    out[n, c] = max_ij x[n, c, i, j]
    dL/dx[n, c, i, j] = dout[n, c] if (i, j) is the first argmax of x[n, c], else 0
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..layers import AdaptiveAvgPool2d, Flatten, Layer, Sequential
from ..layers.container import chain_backward
from .vgg import VGG

POOLINGS = (None, "avg", "max")


class GlobalMaxPool2d(Layer):
    """(N, C, H, W) -> (N, C): the largest value of each map."""

    def forward(self, x):
        self.check_input(x, ndim=4)
        N, C, H, W = x.shape
        flat = x.reshape(N, C, H * W)                                   # (N, C, H*W)
        idx = flat.argmax(axis=2)                                       # (N, C) first maximum
        self.cache = (x.shape, idx, x)
        return flat.max(axis=2)                                         # (N, C)

    def backward(self, dout):
        shape, idx, x = self.saved()
        N, C, H, W = shape
        self.check_dout(dout, (N, C), like=x)
        xp = backend.get_array_module(dout)
        dx = xp.zeros((N * C, H * W), dtype=dout.dtype)                 # (N*C, H*W)
        dx[xp.arange(N * C), idx.reshape(-1)] = dout.reshape(-1)
        return dx.reshape(N, C, H, W)                                   # (N, C, H, W)


class ConvBase(Layer):
    """`model.features`, then optionally a global pooling: the network without its head."""

    def __init__(self, model: VGG, pooling: str | None = None):
        super().__init__()
        if not isinstance(model, VGG):
            raise TypeError(f"ConvBase: expected a minivgg VGG, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"ConvBase: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.features, self.pooling = model.features, pooling
        self.pool = Sequential(*{None: [], "avg": [AdaptiveAvgPool2d(1), Flatten()],
                                 "max": [GlobalMaxPool2d()]}[pooling])

    def children(self):
        return [("features", self.features), ("pool", self.pool)]

    def forward(self, x):
        return self.pool.forward(self.features.forward(x))      # (N, 512, h, w) or (N, 512)

    def backward(self, dout):
        return chain_backward([self.features, self.pool], dout)  # (N, C, H, W), or None (see chain_backward)

    def extract(self, images, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Features of every image of `images` (N, C, H, W) float, in eval mode, as NumPy.

        The work is bounded by batch_size images at a time; the result is (N, ...) float32.
        """
        if getattr(images, "ndim", None) != 4:
            raise ValueError(f"ConvBase.extract: expected images of shape (N, C, H, W), got "
                             f"shape {getattr(images, 'shape', None)}")
        if int(batch_size) < 1:
            raise ValueError(f"ConvBase.extract: batch_size must be >= 1, got {batch_size}")
        from tqdm import tqdm
        self.eval()
        out = []
        for i in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                      disable=not progress, leave=False):
            out.append(backend.to_numpy(self.forward(images[i:i + batch_size])))
        return np.concatenate(out).astype(np.float32, copy=False)
