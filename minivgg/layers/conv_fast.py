"""Conv2d's tuned engine: bias folding, flipped-kernel dL/dx, CHWN layout, column reuse.

Each trick is explained in TunedConv2d's docstring; tests hold it equal to the
textbook Conv2d and to the loop reference on both backends. Same notation as conv.py.
"""
from __future__ import annotations

import math

from .. import backend
from ..kernels import batch_chunks, col2im, im2col, out_size
from .conv import Conv2d


class TunedConv2d(Conv2d):
    """Conv2d's tuned engine: the same numbers as the textbook Conv2d, in fewer passes.
    Same parameters and state_dict names; the models build it by default.

    Bias trick: a row of ones under the columns and b as one more column of the
    weight give [Wm | b] @ [cols; 1] = Wm @ cols + b. It copies the weight (and
    backward its gradient), F*(K+1) numbers with K = C*KH*KW, and saves a pass
    over the output (and backward one over dout), F*M numbers with M = OH*OW*N:
    so the bias is folded in when K < M (the first layers, whose outputs are
    large), and added afterwards otherwise. Backward then gets both gradients from
    one product: D @ [cols; 1]^T = [dL/dWm | dL/db]. Unfolded, dL/db = D @ 1 (BLAS
    reads D faster than sum()).

    Layout: the columns run (oh, ow, n), the batch innermost, so the product
    (F, OH*OW*N) is the output with its memory in channel, row, column, image
    order (CHWN). out is that array seen through transposed strides as
    (N, F, OH, OW), not a copy; the layers after it read it as NCHW and keep
    its memory order, and the next convolution's im2col reads it fastest in
    exactly that order. NCHW copies happen only at a network's edges.

    Flipped-kernel dL/dx: with stride 1 the same dL/dx is itself a convolution:
    dout, padded by K-1-p, correlated with the kernel flipped in space and with its
    F and C axes swapped (input_grad_by_flipped_kernel, derived there). That runs as
    im2col + GEMM again, with no scattered adds; backward uses it when
    flipped_kernel_applies.

    Column reuse: when the batch fits in one chunk, forward keeps cols for dL/dW,
    and backward uses them as they are even if the workspace limit has changed
    since. Once dL/dW is made, backward writes its dL/dx columns into that same
    memory (self.spare), and the next forward its columns: a step allocates no new
    columns (fresh pages cost the kernel a page fault each). to/astype drop that
    memory (drop_scratch). im2col and col2im split their copies over the cores
    (kernels/threads.py).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spare = None    # the last columns' memory, reused by the next forward and backward

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        N, C, H, W = x.shape
        (KH, KW), (ph, pw) = self.kernel_size, self.padding
        self.check_fits(H, W)
        F, K = self.out_channels, C * KH * KW
        M = N * out_size(H, KH, self.stride[0], ph) * out_size(W, KW, self.stride[1], pw)
        Wm = self.params["weight"].reshape(F, K)                          # (F, K)
        fold = self.folds_bias(K, M)
        if fold:   # the bias trick: [Wm | b] @ [cols; 1] = Wm @ cols + b
            xp = backend.get_array_module(x)
            Wm = xp.concatenate([Wm, self.params["bias"].reshape(F, 1)], axis=1)  # (F, K+1)
        out, cols = correlate(x, Wm, KH, KW, self.stride, self.padding, keep_cols=True,
                              spare=self.spare, ones_row=fold)                   # (N, F, OH, OW)
        self.spare = cols          # None when the batch took several chunks
        if "bias" in self.params and not fold:
            out += self.params["bias"].reshape(1, F, 1, 1)
        self.cache = (x, cols)     # cols is None when the batch took several chunks
        return out

    def drop_scratch(self) -> None:
        self.spare = None          # the columns' memory is on the old device, in the old dtype

    def folds_bias(self, K: int, M: int) -> bool:
        """Whether the bias goes inside the products (the bias trick, see the class docstring):
        when there is one, and copying the weight (F x K+1) costs less than a pass over the
        output (F x M)."""
        return "bias" in self.params and K < M

    def backward(self, dout):
        x, kept_cols = self.saved()
        N, C, H, W = x.shape
        (KH, KW), (sh, sw), (ph, pw), F = self.kernel_size, self.stride, self.padding, self.out_channels
        OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
        self.check_dout(dout, (N, F, OH, OW), like=x)
        xp = backend.get_array_module(x)
        K, M = C * KH * KW, N * OH * OW
        Wm = self.params["weight"].reshape(F, K)                          # (F, K)
        fold = self.folds_bias(K, M)   # then every columns array below has the ones row K too
        by_flip = self.needs_input_grad and flipped_kernel_applies(self.kernel_size, self.stride,
                                                                   self.padding, F, C, M)
        by_col2im = self.needs_input_grad and not by_flip
        dWb = db = None   # dWb: dL/dWm, or d[Wm | b] = [dL/dWm | dL/db] when the bias was folded
        dx = xp.empty_like(x) if by_col2im else None                      # (N, C, H, W)
        # Columns forward kept cover the whole batch: use them as one chunk, whatever the
        # workspace limit is now. Otherwise rebuild them chunk by chunk. Never mix the two.
        chunks = [slice(0, N)] if kept_cols is not None else \
            batch_chunks(N, (K + fold) * OH * OW * x.itemsize, like=x)
        for s in chunks:
            D = dout[s].transpose(1, 2, 3, 0).reshape(F, -1)              # (F, OH*OW*n)
            if not self.frozen:   # a frozen layer makes no dL/dW, dL/db (nothing would use them)
                cols = kept_cols if kept_cols is not None else \
                    columns(x[s], KH, KW, self.stride, self.padding, ones_row=fold)  # (K [+1], OH*OW*n)
                dWb = D @ cols.T if dWb is None else dWb + D @ cols.T    # (F, K [+1])
                if "bias" in self.params and not fold:  # D's row sums as D @ 1: BLAS reads D faster than sum()
                    ones = xp.ones(D.shape[1], dtype=D.dtype)
                    db = D @ ones if db is None else db + D @ ones        # (F,)
            if by_col2im:  # the textbook dL/dx: each column entry back onto its pixel
                dcols = reuse(self.spare, (K, D.shape[1]), x) if kept_cols is not None else None
                dcols = xp.matmul(Wm.T, D, out=dcols)                     # (K, OH*OW*n)
                dx[s] = col2im(dcols, x[s].shape, KH, KW, self.stride, self.padding)  # (n, C, H, W)
        if fold and dWb is not None:   # the ones row's column is dL/db = D @ 1; copied out, contiguous
            dWb, db = xp.ascontiguousarray(dWb[:, :K]), dWb[:, K].copy()  # (F, K), (F,)
        if dWb is not None:
            self.grads["weight"] = dWb.reshape(F, C, KH, KW)              # (F, C, KH, KW)
            if "bias" in self.params:
                self.grads["bias"] = db                                   # (F,)
        if by_flip:    # the same dL/dx, as a convolution of dout (faster: no scattered adds)
            dx = input_grad_by_flipped_kernel(dout, self.params["weight"], self.padding,
                                              spare=self.spare if kept_cols is not None else None)
        if self.needs_input_grad and kept_cols is not None:
            self.cache = (x, None)   # its columns now hold dL/dx's: a second backward rebuilds them
        return dx


def correlate(x, Wm, KH, KW, stride, pad, keep_cols=False, spare=None, ones_row=False):
    """out = Wm @ im2col(x), seen as NCHW: the convolution without its bias (or with it,
    given ones_row and Wm = [weight | bias], the bias trick).

    x (N, C, H, W), Wm (F, K) with K = C*KH*KW (+1 with ones_row) -> out (N, F, OH, OW),
    a view of an (F, OH, OW, N) array (CHWN in memory). The batch is processed in chunks
    that fit the workspace. Returns (out, cols); cols (K, OH*OW*N) only when keep_cols
    and the batch fit in a single chunk, else None. The columns go into spare's memory
    when it is large enough (see reuse).
    """
    N, C, H, W = x.shape
    F, K = Wm.shape
    OH, OW = out_size(H, KH, stride[0], pad[0]), out_size(W, KW, stride[1], pad[1])
    xp = backend.get_array_module(x)
    chunks = batch_chunks(N, K * OH * OW * x.itemsize, like=x)
    if len(chunks) == 1:
        cols = columns(x, KH, KW, stride, pad, ones_row,
                       out=reuse(spare, (K, OH * OW * N), x))             # (K, OH*OW*N)
        y = (Wm @ cols).reshape(F, OH, OW, N)                             # (F, OH, OW, N)
        return y.transpose(3, 0, 1, 2), (cols if keep_cols else None)     # (N, F, OH, OW) view
    y = xp.empty((F, OH, OW, N), dtype=x.dtype)                           # (F, OH, OW, N)
    for s in chunks:
        cols = columns(x[s], KH, KW, stride, pad, ones_row)               # (K, OH*OW*n)
        y[..., s] = (Wm @ cols).reshape(F, OH, OW, -1)                    # (F, OH, OW, n)
    return y.transpose(3, 0, 1, 2), None                                  # (N, F, OH, OW) view


def columns(x, KH, KW, stride, pad, ones_row=False, out=None):
    """im2col(x) (C*KH*KW, OH*OW*N), and under it a row of ones when ones_row (the bias
    trick), into `out` when given (a contiguous array of the full shape)."""
    if not ones_row:
        return im2col(x, KH, KW, stride, pad, out=out)
    N, C, H, W = x.shape
    K = C * KH * KW
    M = N * out_size(H, KH, stride[0], pad[0]) * out_size(W, KW, stride[1], pad[1])
    xp = backend.get_array_module(x)
    cols = xp.empty((K + 1, M), dtype=x.dtype) if out is None else out   # (K+1, M)
    im2col(x, KH, KW, stride, pad, out=cols[:K])                          # rows 0..K-1, in place
    cols[K] = 1
    return cols


def flipped_kernel_applies(kernel_size, stride, padding, F: int, C: int, M: int) -> bool:
    """When TunedConv2d.backward computes dL/dx by input_grad_by_flipped_kernel (M = N*OH*OW,
    the columns' width): all four of
      stride 1 (then every dout entry is one window position, with no gaps between);
      padding < kernel (the pad K-1-p it needs is not negative);
      F <= C: its columns come from dout's F channels, F*KH*KW rows, where col2im's
        product Wm^T @ D has C*KH*KW; with F > C the flip copies more and needs more
        memory, and col2im's adds, over runs of N numbers in the CHWN layout, cost less;
      C <= M: it also copies the flipped weight, F*C*KH*KW numbers, which must not
        outweigh the F*KH*KW*M of its columns (VGG's 2x2 maps: 512 channels, M = 256).
    The rule follows measurements of both paths on VGG-11's layers (benchmarks/conv_speed.py):
    the flip wins where F == C on the larger maps, col2im where F > C or the maps are tiny."""
    (KH, KW), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return (sh, sw) == (1, 1) and ph < KH and pw < KW and F <= C and C <= M


def input_grad_by_flipped_kernel(dout, weight, padding, spare=None):
    """dL/dx of a stride-1 convolution, computed as a convolution of dout.

    dout (N, F, OH, OW), weight (F, C, KH, KW) -> dx (N, C, H, W). On one axis,
    out[i] = sum_k xpad[i+k] W[k], so dxpad[j] = sum_k dout[j-k] W[k]:
      why flip:   with k' = K-1-k that is sum_k' dout[j-(K-1)+k'] W[K-1-k'], a correlation with W reversed;
      why K-1-p:  dout[j-(K-1)+k'] reads dout padded by K-1, and dx[m] = dxpad[m+p] removes p of it;
      why swap:   out[f] sums x[c] * W[f,c] over c, so dx[c] sums dout[f] * W[f,c] over f: a (C, F) kernel.
    """
    F, C, KH, KW = weight.shape
    ph, pw = padding
    xp = backend.get_array_module(dout)
    W_flip = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)                   # (C, F, KH, KW)
    W_flip = xp.ascontiguousarray(W_flip).reshape(C, F * KH * KW)             # (C, F*KH*KW)
    dx, _ = correlate(dout, W_flip, KH, KW, (1, 1), (KH - 1 - ph, KW - 1 - pw), spare=spare)  # (N, C, H, W)
    return dx


def reuse(spare, shape, like):
    """spare's memory seen as a `shape` array, if spare is an array of like's kind and dtype
    with room for it; else None (and the caller allocates)."""
    n = math.prod(shape)
    if spare is None or type(spare) is not type(like) or spare.dtype != like.dtype or spare.size < n:
        return None
    return spare.reshape(-1)[:n].reshape(shape)
