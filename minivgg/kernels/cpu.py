"""NumPy kernels: im2col / col2im for convolution, window max for pooling.

Notation: N batch, C channels, H W input size, KH KW kernel, OH OW output
size, Hp Wp padded size. The column layout is (C*KH*KW, OH*OW*N), the batch
innermost: one GEMM with the (F, C*KH*KW) weight matrix then convolves the
whole batch at once, and its (F, OH*OW*N) result already is a feature map
whose memory runs channel, row, column, image ("CHWN"). Conv2d hands that on
as an (N, F, OH, OW) view without copying it, so inside a network every
feature map lies in memory as CHWN while every layer still sees NCHW shapes
and indices. NumPy follows the strides: the kernels below read and write
whatever layout they are given, and run fastest on CHWN, where the runs they
copy are OW*N or N numbers long instead of OW.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .threads import over_blocks, over_cores, parallel_copyto


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2*pad - k) / stride) + 1."""
    return (size + 2 * pad - k) // stride + 1


def pad_input(x, pad_h: int, pad_w: int, value=0.0):
    """Pad H and W of x (N, C, H, W) with `value` -> (N, C, Hp, Wp).

    Returns x itself when there is no padding, else a new padded array laid
    out in memory as x is (full_like keeps the order of x's strides).
    """
    if pad_h == 0 and pad_w == 0:
        return x
    N, C, H, W = x.shape
    padded = np.full_like(x, value, shape=(N, C, H + 2 * pad_h, W + 2 * pad_w))  # (N, C, Hp, Wp)
    padded[:, :, pad_h:pad_h + H, pad_w:pad_w + W] = x
    return padded


# ---------------------------------------------------------------------------
# The references: one window at a time. im2col copies the window's slice into
# its column; col2im adds the column back onto the same slice. The same slice,
# copy versus +=, is why they are adjoints: <im2col(x), cols> == <x, col2im(cols)>.
# ---------------------------------------------------------------------------
def im2col_naive(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """x (N, C, H, W) -> cols (C*KH*KW, OH*OW*N), window by window (reference for im2col_cpu)."""
    N, C, H, W = x.shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    xpad = pad_input(x, ph, pw)                                       # (N, C, Hp, Wp)
    cols = np.empty((C * KH * KW, OH, OW, N), dtype=x.dtype)          # (C*KH*KW, OH, OW, N)
    for i in range(OH):
        for j in range(OW):
            window = xpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]   # (N, C, KH, KW)
            cols[:, i, j, :] = window.reshape(N, C * KH * KW).T       # (C*KH*KW, N)
    return cols.reshape(C * KH * KW, OH * OW * N)


def col2im_naive(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """cols (C*KH*KW, OH*OW*N) -> dx (N, C, H, W), window by window (reference for col2im_cpu)."""
    N, C, H, W = x_shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    cols4 = cols.reshape(C * KH * KW, OH, OW, N)                      # (C*KH*KW, OH, OW, N)
    dxpad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)   # (N, C, Hp, Wp)
    for i in range(OH):
        for j in range(OW):
            window = dxpad[:, :, i * sh:i * sh + KH, j * sw:j * sw + KW]  # (N, C, KH, KW) view
            window += cols4[:, i, j, :].T.reshape(N, C, KH, KW)
    return dxpad[:, :, ph:ph + H, pw:pw + W]                          # (N, C, H, W)


# ---------------------------------------------------------------------------
# The fast forms: one vectorised pass per kernel offset instead of per window.
# ---------------------------------------------------------------------------
def im2col_cpu(x, KH: int, KW: int, stride: tuple, pad: tuple, out=None):
    """x (N, C, H, W) -> cols (C*KH*KW, OH*OW*N), as im2col_naive.

    Row (c, kh, kw), column (oh, ow, n) holds x_padded[n, c, oh*sh + kh, ow*sw + kw].
    x is padded once (pad_input keeps its memory order, CHWN inside a network, so
    the (C, Hp, Wp, N) view is contiguous without a copy); a strided view then
    addresses every window, and one copy (split over the cores) lays the columns out.
    """
    N, C, H, W = x.shape
    sh, sw = stride
    OH, OW = out_size(H, KH, sh, pad[0]), out_size(W, KW, sw, pad[1])
    xpad = np.ascontiguousarray(pad_input(x, *pad).transpose(1, 2, 3, 0))   # (C, Hp, Wp, N)
    sC, sH, sW, sN = xpad.strides
    windows = as_strided(xpad, shape=(C, KH, KW, OH, OW, N),
                         strides=(sC, sH, sW, sH * sh, sW * sw, sN), writeable=False)
    cols = np.empty((C, KH, KW, OH, OW, N), dtype=x.dtype) if out is None else out.reshape(C, KH, KW, OH, OW, N)
    parallel_copyto(cols, windows)                                    # (C, KH, KW, OH, OW, N)
    return cols.reshape(C * KH * KW, OH * OW * N)


def col2im_cpu(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """The adjoint of im2col: cols (C*KH*KW, OH*OW*N) -> dx (N, C, H, W), as col2im_naive.

    Every column entry is added back to the input pixel it was copied from;
    pixels shared by overlapping windows collect several contributions. One
    strided slice per kernel offset (kh, kw) covers that offset in every window.
    Channels never share a pixel, so each core takes its own channels. dx is
    returned as a view of a CHWN array.
    """
    N, C, H, W = x_shape
    sh, sw = stride
    ph, pw = pad
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    cols6 = cols.reshape(C, KH, KW, OH, OW, N)
    dxpad = np.zeros((C, H + 2 * ph, W + 2 * pw, N), dtype=cols.dtype)   # (C, Hp, Wp, N)

    def add_back(c):                       # the channels c: each core adds its own channels
        for kh in range(KH):
            for kw in range(KW):
                dxpad[c, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw] += cols6[c, kh, kw]   # (c, OH, OW, N)

    over_cores(add_back, C, cols.nbytes)
    return dxpad[:, ph:ph + H, pw:pw + W].transpose(3, 0, 1, 2)       # (N, C, H, W) view


def maxpool_forward_cpu(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """Window maximum and the index (kh*KW + kw) of its first occurrence.

    x (N, C, H, W) -> out (N, C, OH, OW), argmax (N, C, OH, OW) of int8 (int32
    for windows over 127 elements). Windows are scanned in row-major order and
    only a strictly larger value replaces the running maximum, so ties go to
    the first element, as in PyTorch; a NaN always replaces it, so NaN propagates (at the
    window's last NaN, as PyTorch). One vectorised pass per window offset,
    over blocks of channels (see over_blocks).
    """
    N, C, H, W = x.shape
    sh, sw = stride
    OH, OW = out_size(H, KH, sh, pad[0]), out_size(W, KW, sw, pad[1])
    xpad = pad_input(x, *pad, value=-np.inf)                          # (N, C, Hp, Wp)
    out = np.empty_like(xpad, shape=(N, C, OH, OW))                   # (N, C, OH, OW), laid out as x
    argmax = np.empty_like(out, dtype=np.int8 if KH * KW <= 127 else np.int32)

    def block(c):                          # the channels c, in place in out[:, c] and argmax[:, c]
        xb, ob, ab = xpad[:, c], out[:, c], argmax[:, c]
        ob[...] = xb[:, :, 0:sh * OH:sh, 0:sw * OW:sw]                 # offset (0, 0) first
        ab[...] = 0
        better = np.empty_like(ob, dtype=bool)
        is_nan = np.empty_like(ob, dtype=bool)
        offset = np.empty_like(ab)
        for kh in range(KH):
            for kw in range(KW):
                if kh == 0 and kw == 0:
                    continue
                cand = xb[:, :, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw]  # (N, c, OH, OW) view
                np.greater(cand, ob, out=better)                       # strictly larger only,
                better |= np.not_equal(cand, cand, out=is_nan)         # or NaN (PyTorch: the last NaN)
                np.maximum(ob, cand, out=ob)                           # NaN propagates
                # argmax = where(better, k, argmax), k = kh*KW + kw. The offsets come in increasing
                # order, so k is above every argmax so far, and max(argmax, better * k) is the same
                # thing in two fast passes (a masked write is much slower).
                np.multiply(better, ab.dtype.type(kh * KW + kw), out=offset)
                np.maximum(ab, offset, out=ab)

    over_blocks(block, C, xpad[:, :1].nbytes)
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
    dxpad = (np.empty_like if tiles else np.zeros_like)(dout, shape=(N, C, Hp, Wp))  # (N, C, Hp, Wp), laid out as dout

    def block(c):                          # the channels c, in place in dxpad[:, c]
        dout_c, ab, dxb = dout[:, c], argmax[:, c], dxpad[:, c]
        hit = np.empty_like(ab, dtype=bool)
        for kh in range(KH):
            for kw in range(KW):
                target = dxb[:, :, kh:kh + sh * OH:sh, kw:kw + sw * OW:sw]   # (N, c, OH, OW) view
                np.equal(ab, kh * KW + kw, out=hit)
                if disjoint:
                    np.multiply(dout_c, hit, out=target)
                else:
                    target += dout_c * hit

    over_blocks(block, C, dxpad[:, :1].nbytes)
    return dxpad[:, :, ph:ph + H, pw:pw + W]                           # (N, C, H, W)


# ---------------------------------------------------------------------------
# Winograd's tile transforms (layers/conv_winograd.py): a map cut into overlapping square
# tiles, each multiplied by a small matrix on both sides, and back. T below is the
# "tile domain": (k*k, C, TH*TW*N), entry (i, j) of every tile in row i*k + j, the
# tiles in (th, tw, n) order, so each of the k*k rows is one GEMM operand of shape (C, P).
# ---------------------------------------------------------------------------
def winograd_tiles_cpu(x, L, step: int, pad: tuple, tiles: tuple, out=None, scratch=None):
    """x (N, C, H, W) -> (k*k, C, TH*TW*N): tile (th, tw) is the q x q window of x, padded by
    `pad` with zeros, at (th*step, tw*step) of the padded map, sent out as L d L^T (L (k, q)).

    Two passes: one copy gathers the windows (q, q, C, TH, TW, N) from x's CHWN memory
    (split over the cores), and one GEMM, kron(L, L) (k*k, q*q) @ windows (q*q, C*P),
    transforms them all: vec(L d L^T) = kron(L, L) vec(d) for row-major vec. The result goes
    into `out` when given (a contiguous (k*k, C, P) array); the padded map and the windows into
    scratch's "tiles.pad" and "tiles.raw" when a backend.Scratch is given.
    """
    N, C, H, W = x.shape
    k, q = L.shape
    (TH, TW), (ph, pw) = tiles, pad
    Hp, Wp = (TH - 1) * step + q, (TW - 1) * step + q                 # the padded map the tiles cover
    xc = x.transpose(1, 2, 3, 0)                                      # (C, H, W, N) view
    if (ph, pw, Hp, Wp) == (0, 0, H, W):
        xpad = np.ascontiguousarray(xc)                               # no copy when x is CHWN already
    else:
        h, w = min(H, Hp - ph), min(W, Wp - pw)
        xpad = np.empty((C, Hp, Wp, N), dtype=x.dtype) if scratch is None else \
            scratch.get("tiles.pad", (C, Hp, Wp, N), x)               # (C, Hp, Wp, N)
        xpad[:, :ph], xpad[:, ph + h:], xpad[:, :, :pw], xpad[:, :, pw + w:] = 0, 0, 0, 0   # the zero border
        parallel_copyto(xpad[:, ph:ph + h, pw:pw + w], xc[:, :h, :w])
    sC, sH, sW, sN = xpad.strides
    windows = as_strided(xpad, shape=(q, q, C, TH, TW, N),
                         strides=(sH, sW, sC, sH * step, sW * step, sN), writeable=False)
    d = np.empty((q, q, C, TH, TW, N), dtype=x.dtype) if scratch is None else \
        scratch.get("tiles.raw", (q, q, C, TH, TW, N), x)             # (q, q, C, TH, TW, N)
    parallel_copyto(d, windows)
    K = np.kron(L, L).astype(x.dtype, copy=False)                     # (k*k, q*q)
    T = np.matmul(K, d.reshape(q * q, -1), out=None if out is None else out.reshape(k * k, -1))
    return T.reshape(k * k, C, TH * TW * N)                           # (k*k, C, P)


def winograd_untile_cpu(T, q: int, step: int, pad: tuple, shape: tuple, tiles: tuple, bias=None):
    """The way back: T (q*q, C, TH*TW*N) -> (N, C, H, W) (a view of a CHWN array): each tile's
    q x q entries added onto the padded map at (th*step, tw*step) (tiles overlap when
    q > step and their entries add up there), cropped by `pad`, plus bias (C,) if given.

    q >= step. The tiles' first step x step entries cover the map without overlap: one copy
    (with the bias added in it) writes them, and each remaining offset (a, b) adds its
    entries in one strided pass; each core takes its own channels.
    """
    N, C, H, W = shape
    (TH, TW), (ph, pw) = tiles, pad
    Hp, Wp = (TH - 1) * step + q, (TW - 1) * step + q
    T6 = T.reshape(q, q, C, TH, TW, N)
    out = np.empty((C, Hp, Wp, N), dtype=T.dtype)                     # (C, Hp, Wp, N)

    def part(c):                           # the channels c
        o = out[c]
        edge = 0 if bias is None else bias[c].reshape(-1, 1, 1, 1)      # past the first entries' cover
        o[:, TH * step:] = edge
        o[:, :, TW * step:] = edge
        core = o[:, :TH * step, :TW * step].reshape(-1, TH, step, TW, step, N)  # (c, TH, step, TW, step, N) view
        first = T6[:step, :step, c].transpose(2, 3, 0, 4, 1, 5)       # (c, TH, step, TW, step, N) view
        if bias is None:
            np.copyto(core, first)
        else:
            np.add(first, bias[c].reshape(-1, 1, 1, 1, 1, 1), out=core)
        for a in range(q):
            for b in range(q):
                if a >= step or b >= step:
                    o[:, a:a + step * TH:step, b:b + step * TW:step] += T6[a, b, c]   # (c, TH, TW, N)

    over_cores(part, C, T.nbytes)
    return out[:, ph:ph + H, pw:pw + W].transpose(3, 0, 1, 2)         # (N, C, H, W) view
