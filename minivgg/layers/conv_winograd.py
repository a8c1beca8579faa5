"""Winograd's minimal filtering: a 3x3 stride-1 convolution with 2.25x or 4x fewer multiplications.

The lesson first (this docstring, winograd_f23 and the per-tile reference conv2d_winograd_naive),
then the engine (WinogradConv2d, on the CPU and the GPU). Notation as conv.py: N batch,
C in-channels, F out-channels, H W input size, OH OW output size; m the output tile side,
r = 3 the kernel side, a = m + r - 1 the input tile side, TH TW the tiles per column and row,
P = TH*TW*N the tiles of a batch.

One dimension, F(2, 3): two outputs of a 3-tap correlation, y_i = d_i g_0 + d_(i+1) g_1 + d_(i+2) g_2,
take 6 multiplications directly. Winograd (and Toom and Cook before him) take 4:
    m1 = (d0 - d2) g0           m2 = (d1 + d2) (g0 + g1 + g2) / 2
    m4 = (d1 - d3) g2           m3 = (d2 - d1) (g0 - g1 + g2) / 2
    y0 = m1 + m2 + m3           y1 = m2 - m3 - m4
The sums of g are paid once per filter, the sums of d once per input tile; what is left per
output pair is 4 products instead of 6. In matrices, y = A^T [(G g) * (B^T d)], * elementwise:
      B^T = [1  0 -1  0]     G = [ 1    0    0 ]     A^T = [1  1  1  0]
            [0  1  1  0]         [1/2  1/2  1/2]           [0  1 -1 -1]
            [0 -1  1  0]         [1/2 -1/2  1/2]
            [0  1  0 -1]         [ 0    0    1 ]
(They come from evaluating the polynomials d(x) and g(x) at the points 0, 1, -1 and infinity,
multiplying there, and interpolating back: the product of two polynomials needs only as many
products as it has coefficients.)

Two dimensions, F(m x m, 3 x 3), by nesting the 1-D algorithm in each direction: an a x a input
tile d and a 3x3 filter g give the m x m output tile
    Y = A^T [ U * V ] A,        U = G g G^T (a x a),   V = B^T d B (a x a)
with a*a multiplications instead of m*m*9: 16 instead of 36 for F(2x2, 3x3) (2.25x fewer),
36 instead of 144 for F(4x4, 3x3) (4x fewer), whose matrices (Lavin & Gray 2015) are
      B^T = [4  0 -5  0  1  0]   G = [ 1/4     0     0 ]   A^T = [1  1  1  1  1  0]
            [0 -4 -4  1  1  0]       [-1/6  -1/6  -1/6 ]         [0  1 -1  2 -2  0]
            [0  4 -4 -1  1  0]       [-1/6   1/6  -1/6 ]         [0  1  1  4  4  0]
            [0 -2 -1  2  1  0]       [1/24  1/12   1/6 ]         [0  1 -1  8 -8  1]
            [0  2 -1 -2  1  0]       [1/24 -1/12   1/6 ]
            [0  4  0 -5  0  1]       [  0     0     1  ]
(points 0, 1, -1, 2, -2, infinity). Tiles start every m pixels of the padded input and overlap
by r - 1 = 2; the last row and column of tiles hang over the edge when OH or OW is not a
multiple of m, and read zeros there (their extra outputs are dropped).

Across channels the elementwise product becomes a sum: for every one of the a*a positions
(xi, nu) of a tile,
    M[xi,nu] (F, P) = U[xi,nu] (F, C) @ V[xi,nu] (C, P),        Y = A^T M A per tile
so a convolution is a*a GEMMs between transforms: the work of im2col's one GEMM shrinks by
m*m*9 / (a*a), and the transforms (a few additions per number) are what it costs.

Backward, through the same domain (every step is linear, so its gradient is the transposed map):
    dM = A dY A^T                        per tile (dY the tile of dL/dout, zero beyond OH, OW)
    dU[xi,nu] = dM[xi,nu] @ V[xi,nu]^T   (F, C)     dL/dW = G^T dU G          (F, C, 3, 3)
    dV[xi,nu] = U[xi,nu]^T @ dM[xi,nu]   (C, P)     dL/dd = B dV B^T per tile, added back
                                                    over the overlapping tiles  -> dL/dx
    dL/db = dout summed over N, OH, OW.

Numerics: the transforms add and subtract before the products, so the rounding error grows
with their constants. In float32, against a float64 loop convolution on VGG-11's layers and
real activations, F(2x2, 3x3)'s output and dL/dx are about twice as far off as im2col's (a few
1e-7 of their norm) and F(4x4, 3x3)'s (entries up to 8 in A^T and 5 in B^T, fractions down to
1/24 in G) about ten times (a few 1e-6); dL/dW came out as close as im2col's or closer. benchmarks/winograd_error.py measures
it. float16 data run their transforms and GEMMs in
float32 and are rounded once, at the end: both tile sizes then land at float16's own rounding
(2e-4), closer than im2col computed in float16. So `auto` never avoids F(4x4) for accuracy,
only where Winograd is slower: tiny maps (under 4 on a side) and thin first layers, which it
leaves on im2col.

The engine, WinogradConv2d: 3x3 kernels, stride 1, any padding; other shapes (VGG has
none, any other Conv2d may) fall back to the tuned im2col engine (conv_fast.TunedConv2d), which it
extends. Its CPU and GPU paths are the same four steps; only the tile gathers differ:
    V  = winograd_tiles(x, B^T)         one gather copy + one GEMM by kron(B^T, B^T) on the CPU,
                                        one kernel on the GPU (kernels.cu)
    M  = U @ V                          a*a GEMMs (xp.matmul over a stacked axis)
    Yt = kron(A^T, A^T) @ M             one GEMM: every tile's A^T M A
    y  = winograd_untile(Yt) + b        tiles back onto the map, bias added in the same pass
The batch runs in chunks whose tiles (V, M) fit the workspace limit as im2col's columns do;
forward keeps V for backward when the batch is one chunk. Every array above but the output and
the gradients lives in memory reused from step to step (backend.Scratch: fresh pages of a large
array cost a page fault each, which measured as much as the transforms): U and V in the
layer's own, as backward needs them; M, Yt, dM, dU, dV and the gathers' copies in one Scratch
all the layers of a thread share, since none outlives its call.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import batch_chunks, winograd_tiles, winograd_untile
from .conv_fast import TunedConv2d

# tile side m -> (B^T (a, a), G (a, 3), A^T (m, a)), float64
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], dtype=np.float64)),
}


def winograd_f23(d, g):
    """F(2, 3) on one tile, spelled out: d (4,), g (3,) -> y (2,), y_i = sum_k d[i+k] g[k],
    with the 4 multiplications of the docstring (the filter sums would be paid once)."""
    m1 = (d[0] - d[2]) * g[0]
    m2 = (d[1] + d[2]) * ((g[0] + g[1] + g[2]) / 2)
    m3 = (d[2] - d[1]) * ((g[0] - g[1] + g[2]) / 2)
    m4 = (d[1] - d[3]) * g[2]
    return np.array([m1 + m2 + m3, m2 - m3 - m4])


def tile_grid(H: int, W: int, padding: tuple, m: int):
    """(OH, OW), (TH, TW): the 3x3 stride-1 output size and the m x m output tiles covering it."""
    OH, OW = H + 2 * padding[0] - 2, W + 2 * padding[1] - 2
    return (OH, OW), (-(-OH // m), -(-OW // m))


# ---------------------------------------------------------------------------
# The reference: the equations above one tile position at a time (vectorised only over
# images and channels). Slow, readable, and tested equal to conv2d_naive and to the engine.
# ---------------------------------------------------------------------------
def conv2d_winograd_naive(x, weight, bias=None, padding=1, m=2):
    """x (N, C, H, W), weight (F, C, 3, 3) -> out (N, F, OH, OW) by F(m x m, 3 x 3), tile by tile."""
    BT, G, AT = MATRICES[m]
    a = m + 2
    N, C, H, W = x.shape
    F = weight.shape[0]
    (ph, pw) = (padding, padding) if np.isscalar(padding) else padding
    (OH, OW), (TH, TW) = tile_grid(H, W, (ph, pw), m)
    xpad = np.zeros((N, C, TH * m + 2, TW * m + 2), dtype=np.float64)   # tiles may hang over
    xpad[:, :, ph:ph + H, pw:pw + W] = x
    U = G @ weight.astype(np.float64) @ G.T                              # (F, C, a, a)
    out = np.zeros((N, F, TH * m, TW * m))                              # (N, F, TH*m, TW*m)
    for th in range(TH):
        for tw in range(TW):
            d = xpad[:, :, th * m:th * m + a, tw * m:tw * m + a]          # (N, C, a, a)
            V = BT @ d @ BT.T                                            # (N, C, a, a)
            M = np.einsum("fcij,ncij->nfij", U, V)                       # (N, F, a, a)
            out[:, :, th * m:(th + 1) * m, tw * m:(tw + 1) * m] = AT @ M @ AT.T   # (N, F, m, m)
    out = out[:, :, :OH, :OW]
    if bias is not None:
        out = out + bias.reshape(1, F, 1, 1)
    return out.astype(x.dtype)


def conv2d_winograd_naive_backward(x, weight, dout, padding=1, m=2):
    """The backward equations of the docstring, tile by tile: returns (dx, dW, db)."""
    BT, G, AT = MATRICES[m]
    a = m + 2
    N, C, H, W = x.shape
    F = weight.shape[0]
    (ph, pw) = (padding, padding) if np.isscalar(padding) else padding
    (OH, OW), (TH, TW) = tile_grid(H, W, (ph, pw), m)
    xpad = np.zeros((N, C, TH * m + 2, TW * m + 2))
    xpad[:, :, ph:ph + H, pw:pw + W] = x
    dpad = np.zeros((N, F, TH * m, TW * m))                             # dY, zero past OH, OW
    dpad[:, :, :OH, :OW] = dout
    U = G @ weight.astype(np.float64) @ G.T                              # (F, C, a, a)
    dU = np.zeros_like(U)                                                # (F, C, a, a)
    dxpad = np.zeros_like(xpad)                                          # (N, C, Hp, Wp)
    for th in range(TH):
        for tw in range(TW):
            d = xpad[:, :, th * m:th * m + a, tw * m:tw * m + a]          # (N, C, a, a)
            V = BT @ d @ BT.T                                            # (N, C, a, a)
            dY = dpad[:, :, th * m:(th + 1) * m, tw * m:(tw + 1) * m]     # (N, F, m, m)
            dM = AT.T @ dY @ AT                                          # (N, F, a, a)
            dU += np.einsum("nfij,ncij->fcij", dM, V)                    # (F, C, a, a)
            dV = np.einsum("fcij,nfij->ncij", U, dM)                     # (N, C, a, a)
            dxpad[:, :, th * m:th * m + a, tw * m:tw * m + a] += BT.T @ dV @ BT   # overlaps add
    dW = G.T @ dU @ G                                                    # (F, C, 3, 3)
    dx = dxpad[:, :, ph:ph + H, pw:pw + W]
    return dx.astype(x.dtype), dW.astype(x.dtype), dout.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------
def winograd_applies(kernel_size, stride) -> bool:
    """Winograd F(m x m, 3 x 3) computes 3x3 kernels at stride 1 (any padding)."""
    return tuple(kernel_size) == (3, 3) and tuple(stride) == (1, 1)


class WinogradConv2d(TunedConv2d):
    """Conv2d by Winograd's F(2x2, 3x3) (TILE = 2; Winograd4Conv2d: F(4x4, 3x3)); the module
    docstring derives it. Same parameters, state_dict and results (to rounding) as Conv2d.

    Shapes that are not 3x3 stride 1 run the tuned im2col engine it extends (algorithm()
    says which runs for an input size). float16 data runs in float32 inside and is rounded
    to float16 once, at the end of forward and of backward.
    """

    TILE = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mats = None    # the transform matrices on the parameters' device (see matrices)
        self.work = backend.Scratch()   # U and V, kept for backward, reused from step to step

    def algorithm(self, H: int, W: int, dtype=np.float32) -> str:
        """The algorithm forward runs on an (N, C, H, W) input: 'winograd2', 'winograd4' or
        'im2col'."""
        return f"winograd{self.TILE}" if winograd_applies(self.kernel_size, self.stride) else "im2col"

    def drop_scratch(self) -> None:
        super().drop_scratch()
        self.mats = None
        self.work.clear()
        backend.shared_scratch().clear()   # the temporaries too: they may be on the old device

    def matrices(self, m: int, like, dtype) -> dict:
        """The transforms of F(m x m, 3 x 3) on like's device: L matrices for the tile gathers
        (float64), and the kron products the GEMMs apply, in the working dtype."""
        key = (m, type(like), np.dtype(dtype))
        if self.mats is None or self.mats["key"] != key:
            BT, G, AT = MATRICES[m]
            dev = backend.device_of(like)
            put = lambda a, dt: backend.to_device(np.ascontiguousarray(a, dtype=dt), dev)  # noqa: E731
            self.mats = {"key": key, "BT": put(BT, np.float64), "A": put(AT.T, np.float64),
                         "KG": put(np.kron(G, G), dtype),          # (a*a, 9): vec(G g G^T)
                         "KAT": put(np.kron(AT, AT), dtype),       # (m*m, a*a): vec(A^T M A)
                         "KB": put(np.kron(BT.T, BT.T), dtype)}    # (a*a, a*a): vec(B dV B^T)
        return self.mats

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        N, C, H, W = x.shape
        self.check_fits(H, W)
        algo = self.algorithm(H, W, x.dtype)
        if algo == "im2col":
            out = super().forward(x)
            self.cache = ("im2col", self.cache)
            return out
        m = int(algo[len("winograd"):])
        a, F, pad = m + 2, self.out_channels, self.padding
        xp = backend.get_array_module(x)
        work = np.float32 if x.dtype == np.float16 else x.dtype           # float16 runs in float32
        mats = self.matrices(m, x, work)
        (OH, OW), tiles = tile_grid(H, W, pad, m)
        T = tiles[0] * tiles[1]
        W9 = self.params["weight"].astype(work, copy=False).reshape(F * C, 9)
        U = self.work.get("U", (a * a, F, C), x, work)                   # (a*a, F, C): G g G^T
        xp.matmul(mats["KG"], W9.T, out=U.reshape(a * a, F * C))
        bias = self.params["bias"].astype(work, copy=False) if "bias" in self.params else None
        xw = x.astype(work, copy=False)
        chunks = batch_chunks(N, a * a * T * (2 * C + F) * np.dtype(work).itemsize, like=x)
        temp = backend.shared_scratch()                                   # M, T and the gathers' memory
        out = None if len(chunks) == 1 else xp.empty((F, OH, OW, N), dtype=work)   # (F, OH, OW, N)
        V = None
        for s in chunks:
            n = s.stop - s.start
            P = T * n
            V = winograd_tiles(xw[s], mats["BT"], m, pad, tiles, out=self.work.get("V", (a * a, C, P), x, work),
                               scratch=temp)                              # (a*a, C, P): B^T d B
            M = xp.matmul(U, V, out=temp.get("M", (a * a, F, P), x, work))   # (a*a, F, P)
            Yt = temp.get("T", (m * m, F, P), x, work)                    # (m*m, F, P): A^T M A
            xp.matmul(mats["KAT"], M.reshape(a * a, -1), out=Yt.reshape(m * m, -1))
            y = winograd_untile(Yt, m, m, (0, 0), (n, F, OH, OW), tiles, bias)  # (n, F, OH, OW)
            if out is None:
                out = y
            else:
                out[..., s] = y.transpose(1, 2, 3, 0)
        if len(chunks) > 1:
            out, V = out.transpose(3, 0, 1, 2), None                      # (N, F, OH, OW) view
        self.cache = ("winograd", m, x, U, V)    # V only when the batch was one chunk
        return out.astype(x.dtype, copy=False)

    def backward(self, dout):
        if self.saved()[0] == "im2col":
            self.cache = self.cache[1]
            dx = super().backward(dout)
            self.cache = ("im2col", self.cache)
            return dx
        _, m, x, U, kept_V = self.saved()
        N, C, H, W = x.shape
        a, F, pad = m + 2, self.out_channels, self.padding
        (OH, OW), tiles = tile_grid(H, W, pad, m)
        self.check_dout(dout, (N, F, OH, OW), like=x)
        xp = backend.get_array_module(x)
        work = U.dtype
        mats = self.matrices(m, x, work)
        xw, dw = x.astype(work, copy=False), dout.astype(work, copy=False)
        T = tiles[0] * tiles[1]
        temp = backend.shared_scratch()                                   # dM, dU, dV, ... (see forward)
        chunks = [slice(0, N)] if kept_V is not None else \
            batch_chunks(N, a * a * T * (2 * C + F) * np.dtype(work).itemsize, like=x)
        dx = xp.empty((C, H, W, N), dtype=x.dtype) if self.needs_input_grad and len(chunks) > 1 else None
        dU = None
        for s in chunks:
            n = s.stop - s.start
            P = T * n
            V = kept_V if kept_V is not None else \
                winograd_tiles(xw[s], mats["BT"], m, pad, tiles, out=self.work.get("V", (a * a, C, P), x, work),
                               scratch=temp)                              # (a*a, C, P)
            dM = winograd_tiles(dw[s], mats["A"], m, (0, 0), tiles, out=temp.get("M", (a * a, F, P), x, work),
                                scratch=temp)                             # (a*a, F, P): A dY A^T
            if not self.frozen:   # a frozen layer makes no dL/dW, dL/db (as Conv2d)
                if dU is None:
                    dU = xp.matmul(dM, V.transpose(0, 2, 1), out=temp.get("dU", (a * a, F, C), x, work))
                else:                                                     # (a*a, F, C)
                    dU += xp.matmul(dM, V.transpose(0, 2, 1))
            if self.needs_input_grad:
                dV = xp.matmul(U.transpose(0, 2, 1), dM, out=temp.get("T", (a * a, C, P), x, work))
                Dt = temp.get("M", (a * a, C, P), x, work)           # (a*a, C, P): U^T dM; dM is spent
                xp.matmul(mats["KB"], dV.reshape(a * a, -1), out=Dt.reshape(a * a, -1))   # B dV B^T per tile
                d = winograd_untile(Dt, a, m, pad, (n, C, H, W), tiles)  # (n, C, H, W): overlaps add
                if dx is None:
                    dx = d.astype(x.dtype, copy=False)
                else:
                    dx[..., s] = d.transpose(1, 2, 3, 0)
        if self.needs_input_grad and len(chunks) > 1:
            dx = dx.transpose(3, 0, 1, 2)                                 # (N, C, H, W) view
        if self.frozen:
            return dx
        dW = dU.reshape(a * a, F * C).T @ mats["KG"]                      # (F*C, 9): G^T dU G
        self.grads["weight"] = dW.reshape(F, C, 3, 3).astype(x.dtype, copy=False)
        if "bias" in self.params:   # dout's row sums as D @ 1, as conv_fast: BLAS reads D faster than sum()
            D = dw.transpose(1, 2, 3, 0).reshape(F, -1)                   # (F, OH*OW*N), a view of CHWN dout
            self.grads["bias"] = (D @ xp.ones(D.shape[1], dtype=work)).astype(x.dtype, copy=False)   # (F,)
        return dx

    def __repr__(self):
        return super().__repr__().replace("Conv2d(", f"{type(self).__name__}(", 1)


class Winograd4Conv2d(WinogradConv2d):
    """Conv2d by Winograd's F(4x4, 3x3): 4x fewer multiplications than im2col, larger
    transforms and rounding error (see the module docstring)."""

    TILE = 4


class AutoConv2d(WinogradConv2d):
    """Conv2d that chooses its algorithm per input size by a fixed rule (algorithm), so a
    seeded CPU run stays bit-repeatable: no timing decides anything."""

    TILE = None

    def algorithm(self, H: int, W: int, dtype=np.float32) -> str:
        """The rule, from measurements of every algorithm on VGG-11's layers (benchmarks/conv_speed.py):
          not 3x3 stride 1, or C < 16 (a first layer: its GEMMs are too thin to gain): im2col;
          an output under 4 on a side (VGG's 2x2 maps: a handful of tiles, too few tiles for the
          transforms to pay for themselves): im2col;
          else F(4x4, 3x3) (on 4x4 maps too, where it measured as fast as F(2x2, 3x3) or faster).
        The dtype does not enter (see the module docstring's numerics). F(2x2, 3x3) stays
        available as winograd2, the closer of the two to the exact result."""
        if not winograd_applies(self.kernel_size, self.stride) or self.in_channels < 16:
            return "im2col"
        (OH, OW), _ = tile_grid(H, W, self.padding, 4)
        return "im2col" if min(OH, OW) < 4 else "winograd4"
