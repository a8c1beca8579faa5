"""Gradient clipping by global norm: one bad batch cannot throw the weights far.

torch.nn.utils.clip_grad_norm_ semantics, on the grads a model's
named_parameters() yields (frozen layers excluded).
"""
from __future__ import annotations

import math

from .. import backend


def clip_grad_norm(model, max_norm, sync: bool = True):
    """Scale all trainable gradients together so their global L2 norm is at most max_norm.

        total = sqrt(sum over grads g of sum(g^2))
        coef  = max_norm / (total + 1e-6);  every g *= coef  when coef < 1

    The grads are scaled in place (the layer's own arrays). Returns `total`,
    the norm before clipping, as a float; a non-finite total (inf or nan) is
    returned and the grads are left as they are, so the caller can skip the step.

    sync=False never reads the norm back to the host: `total` stays a 0-d float64
    array on the grads' device and the scaling is decided there, by multiplying every
    grad by coef clamped to 1 (by exactly 1.0 when the norm is under max_norm or not
    finite), as torch.nn.utils.clip_grad_norm_ does. The Trainer uses it so that a
    GPU step reads one scalar back, not two.
    """
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"clip_grad_norm: max_norm must be >= 0, got {max_norm}")
    grads = [g for _, _, g in model.named_parameters() if g is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(*grads)
    # one device scalar per grad, summed on the device
    sq = sum(xp.vdot(g.ravel(), g.ravel()).astype(xp.float64) for g in grads)
    if sync:
        total = math.sqrt(float(sq))                                # the one read back
        coef = max_norm / (total + 1e-6)
        if math.isfinite(total) and coef < 1.0:
            for g in grads:
                g *= coef
        return total
    total = xp.sqrt(sq)                                             # () float64, on the device
    coef = max_norm / (total + 1e-6)
    coef = xp.where(xp.isfinite(total) & (coef < 1.0), coef, 1.0)  # () float64
    for g in grads:
        g *= coef.astype(g.dtype)
    return total
