"""SyncBatchNorm2d: BatchNorm whose statistics span the global batch, split over K data-parallel ranks.

With plain BatchNorm2d each rank normalises by its own shard's mean and variance (as PyTorch's DDP
does by default), so K ranks with global batch B behave like K independent batches of B/K. This
layer all-reduces the per-channel sums instead, so K ranks behave exactly like one batch of B.

Notation: rank r holds x_r (N_r, C, H, W); M_r = N_r*H*W values per channel; M = sum_r M_r.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .norm import BatchNorm2d


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm2d over (N, H, W) of the whole global batch, one all-reduce forward and one backward.

    `comm` is anything with allreduce_sum_(buf) (in-place sum over the ranks of a 1-D array on the
    layer's device): minivgg.distributed's MPIEngine (NumPy) or NCCLEngine (CuPy).

    Forward (training), per channel, in ONE all-reduce of [s1 (C), s2 (C), M_r]. The sums are taken
    around K = running_mean (the same on every rank), so the sum of squares does not cancel when
    the mean is large compared with the spread ("shifted data" variance):
        s1 = sum_r sum(x_r - K),   s2 = sum_r sum((x_r - K)^2),   M = sum_r M_r
        mu = K + s1/M,             var = s2/M - (s1/M)^2               (biased, as BatchNorm2d)
        xhat_r = (x_r - mu) / sqrt(var + eps),   out_r = gamma * xhat_r + beta
    running_mean / running_var are updated from the global mu and var (unbiased by M/(M-1)), so
    they stay identical on every rank.

    Backward (training). Rank r's dout g_r is the gradient of ITS shard's mean loss; the global
    loss is L = sum_r w_r loss_r with w_r = M_r/M (its share of the batch), and the gradient
    all-reduce later sums w_r * (rank r's parameter gradients). The two per-channel sums the input
    gradient needs are therefore taken over the global batch with those weights, in ONE all-reduce:
        A = sum_r w_r sum(g_r),      Bs = sum_r w_r sum(g_r * xhat_r)
    and, written in rank r's own-loss units (dL/dx_r divided by w_r):
        dx_r     = gamma / sqrt(var + eps) * (g_r - (A + xhat_r * Bs) / M_r)
        dgamma_r = sum(g_r * xhat_r),   dbeta_r = sum(g_r)      (local; the gradient all-reduce sums them)
    With K=1 (w=1, M_r=M) these are BatchNorm2d's equations. Eval mode uses the running statistics
    and communicates nothing.
    """

    def __init__(self, num_features, comm, eps=1e-5, momentum=0.1, dtype=None):
        kwargs = {} if dtype is None else {"dtype": dtype}
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        if not hasattr(comm, "allreduce_sum_"):
            raise TypeError(f"SyncBatchNorm2d: comm must have allreduce_sum_(buf), got {type(comm).__name__}")
        self.comm = comm
        self._synced = False   # did the last forward use (and cache) the global statistics?

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm2d, comm) -> "SyncBatchNorm2d":
        """A SyncBatchNorm2d with bn's settings, parameters and running statistics (same arrays)."""
        sync = cls(bn.num_features, comm, eps=bn.eps, momentum=bn.momentum)
        sync.params, sync.buffers = bn.params, bn.buffers
        sync.training, sync.frozen = bn.training, bn.frozen
        return sync

    def forward(self, x):
        self._synced = self.training and not self.frozen
        if not self._synced:
            return super().forward(x)   # running statistics (eval, or frozen): nothing to synchronise
        self.check_input(x, ndim=4, channels=self.num_features)
        N, C, H, W = x.shape
        xp = backend.get_array_module(x)
        dt = x.dtype.type
        shift = self.buffers["running_mean"].astype(x.dtype).reshape(1, C, 1, 1)   # K (1, C, 1, 1)
        xs = xp.subtract(x, shift, out=backend.out_like(x))                       # (N, C, H, W) x - K
        sums = xp.empty(2 * C + 1, dtype=x.dtype)                                 # [s1, s2, M_r]
        sums[:C] = xp.einsum("nchw->c", xs)
        sums[C:2 * C] = xp.einsum("nchw,nchw->c", xs, xs)
        sums[2 * C] = N * H * W
        self.comm.allreduce_sum_(sums)
        # M stays where it was summed: reading it back would cost a device-to-host copy (and a wait)
        # per layer per step. Only a rank whose own count is below 2 needs the sum to check it.
        M = sums[2 * C]                                                           # global count, 0-d
        if N * H * W < 2 and float(M) < 2:
            raise ValueError(f"{self!r}: training needs more than one value per channel over all ranks, "
                             f"got {float(M):.0f}; use a larger batch, or eval()")
        m1 = sums[:C] / M                                                         # (C,) mean of x - K
        mu = shift.reshape(C) + m1                                                # (C,)
        var = xp.maximum(sums[C:2 * C] / M - m1 * m1, dt(0))                      # (C,) biased
        self._update_running_global(mu, var, M)
        inv_std = 1.0 / xp.sqrt(var + dt(self.eps))                               # (C,)
        xhat = xp.subtract(x, mu.reshape(1, C, 1, 1), out=backend.out_like(x))    # (N, C, H, W)
        xhat *= inv_std.reshape(1, C, 1, 1)                                       # (x - mu) * inv_std
        out = xp.multiply(xhat, self.params["weight"].reshape(1, C, 1, 1), out=backend.out_like(x))
        out += self.params["bias"].reshape(1, C, 1, 1)                            # (N, C, H, W)
        self.cache = (x, xhat, inv_std, N * H * W, M)
        return out

    def _update_running_global(self, mu, var, M):
        """M: the global count, a 0-d array (or scalar) on the layer's device, never read back."""
        b = self.buffers
        b["num_batches_tracked"][...] += 1
        dt = b["running_mean"].dtype.type
        m = self._momentum(dt)
        b["running_mean"] = (1 - m) * b["running_mean"] + m * mu.astype(b["running_mean"].dtype)
        M = M.astype(np.float64)                                                  # M / (M - 1) in float64
        unbiased = (var * (M / (M - 1)).astype(dt)).astype(b["running_var"].dtype)
        b["running_var"] = (1 - m) * b["running_var"] + m * unbiased

    def backward(self, dout):
        if self.cache is None or not self._synced:   # an eval-mode forward left BatchNorm2d's cache
            return super().backward(dout)
        x, xhat, inv_std, M_r, M = self.saved()
        self.check_dout(dout, x.shape, like=x)
        N, C, H, W = x.shape
        xp = backend.get_array_module(x)
        dt = x.dtype.type
        sum_dout = xp.einsum("nchw->c", dout)                                     # (C,)
        sum_dout_xhat = xp.einsum("nchw,nchw->c", dout, xhat)                     # (C,)
        self.grads["weight"] = sum_dout_xhat                                      # (C,) local
        self.grads["bias"] = sum_dout                                             # (C,) local
        w = (M_r / M.astype(np.float64)).astype(x.dtype)                          # this rank's share
        sums = xp.concatenate([sum_dout * w, sum_dout_xhat * w])                  # (2C,) [A, Bs] after the sum
        self.comm.allreduce_sum_(sums)
        A, Bs = sums[:C], sums[C:]
        a = self.params["weight"] * inv_std                                       # (C,)
        dx = xp.multiply(dout, a.reshape(1, C, 1, 1), out=backend.out_like(dout))  # (N, C, H, W)
        t = xp.multiply(xhat, Bs.reshape(1, C, 1, 1), out=backend.out_like(xhat))  # (N, C, H, W)
        t += A.reshape(1, C, 1, 1)
        t *= (a / dt(M_r)).reshape(1, C, 1, 1)                                    # (xhat*Bs + A) * a / M_r
        dx -= t
        return dx

    def __repr__(self):
        return f"SyncBatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum})"


def convert_sync_batchnorm(model, comm) -> int:
    """Replace every BatchNorm2d in `model` by a SyncBatchNorm2d sharing its arrays; return how many."""
    from .container import Sequential
    count = 0
    for _, parent in list(model.modules()):
        for name, child in parent.children():
            if type(child) is BatchNorm2d:
                sync = SyncBatchNorm2d.from_batchnorm(child, comm)
                if isinstance(parent, Sequential):
                    parent.layers[int(name)] = sync
                else:
                    setattr(parent, name, sync)
                count += 1
    return count
