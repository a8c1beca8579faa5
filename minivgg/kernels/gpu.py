"""CuPy kernels with the same signatures and layouts as kernels/cpu.py.

Each kernel runs one CUDA thread per output element, with no Python loop over
the batch. col2im and the pool backward *gather* (each input pixel sums the
column entries that came from it) instead of scattering, so no atomics are
needed and results are deterministic. CuPy comes from minivgg.backend.
"""
from __future__ import annotations

from ..backend import cupy as cp
from .cpu import out_size

_kernels: dict = {}


def _kernel(name: str):
    """Compile each kernel once, on first use (only where CuPy is present)."""
    if name not in _kernels:
        _kernels.update(_build())
    return _kernels[name]


def _build() -> dict:
    im2col = cp.ElementwiseKernel(
        "raw T x, int32 N, int32 C, int32 H, int32 W, int32 KH, int32 KW, "
        "int32 OH, int32 OW, int32 sh, int32 sw, int32 ph, int32 pw",
        "T col",
        """
        // col is (C, KH, KW, N, OH, OW); i walks it in order
        int ow = i % OW;  int t = i / OW;
        int oh = t % OH;  t /= OH;
        int b  = t % N;   t /= N;     // batch index (n and i are reserved names in CuPy)
        int kw = t % KW;  t /= KW;
        int kh = t % KH;  int c = t / KH;
        int y = oh * sh - ph + kh;
        int xx = ow * sw - pw + kw;
        col = (y >= 0 && y < H && xx >= 0 && xx < W)
              ? x[(((long long)b * C + c) * H + y) * W + xx] : (T)0;
        """,
        "minivgg_im2col")
    col2im = cp.ElementwiseKernel(
        "raw T col, int32 N, int32 C, int32 H, int32 W, int32 KH, int32 KW, "
        "int32 OH, int32 OW, int32 sh, int32 sw, int32 ph, int32 pw",
        "T dx",
        """
        // dx is (N, C, H, W); gather every column entry copied from pixel (y, xx)
        int xx = i % W;  int t = i / W;
        int y  = t % H;  t /= H;
        int c  = t % C;  int b = t / C;
        T acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            int oy = y + ph - kh;
            if (oy < 0 || oy % sh != 0) continue;
            oy /= sh;
            if (oy >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int ox = xx + pw - kw;
                if (ox < 0 || ox % sw != 0) continue;
                ox /= sw;
                if (ox >= OW) continue;
                acc += col[((((long long)c * KH + kh) * KW + kw) * N + b) * OH * OW + oy * OW + ox];
            }
        }
        dx = acc;
        """,
        "minivgg_col2im")
    pool_fwd = cp.ElementwiseKernel(
        "raw T x, int32 H, int32 W, int32 KH, int32 KW, int32 OH, int32 OW, "
        "int32 sh, int32 sw, int32 ph, int32 pw",
        "T out, int32 argmax",
        """
        // out, argmax are (N, C, OH, OW); first strict maximum wins, as in PyTorch
        int ow = i % OW;  int t = i / OW;
        int oh = t % OH;  int nc = t / OH;
        const T* plane = &x[(long long)nc * H * W];
        T best = 0;  int arg = 0;  bool seen = false;   // seeded by the first in-bounds value
        for (int kh = 0; kh < KH; ++kh) {
            int y = oh * sh - ph + kh;
            if (y < 0 || y >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int xx = ow * sw - pw + kw;
                if (xx < 0 || xx >= W) continue;
                T v = plane[y * W + xx];
                if (!seen || v > best) { best = v; arg = kh * KW + kw; seen = true; }
            }
        }
        out = best;  argmax = arg;
        """,
        "minivgg_maxpool_fwd")
    pool_bwd = cp.ElementwiseKernel(
        "raw T dout, raw int32 argmax, int32 H, int32 W, int32 KH, int32 KW, "
        "int32 OH, int32 OW, int32 sh, int32 sw, int32 ph, int32 pw",
        "T dx",
        """
        // dx is (N, C, H, W); sum dout over the windows whose argmax is this pixel
        int xx = i % W;  int t = i / W;
        int y  = t % H;  int nc = t / H;
        long long base = (long long)nc * OH * OW;
        T acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            int oy = y + ph - kh;
            if (oy < 0 || oy % sh != 0) continue;
            oy /= sh;
            if (oy >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int ox = xx + pw - kw;
                if (ox < 0 || ox % sw != 0) continue;
                ox /= sw;
                if (ox >= OW) continue;
                if (argmax[base + oy * OW + ox] == kh * KW + kw) acc += dout[base + oy * OW + ox];
            }
        }
        dx = acc;
        """,
        "minivgg_maxpool_bwd")
    return {"im2col": im2col, "col2im": col2im, "pool_fwd": pool_fwd, "pool_bwd": pool_bwd}


def im2col_gpu(x, KH: int, KW: int, stride: tuple, pad: tuple, out=None):
    """x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), as im2col_cpu."""
    N, C, H, W = x.shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    if out is None:
        out = cp.empty((C * KH * KW, N * OH * OW), dtype=x.dtype)
    _kernel("im2col")(cp.ascontiguousarray(x), N, C, H, W, KH, KW, OH, OW,
                      stride[0], stride[1], pad[0], pad[1], out.reshape(-1))
    return out.reshape(C * KH * KW, N * OH * OW)


def col2im_gpu(cols, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    """cols (C*KH*KW, N*OH*OW) -> dx (N, C, H, W), as col2im_cpu."""
    N, C, H, W = x_shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    dx = cp.empty((N, C, H, W), dtype=cols.dtype)
    _kernel("col2im")(cp.ascontiguousarray(cols), N, C, H, W, KH, KW, OH, OW,
                      stride[0], stride[1], pad[0], pad[1], dx)
    return dx


def maxpool_forward_gpu(x, KH: int, KW: int, stride: tuple, pad: tuple):
    N, C, H, W = x.shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    out = cp.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = cp.empty((N, C, OH, OW), dtype=cp.int32)
    _kernel("pool_fwd")(cp.ascontiguousarray(x), H, W, KH, KW, OH, OW,
                        stride[0], stride[1], pad[0], pad[1], out, argmax)
    return out, argmax


def maxpool_backward_gpu(dout, argmax, x_shape, KH: int, KW: int, stride: tuple, pad: tuple):
    N, C, H, W = x_shape
    OH, OW = dout.shape[2:]
    dx = cp.empty((N, C, H, W), dtype=dout.dtype)
    _kernel("pool_bwd")(cp.ascontiguousarray(dout), cp.ascontiguousarray(argmax), H, W, KH, KW,
                        OH, OW, stride[0], stride[1], pad[0], pad[1], dx)
    return dx
