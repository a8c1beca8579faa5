"""SoftmaxCrossEntropy: the loss every classifier here trains with.

Notation: N batch, K classes.
"""
from __future__ import annotations

import numpy as np

from . import backend


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    Shapes: logits (N, K), labels (N,) integers in [0, K); loss is a 0-d array.
    With label smoothing eps the target is t = (1 - eps) * onehot + eps / K.
        log p = z - logsumexp(z),   logsumexp(z) = max(z) + log sum exp(z - max(z))
        L     = -(1/N) sum_n sum_k t[n,k] * log p[n,k]
        dL/dz = (softmax(z) - t) / N
    Subtracting max(z) keeps exp() from overflowing: logits of 1e4 stay finite.

    Labels outside [0, K) are an error. On the CPU the check is a ValueError before any
    compute. On the GPU, reading the labels' range back would cost a device-to-host copy
    every step, so the check runs on the device: a batch with a bad label gives a NaN loss
    (as PyTorch's CUDA kernel asserts on the device), and `check_labels` names the label;
    the Trainer calls it when it sees a non-finite loss.
    """

    def __init__(self, label_smoothing=0.0):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"SoftmaxCrossEntropy: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.cache = None

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def _check(self, logits, labels):
        name = repr(self)
        if not hasattr(logits, "ndim") or logits.ndim != 2:
            raise ValueError(f"{name}: expected logits of shape (N, K), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if logits.dtype.kind != "f":
            raise TypeError(f"{name}: logits must be floating point, got dtype {logits.dtype}")
        N, K = logits.shape
        if N == 0:
            raise ValueError(f"{name}: got an empty batch (logits shape {tuple(logits.shape)})")
        if not hasattr(labels, "ndim") or labels.ndim != 1 or labels.shape[0] != N:
            raise ValueError(f"{name}: expected labels of shape ({N},) to match logits {tuple(logits.shape)}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{name}: labels must be integers (class indices in [0, {K})), got dtype "
                            f"{labels.dtype}; convert with labels.astype(np.int64)")
        try:
            backend.get_array_module(logits, labels)
        except TypeError as e:
            raise TypeError(f"{name}: logits and labels are on different devices; {e}") from None
        if backend.get_array_module(labels) is np:
            self.check_labels(labels, K)

    def check_labels(self, labels, num_classes: int) -> None:
        """ValueError unless every label lies in [0, num_classes). Reads device labels back."""
        # NumPy reads label -1 as the last class and CuPy wraps indices, so check by hand.
        labels = backend.to_numpy(labels)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{self!r}: labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                             f"got min {lo}, max {hi}")

    def forward(self, logits, labels):
        self._check(logits, labels)
        xp = backend.get_array_module(logits)
        N, K = logits.shape
        shifted = logits - logits.max(axis=1, keepdims=True)                    # (N, K)
        log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))    # (N, K)
        rows = xp.arange(N)
        eps = self.label_smoothing
        if xp is not np:   # the device-side label check (see the class docstring)
            valid = (labels >= 0) & (labels < K)                                # (N,)
            labels = xp.where(valid, labels, 0)
        nll = -log_p[rows, labels]                                              # (N,)
        if eps > 0:
            nll = (1 - eps) * nll - (eps / K) * log_p.sum(axis=1)
        self.cache = (log_p, labels)
        loss = nll.mean().astype(logits.dtype)                                  # ()
        if xp is not np:
            loss = xp.where(valid.all(), loss, logits.dtype.type(np.nan))       # () NaN if a label is bad
        return loss

    def backward(self, dout=1.0):
        """dL/dlogits (N, K), times dout (the upstream gradient of the loss, usually 1)."""
        if self.cache is None:              # forward must have run on this batch
            raise RuntimeError(f"{self!r}: backward called before forward; run forward on this batch first")
        log_p, labels = self.cache
        xp = backend.get_array_module(log_p)
        N, K = log_p.shape
        eps = self.label_smoothing
        dz = xp.exp(log_p)                                                      # softmax (N, K)
        if eps > 0:
            dz -= log_p.dtype.type(eps / K)
        dz[xp.arange(N), labels] -= log_p.dtype.type(1 - eps)
        dz *= log_p.dtype.type(dout / N) if np.isscalar(dout) else (dout / N)
        return dz

    def __repr__(self):
        return f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing})"
