"""NumPy kernels: im2col / col2im for convolution, window max for pooling.

Notation: N batch, C channels, H W input size, KH KW kernel, OH OW output
size, Hp Wp padded size. The column layout is (C*KH*KW, N*OH*OW): one GEMM
with the (F, C*KH*KW) weight matrix then convolves the whole batch at once.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2*pad - k) / stride) + 1."""
    return (size + 2 * pad - k) // stride + 1


def pad_input(x, pad_h: int, pad_w: int, value=0.0):
    """Pad H and W of x (N, C, H, W) with `value` -> (N, C, Hp, Wp).

    Returns x itself when there is no padding, else a new padded array.
    """
    if pad_h == 0 and pad_w == 0:
        return x
    N, C, H, W = x.shape
    padded = np.full((N, C, H + 2 * pad_h, W + 2 * pad_w), value, dtype=x.dtype)  # (N, C, Hp, Wp)
    padded[:, :, pad_h:pad_h + H, pad_w:pad_w + W] = x
    return padded


# ---------------------------------------------------------------------------
# The references: one window at a time. im2col copies the window's slice into
# its column; col2im adds the column back onto the same slice. The same slice,
# copy versus +=, is why they are adjoints: <im2col(x), cols> == <x, col2im(cols)>.
# ---------------------------------------------------------------------------
def im2col_naive(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), window by window (reference for im2col_cpu)."""
    N, C, H, W = x.shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    xpad = pad_input(x, ph, pw)                                       # (N, C, Hp, Wp)
    cols = np.empty((C * KH * KW, N, OH, OW), dtype=x.dtype)          # (C*KH*KW, N, OH, OW)
    for i in range(OH):
        for j in range(OW):
            window = xpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]   # (N, C, KH, KW)
            cols[:, :, i, j] = window.reshape(N, C * KH * KW).T       # (C*KH*KW, N)
    return cols.reshape(C * KH * KW, N * OH * OW)


def col2im_naive(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """cols (C*KH*KW, N*OH*OW) -> dx (N, C, H, W), window by window (reference for col2im_cpu)."""
    N, C, H, W = x_shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    cols4 = cols.reshape(C * KH * KW, N, OH, OW)                      # (C*KH*KW, N, OH, OW)
    dxpad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)   # (N, C, Hp, Wp)
    for i in range(OH):
        for j in range(OW):
            window = dxpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]  # (N, C, KH, KW) view
            window += cols4[:, :, i, j].T.reshape(N, C, KH, KW)
    return dxpad[:, :, ph:ph + H, pw:pw + W]                          # (N, C, H, W)


# ---------------------------------------------------------------------------
# The fast forms: one vectorised pass per kernel offset instead of per window.
# ---------------------------------------------------------------------------
def im2col_cpu(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), as im2col_naive.

    Row (c, kh, kw), column (n, oh, ow) holds x_padded[n, c, oh*sh + kh, ow*sw + kw].
    A strided view addresses every window without copying; one copy lays it out.
    """
    N, C, H, W = x.shape
    sh, sw = stride
    OH, OW = out_size(H, KH, sh, pad[0]), out_size(W, KW, sw, pad[1])
    xpad = np.ascontiguousarray(pad_input(x, *pad))                  # (N, C, Hp, Wp)
    sN, sC, sH, sW = xpad.strides
    windows = as_strided(xpad, shape=(C, KH, KW, N, OH, OW),
                         strides=(sC, sH, sW, sN, sH * sh, sW * sw), writeable=False)
    cols = np.empty((C, KH, KW, N, OH, OW), dtype=x.dtype)
    np.copyto(cols, windows)                                         # (C, KH, KW, N, OH, OW)
    return cols.reshape(C * KH * KW, N * OH * OW)


def col2im_cpu(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """The adjoint of im2col: cols (C*KH*KW, N*OH*OW) -> dx (N, C, H, W), as col2im_naive.

    Every column entry is added back to the input pixel it was copied from;
    pixels shared by overlapping windows collect several contributions. One
    strided slice per kernel offset (kh, kw) covers that offset in every window.
    """
    N, C, H, W = x_shape
    sh, sw = stride
    ph, pw = pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    cols6 = cols.reshape(C, KH, KW, N, OH, OW)
    dxpad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)   # (N, C, Hp, Wp)
    for kh in range(KH):
        for kw in range(KW):
            dxpad[:, :, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw] += cols6[:, kh, kw].transpose(1, 0, 2, 3)
    return dxpad[:, :, ph:ph + H, pw:pw + W]                          # (N, C, H, W)


def maxpool_forward_cpu(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """Window maximum and the index (kh*KW + kw) of its first occurrence.

    x (N, C, H, W) -> out (N, C, OH, OW), argmax (N, C, OH, OW) of int8 (int32
    for windows over 127 elements). Windows are scanned in row-major order and
    only a strictly larger value replaces the running maximum, so ties go to
    the first element, as in PyTorch; a NaN always replaces it, so NaN propagates (at the
    window's last NaN, as PyTorch). One vectorised pass per window offset.
    """
    N, C, H, W = x.shape
    sh, sw = stride
    OH, OW = out_size(H, KH, sh, pad[0]), out_size(W, KW, sw, pad[1])
    xpad = pad_input(x, *pad, value=-np.inf)                          # (N, C, Hp, Wp)
    out = xpad[:, :, 0:sh * OH:sh, 0:sw * OW:sw].copy()                # (N, C, OH, OW)
    argmax = np.zeros((N, C, OH, OW), dtype=np.int8 if KH * KW <= 127 else np.int32)
    better = np.empty((N, C, OH, OW), dtype=bool)                      # (N, C, OH, OW)
    for kh in range(KH):
        for kw in range(KW):
            if kh == 0 and kw == 0:
                continue
            cand = xpad[:, :, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw]  # (N, C, OH, OW) view
            np.greater(cand, out, out=better)                          # strictly larger only,
            better |= np.isnan(cand)                                   # or NaN (PyTorch: the last NaN)
            np.maximum(out, cand, out=out)                             # NaN propagates
            argmax = np.where(better, argmax.dtype.type(kh * KW + kw), argmax)
    return out, argmax


def maxpool_backward_cpu(dout, argmax, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """Route each dout to its window's argmax; overlapping windows add up.

    dout, argmax (N, C, OH, OW) -> dx (N, C, H, W). One pass per window offset
    (kh, kw): the windows whose argmax is that offset send their dout to the
    pixel at that offset. When windows do not overlap (stride >= kernel) each
    pixel hears from one window at most, so each offset's share is written,
    not added. dx starts at zero, except when the windows tile the padded
    input exactly (stride == kernel, sh*OH == Hp): only then does every pixel
    get written. (With stride > kernel the pixels between windows are in no
    window, and their gradient is 0.)
    """
    N, C, H, W = x_shape
    sh, sw = stride
    ph, pw = pad
    OH, OW = dout.shape[2:]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    disjoint = sh >= KH and sw >= KW
    tiles = (sh, sw) == (KH, KW) and (sh * OH, sw * OW) == (Hp, Wp)
    dxpad = (np.empty if tiles else np.zeros)((N, C, Hp, Wp), dtype=dout.dtype)  # (N, C, Hp, Wp)
    hit = np.empty(argmax.shape, dtype=bool)                           # (N, C, OH, OW)
    for kh in range(KH):
        for kw in range(KW):
            target = dxpad[:, :, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw]   # (N, C, OH, OW) view
            np.equal(argmax, kh * KW + kw, out=hit)
            if disjoint:
                np.multiply(dout, hit, out=target)
            else:
                target += dout * hit
    return dxpad[:, :, ph:ph + H, pw:pw + W]                           # (N, C, H, W)
