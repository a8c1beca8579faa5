"""Conv2d by im2col + GEMM, the textbook, with a loop convolution beside it as the reference.

Notation: N batch, C in-channels, F out-channels (filters), H W input size,
KH KW kernel, sh sw stride, ph pw padding, OH OW output size.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, random_stream
from ..kernels import batch_chunks, col2im, im2col, out_size, pad_input
from .base import Layer, pair


class Conv2d(Layer):
    """2-D convolution (a cross-correlation, as in PyTorch), by im2col + GEMM: the textbook.

    Shapes: x (N, C, H, W), weight (F, C, KH, KW), bias (F,), out (N, F, OH, OW)
        OH = floor((H + 2*ph - KH) / sh) + 1,   OW = floor((W + 2*pw - KW) / sw) + 1
    Forward: im2col copies every KHxKW window of x into a column, so the whole
    convolution is one matrix product. With cols = im2col(x) (C*KH*KW, OH*OW*N)
    and Wm = weight.reshape(F, C*KH*KW):
        out = Wm @ cols + b                  (F, OH*OW*N), seen as (N, F, OH, OW)
    Backward: with D = dout seen as (F, OH*OW*N), the chain rule through that product:
        dL/db  = D summed over its columns                    (F,)
        dL/dWm = D @ cols^T                                   (F, C*KH*KW)
        dL/dx  = col2im(Wm^T @ D)                             (N, C, H, W)
    col2im adds each column entry back onto the pixel it was copied from.
    Memory: cols is KH*KW times the size of x, so the batch runs in chunks that fit
    the workspace limit (minivgg.kernels.set_workspace_limit); backward rebuilds them.
    Set needs_input_grad = False on a network's first layer to skip dL/dx; a frozen
    layer skips dL/dW and dL/db (nothing would use them).
    The tuned engine (conv_fast.TunedConv2d) computes the same with fewer passes.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d: kernel_size and stride must be >= 1 and padding >= 0, got "
                             f"{self.kernel_size}, {self.stride}, {self.padding}")
        self.needs_input_grad = True
        KH, KW = self.kernel_size
        # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(in_channels * KH * KW)
        rng = random_stream.get_rng()
        self.params["weight"] = rng.uniform(-bound, bound, (out_channels, in_channels, KH, KW)).astype(dtype)
        if bias:
            self.params["bias"] = rng.uniform(-bound, bound, (out_channels,)).astype(dtype)

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        N, C, H, W = x.shape
        (KH, KW), (ph, pw), F = self.kernel_size, self.padding, self.out_channels
        self.check_fits(H, W)
        OH, OW = out_size(H, KH, self.stride[0], ph), out_size(W, KW, self.stride[1], pw)
        Wm = self.params["weight"].reshape(F, -1)                         # (F, C*KH*KW)
        out = backend.get_array_module(x).empty((F, OH, OW, N), dtype=x.dtype)  # (F, OH, OW, N)
        for s in batch_chunks(N, C * KH * KW * OH * OW * x.itemsize, like=x):
            cols = im2col(x[s], KH, KW, self.stride, self.padding)        # (C*KH*KW, OH*OW*n)
            out[..., s] = (Wm @ cols).reshape(F, OH, OW, -1)              # (F, OH, OW, n)
        out = out.transpose(3, 0, 1, 2)                                   # (N, F, OH, OW) view
        if "bias" in self.params:
            out += self.params["bias"].reshape(1, F, 1, 1)
        self.cache = x
        return out

    def backward(self, dout):
        x = self.saved()
        N, C, H, W = x.shape
        (KH, KW), F = self.kernel_size, self.out_channels
        OH, OW = out_size(H, KH, self.stride[0], self.padding[0]), out_size(W, KW, self.stride[1], self.padding[1])
        self.check_dout(dout, (N, F, OH, OW), like=x)
        xp = backend.get_array_module(x)
        Wm = self.params["weight"].reshape(F, -1)                         # (F, C*KH*KW)
        dWm = None if self.frozen else xp.zeros_like(Wm)                 # (F, C*KH*KW); frozen: none
        dx = xp.empty_like(x) if self.needs_input_grad else None          # (N, C, H, W)
        for s in batch_chunks(N, C * KH * KW * OH * OW * x.itemsize, like=x):
            D = dout[s].transpose(1, 2, 3, 0).reshape(F, -1)              # (F, OH*OW*n)
            if dWm is not None:
                cols = im2col(x[s], KH, KW, self.stride, self.padding)    # (C*KH*KW, OH*OW*n)
                dWm += D @ cols.T                                         # (F, C*KH*KW)
            if dx is not None:
                dx[s] = col2im(Wm.T @ D, x[s].shape, KH, KW, self.stride, self.padding)  # (n, C, H, W)
        if dWm is not None:
            self.grads["weight"] = dWm.reshape(F, C, KH, KW)              # (F, C, KH, KW)
            if "bias" in self.params:
                self.grads["bias"] = dout.sum(axis=(0, 2, 3))             # (F,)
        return dx

    def check_fits(self, H: int, W: int) -> None:
        """The kernel must fit inside the padded input."""
        (KH, KW), (ph, pw) = self.kernel_size, self.padding
        if H + 2 * ph < KH or W + 2 * pw < KW:
            raise ValueError(f"{self!r}: kernel {KH}x{KW} is larger than the padded input "
                             f"{H + 2 * ph}x{W + 2 * pw} (input {H}x{W}, padding {ph}); "
                             "use a larger image or more padding")

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params})")


# ---------------------------------------------------------------------------
# The reference: the definition of convolution, one output pixel at a time.
# Slow, obviously right, and tested equal to every Conv2d engine.
# ---------------------------------------------------------------------------
def conv2d_naive(x, weight, bias=None, stride=1, padding=0):
    """out[n, f, i, j] = b[f] + sum_{c,kh,kw} x_pad[n, c, i*sh + kh, j*sw + kw] * W[f, c, kh, kw]."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    F, C, KH, KW = weight.shape
    N, _, H, W = x.shape
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    xpad = pad_input(np.asarray(x), ph, pw)                               # (N, C, Hp, Wp)
    out = np.zeros((N, F, OH, OW), dtype=x.dtype)                         # (N, F, OH, OW)
    for i in range(OH):
        for j in range(OW):
            window = xpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]   # (N, C, KH, KW)
            out[:, :, i, j] = np.tensordot(window, weight, axes=([1, 2, 3], [1, 2, 3]))  # (N, F)
    if bias is not None:
        out += bias.reshape(1, F, 1, 1)
    return out


def conv2d_naive_backward(x, weight, dout, stride=1, padding=0):
    """The same loops run backwards: each output pixel sends dout back through its window.

        dW[f]            += sum_n dout[n, f, i, j] * window[n]
        dx_pad[n, window] += sum_f dout[n, f, i, j] * W[f]
        db[f]             = sum_{n,i,j} dout[n, f, i, j]
    Returns (dx, dW, db).
    """
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    F, C, KH, KW = weight.shape
    N, _, H, W = x.shape
    OH, OW = dout.shape[2:]
    xpad = pad_input(np.asarray(x), ph, pw)                               # (N, C, Hp, Wp)
    dxpad = np.zeros_like(xpad)                                           # (N, C, Hp, Wp)
    dW = np.zeros_like(weight)                                            # (F, C, KH, KW)
    for i in range(OH):
        for j in range(OW):
            window = xpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]   # (N, C, KH, KW)
            g = dout[:, :, i, j]                                          # (N, F)
            dW += np.tensordot(g, window, axes=([0], [0]))                # (F, C, KH, KW)
            dxpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW] += np.tensordot(g, weight, axes=([1], [0]))
    db = dout.sum(axis=(0, 2, 3))                                         # (F,)
    return dxpad[:, :, ph:ph + H, pw:pw + W], dW, db
