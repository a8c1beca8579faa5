"""BatchNorm2d: normalise each channel over the batch and the image."""
from __future__ import annotations

import numpy as np

from .. import backend
from .base import Layer


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) for each of C channels, as in PyTorch.

    Shapes: x (N, C, H, W), weight gamma (C,), bias beta (C,); M = N*H*W.
    Training: mu = mean(x), var = mean((x - mu)^2) (biased) over (N, H, W);
        xhat = (x - mu) / sqrt(var + eps);   out = gamma * xhat + beta
        running_mean <- (1 - momentum) * running_mean + momentum * mu
        running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)
    Eval: the same with running_mean and running_var in place of mu and var.

    Backward (training), sums over (N, H, W):
        dL/dbeta  = sum(dout)
        dL/dgamma = sum(dout * xhat)
        dL/dx     = gamma / (M * sqrt(var + eps)) * (M*dout - sum(dout) - xhat * sum(dout * xhat))
    Backward (eval): the statistics are constants, so dL/dx = dout * gamma / sqrt(running_var + eps).
    momentum=None uses a cumulative average, as PyTorch does.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        C = self.num_features
        self.params["weight"] = np.ones(C, dtype=dtype)                # gamma (C,)
        self.params["bias"] = np.zeros(C, dtype=dtype)                 # beta (C,)
        self.buffers["running_mean"] = np.zeros(C, dtype=dtype)        # (C,)
        self.buffers["running_var"] = np.ones(C, dtype=dtype)          # (C,)
        self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.num_features)
        N, C, H, W = x.shape
        M = N * H * W
        gamma, beta = self.params["weight"].reshape(1, C, 1, 1), self.params["bias"].reshape(1, C, 1, 1)
        if self.training:
            if M < 2:
                raise ValueError(f"{self!r}: training needs more than one value per channel, got "
                                 f"input shape {tuple(x.shape)}; use a batch of 2 or more, or eval()")
            mu = x.mean(axis=(0, 2, 3), keepdims=True)                 # (1, C, 1, 1)
            xc = x - mu                                                # (N, C, H, W)
            var = (xc * xc).mean(axis=(0, 2, 3), keepdims=True)        # (1, C, 1, 1)
            self._update_running(mu.reshape(C), var.reshape(C), M)
        else:
            mu = self.buffers["running_mean"].reshape(1, C, 1, 1)
            var = self.buffers["running_var"].reshape(1, C, 1, 1)
            xc = x - mu                                                # (N, C, H, W)
        inv_std = 1.0 / backend.get_array_module(x).sqrt(var + x.dtype.type(self.eps))  # (1, C, 1, 1)
        xhat = xc * inv_std                                            # (N, C, H, W)
        self.cache = (x, xhat, inv_std, self.training)
        return gamma * xhat + beta                                     # (N, C, H, W)

    def _update_running(self, mu, var, M):
        b = self.buffers
        b["num_batches_tracked"][...] += 1                             # stays a 0-d array
        m = self.momentum if self.momentum is not None else 1.0 / float(b["num_batches_tracked"])
        dt = b["running_mean"].dtype.type
        b["running_mean"] = (1 - dt(m)) * b["running_mean"] + dt(m) * mu.astype(b["running_mean"].dtype)
        b["running_var"] = (1 - dt(m)) * b["running_var"] + dt(m) * (var * dt(M / (M - 1))).astype(b["running_var"].dtype)

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward; run forward first")
        x, xhat, inv_std, training = self.cache
        self.check_dout(dout, x.shape, like=x)
        N, C, H, W = x.shape
        M = N * H * W
        gamma = self.params["weight"].reshape(1, C, 1, 1)
        sum_dout = dout.sum(axis=(0, 2, 3), keepdims=True)             # (1, C, 1, 1)
        sum_dout_xhat = (dout * xhat).sum(axis=(0, 2, 3), keepdims=True)  # (1, C, 1, 1)
        self.grads["weight"] = sum_dout_xhat.reshape(C)                # (C,)
        self.grads["bias"] = sum_dout.reshape(C)                       # (C,)
        if not training:
            return dout * (gamma * inv_std)                            # (N, C, H, W)
        scale = gamma * inv_std / x.dtype.type(M)                      # (1, C, 1, 1)
        return scale * (x.dtype.type(M) * dout - sum_dout - xhat * sum_dout_xhat)  # (N, C, H, W)

    def __repr__(self):
        return f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum})"
