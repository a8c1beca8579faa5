"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns from a teacher's
softened probabilities as well as from the labels.

Notation: N batch, K classes, s the student's logits, t the teacher's (N, K), y the labels,
T the temperature, a = alpha. With p = softmax(t / T) and q = softmax(s / T):

    L = a * T^2 * KL(p || q) + (1 - a) * CE(s, y)
    KL(p || q) = (1/N) sum_n sum_k p[n,k] * (log p[n,k] - log q[n,k])     (torch's 'batchmean')

Only q depends on s. d(-sum_k p_k log q_k)/ds_j = (q_j - p_j) / T (the softmax-cross-entropy
gradient, through z = s / T), so

    dL/ds = a * T * (q - p) / N + (1 - a) * (softmax(s) - onehot(y)) / N

The T^2 keeps the soft term's gradient at the same scale as T grows (its gradient shrinks as
1/T^2 for large T, as the paper says). The teacher is a constant: it runs forward in eval
mode, and nothing flows back into it.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .layers.base import Layer
from .losses import SoftmaxCrossEntropy


def _log_softmax(z, xp):
    shifted = z - z.max(axis=1, keepdims=True)                                   # (N, K)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))          # (N, K)


class DistillationLoss:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y); see the module."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        if not temperature > 0:
            raise ValueError(f"DistillationLoss: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"DistillationLoss: alpha must be in [0, 1], got {alpha}")
        self.T, self.alpha = float(temperature), float(alpha)
        self.ce = SoftmaxCrossEntropy()
        self.cache = None

    def __call__(self, student, labels, teacher):
        return self.forward(student, labels, teacher)

    def forward(self, student, labels, teacher):
        ce = self.ce.forward(student, labels)         # checks shapes, dtypes, labels, devices
        if getattr(teacher, "shape", None) != student.shape:
            raise ValueError(f"{self!r}: teacher logits must have the student's shape "
                             f"{tuple(student.shape)}, got {getattr(teacher, 'shape', None)}")
        xp = backend.get_array_module(student, teacher)
        N = student.shape[0]
        T = student.dtype.type(self.T)
        log_p = _log_softmax(teacher.astype(student.dtype, copy=False) / T, xp)  # (N, K) teacher
        log_q = _log_softmax(student / T, xp)                                   # (N, K) student
        p = xp.exp(log_p)
        kl = (p * (log_p - log_q)).sum() / N                                    # ()
        self.cache = (p, xp.exp(log_q))
        a = self.alpha
        return (a * self.T ** 2 * kl + (1 - a) * ce).astype(student.dtype)

    def backward(self, dout=1.0):
        """dL/ds (N, K), times dout."""
        p, q = Layer.saved(self)
        N = p.shape[0]
        f = q.dtype.type                                 # the float type ('d' means gradients)
        ds = (q - p) * f(self.alpha * self.T / N)                               # soft term
        ds += self.ce.backward(f(1 - self.alpha))                               # hard term
        return ds * (f(dout) if np.isscalar(dout) else dout)

    def __repr__(self):
        return f"DistillationLoss(temperature={self.T}, alpha={self.alpha})"
