"""CuPy launchers for kernels.cu, with the same signatures and layouts as kernels/cpu.py.

The kernels are plain CUDA in kernels.cu (read it beside cpu.py); this file compiles it once
with cupy.RawModule and launches it. Every scalar goes to the kernel as a NumPy scalar of the
parameter's exact C type (np.int32 for `int`, np.int64 for `long long`): CuPy passes a bare
Python int as 8 bytes and a Python float as a double, which a 4-byte parameter misreads.
CuPy comes from minivgg.backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backend import cupy as cp
from .cpu import out_size

SOURCE = Path(__file__).with_name("kernels.cu")
# dtype -> the C++ type its template is instantiated with
CTYPES = {np.dtype(np.float16): "__half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
TEMPLATES = ("im2col", "col2im", "maxpool_forward", "maxpool_backward", "winograd_tiles", "winograd_untile")
NAME_EXPRESSIONS = [f"{k}<{t}>" for k in TEMPLATES for t in CTYPES.values()]
BLOCK = 256            # threads per block
MAX_BLOCKS = 65535     # the grid-stride loops cover any size with at most this many blocks

_module = None
# name -> (the module, its RawKernel), looked up once per module: CuPy's get_function builds a new
# RawKernel (and asks the driver for the function) on every call; one RawKernel serves every device
_functions: dict = {}


def _kernel(name: str, dtype=None):
    """The compiled kernel `name` (instantiated for `dtype`); the module is compiled on first use."""
    global _module
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in CTYPES:
            raise TypeError(f"minivgg's GPU kernels take float16, float32 or float64 arrays, got {dtype}")
        name = f"{name}<{CTYPES[dtype]}>"
    if _module is None:
        _module = cp.RawModule(code=SOURCE.read_text(), options=("-std=c++17",),
                               name_expressions=NAME_EXPRESSIONS)
    module, function = _functions.get(name, (None, None))
    if module is not _module:
        function = _module.get_function(name)
        _functions[name] = (_module, function)
    return function


def _launch(kernel, total: int, *args):
    blocks = max(1, min(MAX_BLOCKS, (int(total) + BLOCK - 1) // BLOCK))
    kernel((blocks,), (BLOCK,), args)


def _i32(*values):
    return tuple(np.int32(v) for v in values)


def chwn(x):
    """x (N, C, H, W) -> its (C, H, W, N) view, copied only if not already contiguous so
    (inside a network it is: Conv2d's outputs are CHWN in memory)."""
    return cp.ascontiguousarray(x.transpose(1, 2, 3, 0))


def as_nchw(a):
    """a (C, H, W, N) -> its (N, C, H, W) view."""
    return a.transpose(3, 0, 1, 2)


def im2col_gpu(x, KH: int, KW: int, stride: tuple, pad: tuple, out=None):
    """x (N, C, H, W) -> cols (C*KH*KW, OH*OW*N), as im2col_cpu (into `out` if given)."""
    N, C, H, W = x.shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    cols = cp.empty((C * KH * KW, OH * OW * N), dtype=x.dtype) if out is None else out
    _launch(_kernel("im2col", x.dtype), cols.size, chwn(x), cols,
            *_i32(N, C, H, W, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1]))
    return cols


def col2im_gpu(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """cols (C*KH*KW, OH*OW*N) -> dx (N, C, H, W) (a view of a CHWN array), as col2im_cpu."""
    N, C, H, W = x_shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    dx = cp.empty((C, H, W, N), dtype=cols.dtype)
    _launch(_kernel("col2im", cols.dtype), dx.size, cp.ascontiguousarray(cols), dx,
            *_i32(N, C, H, W, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1]))
    return as_nchw(dx)


def maxpool_forward_gpu(x, KH: int, KW: int, stride: tuple, pad: tuple):
    """x (N, C, H, W) -> (out, argmax), both (N, C, OH, OW) views of CHWN arrays; argmax is
    int32 kh*KW + kw."""
    N, C, H, W = x.shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    out = cp.empty((C, OH, OW, N), dtype=x.dtype)
    argmax = cp.empty((C, OH, OW, N), dtype=cp.int32)
    _launch(_kernel("maxpool_forward", x.dtype), out.size, chwn(x), out, argmax,
            *_i32(N, C, H, W, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1]))
    return as_nchw(out), as_nchw(argmax)


def maxpool_backward_gpu(dout, argmax, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """dout (N, C, OH, OW) -> dx (N, C, H, W) (a view of a CHWN array), as maxpool_backward_cpu."""
    N, C, H, W = x_shape
    OH, OW = dout.shape[2:]
    dx = cp.empty((C, H, W, N), dtype=dout.dtype)
    _launch(_kernel("maxpool_backward", dout.dtype), dx.size, chwn(dout),
            chwn(argmax.astype(cp.int32, copy=False)), dx,
            *_i32(N, C, H, W, KH, KW, OH, OW, stride[0], stride[1], pad[0], pad[1]))
    return as_nchw(dx)


WINOGRAD_MAX = 6       # the largest tile side kernels.cu's Winograd kernels hold (F(4x4, 3x3)'s 6)


def winograd_tiles_gpu(x, L, step: int, pad: tuple, tiles: tuple, out=None):
    """x (N, C, H, W) -> (k*k, C, TH*TW*N), every tile as L d L^T, as winograd_tiles_cpu, into
    `out` when given (a contiguous array of that shape); L (k, q) is a device array, read as float64."""
    N, C, H, W = x.shape
    k, q = L.shape
    if max(k, q) > WINOGRAD_MAX:
        raise ValueError(f"winograd_tiles_gpu: tiles of at most {WINOGRAD_MAX}x{WINOGRAD_MAX}, got L {k}x{q}")
    TH, TW = tiles
    if out is None:
        out = cp.empty((k * k, C, TH * TW * N), dtype=x.dtype)
    _launch(_kernel("winograd_tiles", x.dtype), C * TH * TW * N, chwn(x), out,
            cp.ascontiguousarray(L, dtype=cp.float64),
            *_i32(k, q, step, N, C, H, W, TH, TW, pad[0], pad[1]))
    return out


def winograd_untile_gpu(T, q: int, step: int, pad: tuple, shape: tuple, tiles: tuple, bias=None):
    """T (q*q, C, TH*TW*N) -> (N, C, H, W) (a view of a CHWN array), as winograd_untile_cpu."""
    N, C, H, W = shape
    TH, TW = tiles
    out = cp.empty((C, H, W, N), dtype=T.dtype)
    b = cp.ascontiguousarray(bias) if bias is not None else cp.empty(1, dtype=T.dtype)
    _launch(_kernel("winograd_untile", T.dtype), out.size, cp.ascontiguousarray(T), b, out,
            *_i32(bias is not None, q, step, N, C, H, W, TH, TW, pad[0], pad[1]))
    return as_nchw(out)


def uniform_gpu(shape, seed: int, offset: int):
    """U[0, 1) float32 numbers of `shape` from Philox counters offset, offset+1, ... under key `seed`."""
    out = cp.empty(shape, dtype=cp.float32)
    _launch(_kernel("uniform"), out.size, out, np.int64(out.size),
            np.uint64(seed % 2**64), np.uint64(offset % 2**64))
    return out
