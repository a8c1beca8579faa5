"""BatchNorm2d: normalise each channel over the batch and the image, with a plain
reference (batchnorm2d_reference, one equation per line) beside the fused layer."""
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

    Backward (training), sums and means over (N, H, W), inv_std = 1 / sqrt(var + eps):
        dL/dbeta  = sum(dout)
        dL/dgamma = sum(dout * xhat)
        dxhat     = gamma * dout
        dL/dx     = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (mu and var depend on every x, hence the two mean terms; batchnorm2d_reference
    below computes exactly these lines, and tests check the fused code against it.)
    Backward (eval): the statistics are constants, so dL/dx = dout * gamma / sqrt(running_var + eps).
    momentum=None uses a cumulative average, as PyTorch does.
    The (N, C, H, W) results keep x's memory order on CuPy too (out=backend.out_like, see there).
    Frozen (freeze()): eval mode whatever train() says, as Keras's trainable=False: the
    running statistics normalise and stay as they are, gamma and beta make no gradient.
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
        xp = backend.get_array_module(x)
        batch_stats = self.training and not self.frozen    # frozen: eval mode (docstring)
        if batch_stats:
            if M < 2:
                raise ValueError(f"{self!r}: training needs more than one value per channel, got "
                                 f"input shape {tuple(x.shape)}; use a batch of 2 or more, or eval()")
            mu = xp.einsum("nchw->c", x) / x.dtype.type(M)                # (C,)
            xc = xp.subtract(x, mu.reshape(1, C, 1, 1), out=backend.out_like(x))  # (N, C, H, W) x - mu
            var = xp.einsum("nchw,nchw->c", xc, xc) / x.dtype.type(M)      # (C,) biased
            self._update_running(mu, var, M)
        else:
            mu, var = self.buffers["running_mean"], self.buffers["running_var"]
            xc = xp.subtract(x, mu.reshape(1, C, 1, 1), out=backend.out_like(x))  # (N, C, H, W) x - mu
        inv_std = 1.0 / xp.sqrt(var + x.dtype.type(self.eps))              # (C,)
        # out = gamma * xhat + beta, with xhat = xc * inv_std, written into xc's memory
        out = xc
        out *= (self.params["weight"] * inv_std).reshape(1, C, 1, 1)
        out += self.params["bias"].reshape(1, C, 1, 1)                     # (N, C, H, W)
        self.cache = (x, mu, inv_std, batch_stats)     # xhat is recomputed from x in backward
        return out

    def _update_running(self, mu, var, M):
        buf = self.buffers
        buf["num_batches_tracked"][...] += 1                           # stays a 0-d array
        scalar = buf["running_mean"].dtype.type
        m = self._momentum(scalar)
        buf["running_mean"] = (1 - m) * buf["running_mean"] + m * mu.astype(buf["running_mean"].dtype)
        buf["running_var"] = (1 - m) * buf["running_var"] + m * (var * scalar(M / (M - 1))).astype(buf["running_var"].dtype)

    def _momentum(self, scalar):
        """The momentum as a `scalar` (a NumPy scalar type); momentum=None: 1 / num_batches_tracked,
        computed where the counter lives (as a 0-d array on a GPU: no read back to the host)."""
        if self.momentum is not None:
            return scalar(self.momentum)
        return (1.0 / self.buffers["num_batches_tracked"]).astype(scalar)

    def backward(self, dout):
        x, mu, inv_std, training = self.saved()
        self.check_dout(dout, x.shape, like=x)
        N, C, H, W = x.shape
        M = x.dtype.type(N * H * W)
        xp = backend.get_array_module(x)
        gamma = self.params["weight"]                                      # (C,)
        if self.frozen and not training:   # no weight gradient to make: dL/dx alone
            return xp.multiply(dout, (gamma * inv_std).reshape(1, C, 1, 1), out=backend.out_like(dout))  # (N, C, H, W)
        xc = xp.subtract(x, mu.reshape(1, C, 1, 1), out=backend.out_like(x))  # (N, C, H, W) centred first
        sum_dout = xp.einsum("nchw->c", dout)                              # (C,)
        sum_dout_xhat = inv_std * xp.einsum("nchw,nchw->c", dout, xc)      # (C,) = sum(dout * xhat)
        self.grads["weight"] = sum_dout_xhat                               # (C,)
        self.grads["bias"] = sum_dout                                      # (C,)
        if not training:
            return xp.multiply(dout, (gamma * inv_std).reshape(1, C, 1, 1), out=backend.out_like(dout))  # (N, C, H, W)
        # dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = gamma * dout,
        # is per channel a multiple of dout, a multiple of xc and a constant: three passes.
        dout_coef = gamma * inv_std                              # (C,) term dxhat: inv_std*gamma
        xc_coef = -dout_coef * inv_std * sum_dout_xhat / M       # (C,) term xhat*mean(dxhat*xhat), xhat = xc*inv_std
        mean_term = -dout_coef * sum_dout / M                    # (C,) term mean(dxhat)
        dx = xp.multiply(dout, dout_coef.reshape(1, C, 1, 1), out=backend.out_like(dout))  # (N, C, H, W)
        xc *= xc_coef.reshape(1, C, 1, 1)
        dx += xc
        dx += mean_term.reshape(1, C, 1, 1)
        return dx

    def l1_penalty(self, strength: float):
        """Network slimming's sparsity term: adds strength * sum|gamma| to the loss; returns it.

        Call after backward (which overwrites grads). |gamma| has no derivative at 0; its
        subgradient sign(gamma), 0 at 0, is the one used (Liu et al. 2017):
            dL/dgamma += strength * sign(gamma)
        """
        xp = backend.get_array_module(self.params["weight"])
        gamma = self.params["weight"]                                      # (C,)
        self.grads["weight"] = self.grads["weight"] + gamma.dtype.type(strength) * xp.sign(gamma)
        return gamma.dtype.type(strength) * xp.abs(gamma).sum()            # ()

    def __repr__(self):
        return f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum})"


def batchnorm2d_reference(x, gamma, beta, eps=1e-5):
    """Training-mode BatchNorm2d written as its equations, one per line (llm.c's layernorm style).

    x (N, C, H, W), gamma beta (C,) -> (out (N, C, H, W), backward), where
    backward(dout) returns (dx, dgamma, dbeta). Unfused and unoptimised: the
    reference the layer's fused backward is tested equal to.
    """
    xp = backend.get_array_module(x)
    C = x.shape[1]
    axes = (0, 2, 3)                                                       # mean over N, H, W
    g, b = gamma.reshape(1, C, 1, 1), beta.reshape(1, C, 1, 1)             # (1, C, 1, 1)
    mean = x.mean(axis=axes, keepdims=True)                                # (1, C, 1, 1)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)                 # (1, C, 1, 1) biased
    inv_std = 1.0 / xp.sqrt(var + eps)                                     # (1, C, 1, 1)
    xhat = (x - mean) * inv_std                                            # (N, C, H, W)
    out = g * xhat + b                                                     # (N, C, H, W)

    def backward(dout):
        dbeta = dout.sum(axis=axes)                                        # (C,)
        dgamma = (dout * xhat).sum(axis=axes)                              # (C,)
        dxhat = g * dout                                                   # (N, C, H, W)
        dx = inv_std * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                        - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))  # (N, C, H, W)
        return dx, dgamma, dbeta

    return out, backward
