"""Prove a backward pass right: compare it with central differences in float64.

The check contracts the layer's output with a fixed random upstream gradient
G, giving a scalar L(x, W) = sum(G * layer(x)). Its exact gradient is what
``backward(G)`` returns; its numerical gradient, one element at a time, is
    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h        (error O(h^2))
and the two are compared as a relative error ||a - n|| / max(||a||, ||n||, tiny).
Each figure also names the worst element (the largest |a - n|: its index, both
values and their own relative error), so a wrong gradient points at itself:
    GradError(3.1e-02; worst at (0, 1, 2, 2): analytic 0.4172, numeric 0.3012, rel 2.8e-01)
"""
from __future__ import annotations

import numpy as np

from . import backend


def relative_error(a, b) -> float:
    """||a - b|| / max(||a||, ||b||): about 1e-10 for a right float64 gradient."""
    a, b = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)
    return float(np.linalg.norm(a - b) / denom)


class GradError(float):
    """A relative error (a float, compared as one) that also carries its worst element.

    .index     index of the element with the largest |analytic - numeric|
    .analytic  .numeric  the two values there;  .element_error  their relative error
    """

    def __new__(cls, analytic, numeric):
        a, n = backend.to_numpy(analytic).astype(np.float64), backend.to_numpy(numeric).astype(np.float64)
        self = super().__new__(cls, relative_error(a, n))
        if a.size:
            flat = int(np.argmax(np.abs(a - n)))
            self.index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
            self.analytic, self.numeric = float(a.flat[flat]), float(n.flat[flat])
        else:
            self.index, self.analytic, self.numeric = (), 0.0, 0.0
        self.element_error = abs(self.analytic - self.numeric) / max(abs(self.analytic), abs(self.numeric), 1e-300)
        return self

    def __repr__(self):
        return (f"GradError({float(self):.1e}; worst at {self.index}: analytic {self.analytic:.6g}, "
                f"numeric {self.numeric:.6g}, rel {self.element_error:.1e})")

    __str__ = __repr__


def numerical_gradient(f, x, h: float = 1e-6):
    """Central-difference gradient of the scalar function f() with respect to x.

    x is perturbed in place, one element at a time, and restored exactly.
    """
    xp = backend.get_array_module(x)
    if not x.flags.c_contiguous:  # reshape would copy, and the perturbations would be lost
        raise ValueError("numerical_gradient needs a C-contiguous array to perturb in place")
    grad = xp.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + h
        f_plus = float(f())
        flat[i] = old - h
        f_minus = float(f())
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2 * h)
    return grad


def check_layer(layer, x, h: float = 1e-6, seed: int = 0) -> dict:
    """Relative errors of a layer's dx and of every parameter gradient.

    The layer and x must be float64 (call ``layer.astype(np.float64)``); the
    layer's mode is kept, so check train and eval separately. Layers that draw
    random numbers (Dropout) must be given a fixed ``seed`` of their own so
    every forward draws the same mask. Returns {'x': err, 'weight': err, ...}
    of GradError (a float that also names its worst element); a container's
    parameters are keyed by dotted name ('0.weight', ...).
    """
    if x.dtype != np.float64:
        raise TypeError(f"check_layer needs a float64 input for precise differences, got {x.dtype}")
    xp = backend.get_array_module(x)
    x = x.copy()
    rng = np.random.default_rng(seed)
    restore = _rng_snapshot(layer)
    out = layer.forward(x)
    G = xp.asarray(rng.standard_normal(out.shape))                        # upstream gradient
    dx = layer.backward(G.copy())
    params = _named_params(layer)                                        # {name: (param, grad)}
    analytic = {"x": dx, **{k: g.copy() for k, (_, g) in params.items()}}
    state = _buffers_snapshot(layer)

    def loss():
        restore()
        _buffers_restore(layer, state)   # BatchNorm must not drift its running stats
        return (G * layer.forward(x)).sum()

    errors = {"x": GradError(analytic["x"], numerical_gradient(loss, x, h))}
    for key, (p, _) in params.items():
        errors[key] = GradError(analytic[key], numerical_gradient(loss, p, h))
    _buffers_restore(layer, state)
    return errors


def check_function(forward, backward, inputs: dict, h: float = 1e-6, seed: int = 0) -> dict:
    """The same check for any forward(**inputs) / backward(G) -> {name: grad} pair."""
    rng = np.random.default_rng(seed)
    out = forward()
    xp = backend.get_array_module(out)
    G = xp.asarray(rng.standard_normal(tuple(getattr(out, "shape", ()))))
    analytic = backward(G)
    return {name: GradError(analytic[name], numerical_gradient(lambda: (G * forward()).sum(), arr, h))
            for name, arr in inputs.items()}


def _named_params(layer) -> dict:
    """Every parameter below the layer (a container's too) with its gradient."""
    if hasattr(layer, "named_parameters"):
        return {name: (p, g) for name, p, g in layer.named_parameters(trainable_only=False)}
    return {k: (p, layer.grads[k]) for k, p in layer.params.items()}


def _rng_snapshot(layer):
    """Dropout draws a new mask per forward unless its own generator is reset."""
    states = [(m, m._rng.bit_generator.state) for _, m in _modules(layer)
              if getattr(m, "_rng", None) is not None]

    def restore():
        for m, s in states:
            m._rng.bit_generator.state = s
    return restore


def _modules(layer):
    return layer.modules() if hasattr(layer, "modules") else [("", layer)]


def _buffers_snapshot(layer):
    return [(m, {k: v.copy() for k, v in m.buffers.items()}) for _, m in _modules(layer)]


def _buffers_restore(layer, state):
    for m, bufs in state:
        m.buffers = {k: v.copy() for k, v in bufs.items()}
