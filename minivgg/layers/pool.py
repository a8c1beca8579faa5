"""Pooling: MaxPool2d (with a loop reference) and AdaptiveAvgPool2d (for VGG heads).

Notation: N batch, C channels, H W input size, KH KW window, sh sw stride,
ph pw padding, OH OW output size.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernels import maxpool_backward, maxpool_forward, out_size, pad_input
from .base import Layer, pair


class MaxPool2d(Layer):
    """Maximum over each KHxKW window (padding counts as -inf, as in PyTorch).

    Shapes: x (N, C, H, W) -> out (N, C, OH, OW)
        OH = floor((H + 2*ph - KH) / sh) + 1,   OW likewise;  stride defaults to the kernel.

    Forward:  out[n,c,i,j] = max over the window of x;  argmax remembers where.
    Backward: the max is a selector, so its gradient is 1 at the argmax and 0
    elsewhere:  dL/dx[n,c,argmax(i,j)] += dout[n,c,i,j]. At a tie only the first
    maximum (row-major scan) receives it, as in PyTorch; where windows overlap
    a pixel that wins several windows collects the sum; a pixel in no window
    (stride > kernel) gets 0. A NaN in a window propagates to its output, and
    the gradient goes to the window's last NaN, as in PyTorch.

    How the kernels (minivgg/kernels/cpu.py, gpu.py) compute it: the CPU makes
    one vectorised pass per window offset (kh, kw), so KH*KW passes in all.
      forward:  out = max over (kh, kw) of xpad[:, :, kh::sh, kw::sw] (the offset
                that first reaches the maximum is kept as argmax = kh*KW + kw);
      backward: dxpad[:, :, kh::sh, kw::sw] += dout * (argmax == kh*KW + kw).
    maxpool2d_naive below is the same rule, one window at a time; tests check
    both kernels against it (tests/test_reference.py, tests/test_pool_sweep.py).
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride if stride is not None else kernel_size, "stride")
        self.padding = pair(padding, "padding")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"MaxPool2d: padding {self.padding} must be at most half the "
                             f"kernel size {self.kernel_size} (as in PyTorch)")

    def forward(self, x):
        self.check_input(x, ndim=4)
        N, C, H, W = x.shape
        (KH, KW), (ph, pw) = self.kernel_size, self.padding
        if H + 2 * ph < KH or W + 2 * pw < KW:
            raise ValueError(f"{self!r}: window {KH}x{KW} is larger than the padded input "
                             f"{H + 2 * ph}x{W + 2 * pw}; the image is too small for this many "
                             "poolings")
        out, argmax = maxpool_forward(x, KH, KW, self.stride, self.padding)  # (N, C, OH, OW) x2
        self.cache = (x, argmax)
        return out

    def backward(self, dout):
        x, argmax = self.saved()
        self.check_dout(dout, argmax.shape, like=x)
        KH, KW = self.kernel_size
        return maxpool_backward(dout, argmax, x.shape, KH, KW, self.stride, self.padding)  # (N, C, H, W)

    def __repr__(self):
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding})"


def maxpool2d_naive(x, kernel_size, stride=None, padding=0):
    """Reference: loop over every output pixel and every window.

    Returns out (N, C, OH, OW) and a function that maps dout to dx by sending
    each dout element to its window's first maximum, one window at a time.
    """
    (KH, KW) = pair(kernel_size)
    (sh, sw) = pair(stride if stride is not None else kernel_size)
    (ph, pw) = pair(padding)
    N, C, H, W = x.shape
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    xpad = pad_input(np.asarray(x), ph, pw, value=-np.inf)                # (N, C, Hp, Wp)
    out = np.empty((N, C, OH, OW), dtype=x.dtype)                         # (N, C, OH, OW)
    where = np.empty((N, C, OH, OW, 2), dtype=np.int64)                   # padded (row, col)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    window = xpad[n, c, i * sh:i * sh + KH, j * sw:j * sw + KW]
                    k = int(np.argmax(window))                            # first maximum
                    out[n, c, i, j] = window.flat[k]
                    where[n, c, i, j] = (i * sh + k // KW, j * sw + k % KW)

    def backward(dout):
        dxpad = np.zeros_like(xpad)
        for n in range(N):
            for c in range(C):
                for i in range(OH):
                    for j in range(OW):
                        r, s = where[n, c, i, j]
                        dxpad[n, c, r, s] += dout[n, c, i, j]
        return dxpad[:, :, ph:ph + H, pw:pw + W]

    return out, backward


class AdaptiveAvgPool2d(Layer):
    """Average over bins chosen so the output is always OH x OW (PyTorch's bins).

    Bin i covers rows floor(i*H/OH) .. ceil((i+1)*H/OH) - 1 (likewise columns);
    bins may overlap when H is not a multiple of OH, and repeat a pixel when
    H < OH (a 1x1 map pooled to 7x7 copies it 49 times).

    Forward:  out[n,c,i,j] = mean of x over bin (i, j)
    Backward: dL/dx[n,c,bin(i,j)] += dout[n,c,i,j] / |bin(i,j)|
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = pair(output_size, "output_size")

    def _bins(self, size, out):
        return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]

    def forward(self, x):
        self.check_input(x, ndim=4)
        N, C, H, W = x.shape
        OH, OW = self.output_size
        xp = backend.get_array_module(x)
        if H % OH == 0 and W % OW == 0:  # equal, disjoint bins: one reshape and mean
            out = x.reshape(N, C, OH, H // OH, OW, W // OW).mean(axis=(3, 5))  # (N, C, OH, OW)
        else:
            out = xp.empty((N, C, OH, OW), dtype=x.dtype)                 # (N, C, OH, OW)
            for i, (h0, h1) in enumerate(self._bins(H, OH)):
                for j, (w0, w1) in enumerate(self._bins(W, OW)):
                    out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
        self.cache = x
        return out.astype(x.dtype, copy=False)

    def backward(self, dout):
        x = self.saved()
        N, C, H, W = x.shape
        OH, OW = self.output_size
        self.check_dout(dout, (N, C, OH, OW), like=x)
        xp = backend.get_array_module(dout)
        if H % OH == 0 and W % OW == 0:
            kh, kw = H // OH, W // OW
            dx = xp.broadcast_to((dout / (kh * kw)).reshape(N, C, OH, 1, OW, 1),
                                 (N, C, OH, kh, OW, kw)).reshape(N, C, H, W)   # (N, C, H, W)
            return xp.ascontiguousarray(dx, dtype=dout.dtype)  # a writeable array, not a broadcast view
        dx = xp.zeros((N, C, H, W), dtype=dout.dtype)                     # (N, C, H, W)
        for i, (h0, h1) in enumerate(self._bins(H, OH)):
            for j, (w0, w1) in enumerate(self._bins(W, OW)):
                area = (h1 - h0) * (w1 - w0)
                dx[:, :, h0:h1, w0:w1] += (dout[:, :, i, j] / area)[:, :, None, None]
        return dx

    def __repr__(self):
        return f"AdaptiveAvgPool2d(output_size={self.output_size})"
