"""The contract every layer keeps, and the input checks that enforce it.

A layer holds its trainable arrays in ``params`` and their gradients, under the
same keys, in ``grads``. ``forward(x)`` stores in ``self.cache`` exactly what
``backward`` needs; ``backward(dout)`` takes it back with ``self.saved()`` (which
raises if forward has not run), returns dx and **overwrites**
``grads`` (it never accumulates: to sum gradients over micro-batches, add them
up yourself, as ``minivgg.train`` does). Non-trainable state such as
BatchNorm's running statistics lives in ``buffers``.

Frozen layers (``freeze()``) keep their parameters fixed and compute no weight gradients;
``needs_input_grad = False`` tells a layer its caller wants no dL/dx (Conv2d then returns
None). Containers set and honour both (layers/container.py, chain_backward).

Rules: a layer never writes into its arguments and never changes a dtype:
float32 in, float32 out; float64 works for gradient checks.
"""
from __future__ import annotations

import numpy as np

from .. import backend


class Layer:
    """Base class: parameters, train/eval mode, device and dtype moves."""

    needs_input_grad = True       # False: backward may skip dL/dx (Conv2d returns None then)

    def __init__(self):
        self.params: dict = {}    # name -> array, updated in place by optimizers
        self.grads: dict = {}     # same keys as params, written by backward
        self.buffers: dict = {}   # non-trainable state saved with the model
        self.cache = None         # what forward leaves for backward
        self.training = True
        self.frozen = False       # frozen layers keep their params fixed

    # -- the two methods every layer defines ---------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- structure ---------------------------------------------------------------
    def children(self) -> list[tuple[str, "Layer"]]:
        """(name, sub-layer) pairs; containers override this."""
        return []

    def modules(self, prefix: str = ""):
        """Yield (dotted name, layer) for this layer and every descendant."""
        yield prefix, self
        for name, child in self.children():
            yield from child.modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, trainable_only: bool = True):
        """Yield (name, param, grad) triples, e.g. ('features.0.weight', W, dW).

        The grad is None until backward has run. Frozen layers are skipped
        unless ``trainable_only=False``.
        """
        for prefix, m in self.modules():
            if trainable_only and m.frozen:
                continue
            for key, p in m.params.items():
                yield (f"{prefix}.{key}" if prefix else key), p, m.grads.get(key)

    def state_dict(self) -> dict:
        """Every parameter and buffer by dotted name, as torch's state_dict."""
        state = {}
        for prefix, m in self.modules():
            for key, a in list(m.params.items()) + list(m.buffers.items()):
                state[f"{prefix}.{key}" if prefix else key] = a
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into this model; names, shapes must match exactly."""
        own = self.state_dict()
        problem = state_dict_mismatch(own, state)
        if problem:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {problem}")
        for name, target in own.items():  # all checked: now copy
            xp = backend.get_array_module(target)
            target[...] = xp.asarray(backend.to_numpy(state[name]) if xp is np else state[name],
                                     dtype=target.dtype)

    # -- modes ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "Layer":
        for _, m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Layer":
        return self.train(False)

    def freeze(self, frozen: bool = True) -> "Layer":
        """Fix (or release) every parameter below this layer. A frozen layer's backward makes
        no weight gradient, so the ones it had are dropped (no stale gradient survives)."""
        for _, m in self.modules():
            m.frozen = frozen
            if frozen:
                m.grads = {}
        return self

    # -- where and in which precision the parameters live ------------------------
    def to(self, device: str) -> "Layer":
        """Move params, grads and buffers to 'cpu', 'gpu' or 'gpu:N'."""
        for _, m in self.modules():
            for d in (m.params, m.grads, m.buffers):
                for k, a in d.items():
                    if a is not None:
                        d[k] = backend.to_device(a, device)
            m.cache = None
            m.drop_scratch()
        return self

    def astype(self, dtype) -> "Layer":
        """Cast params and floating buffers (float32 for training, float64 for checks)."""
        for _, m in self.modules():
            for d in (m.params, m.buffers):
                for k, a in d.items():
                    if a.dtype.kind == "f":
                        d[k] = a.astype(dtype)
            m.grads = {}
            m.cache = None
            m.drop_scratch()
        return self

    def drop_scratch(self) -> None:
        """Forget memory kept between calls only for speed (none here). `to` and `astype`
        call it, since such memory sits on the old device or in the old dtype; a layer
        that keeps scratch memory overrides it."""

    def zero_grad(self) -> None:
        for _, m in self.modules():
            m.grads = {}

    def num_params(self) -> int:
        return sum(int(p.size) for _, p, _ in self.named_parameters(trainable_only=False))

    # -- helpers for subclasses ------------------------------------------------------
    def check_input(self, x, ndim: int, channels: int | None = None, layout: str = "NCHW"):
        """Reject bad input before any compute: type, dtype, rank, channels, empty batch."""
        if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
            raise TypeError(f"{self!r}: expected a numpy or cupy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise TypeError(f"{self!r}: expected a floating-point input (float32, or float64 for "
                            f"gradient checks), got dtype {x.dtype}; convert with x.astype(np.float32)")
        if x.ndim != ndim:
            raise ValueError(f"{self!r}: expected a {ndim}-D input laid out {layout}, "
                             f"got shape {tuple(x.shape)} ({x.ndim}-D)")
        if x.ndim == 0:
            raise ValueError(f"{self!r}: expected an input with a batch dimension, got a 0-d array")
        if x.shape[0] == 0:
            raise ValueError(f"{self!r}: got an empty batch, shape {tuple(x.shape)}; "
                             "expected at least one sample")
        if channels is not None and x.shape[1] != channels:
            hint = ""
            if ndim == 4 and x.shape[-1] == channels:
                hint = " It looks like NHWC: transpose with x.transpose(0, 3, 1, 2)."
            raise ValueError(f"{self!r}: expected {channels} channels in dim 1 ({layout}), got "
                             f"shape {tuple(x.shape)}.{hint}")
        params = [p for p in self.params.values()]
        self.check_same_device("the input and the parameters", x, *params)
        for p in params:
            if p.dtype != x.dtype:
                raise TypeError(f"{self!r}: input dtype {x.dtype} differs from parameter dtype "
                                f"{p.dtype}; cast the input, or the layer with .astype({x.dtype})")
                # (no silent up-casting: a layer never changes a dtype)

    def saved(self):
        """What forward left in ``self.cache`` for backward: the one guard against calling
        backward before forward (or after ``to``/``astype`` cleared the cache)."""
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward (or after the cache "
                               "was cleared); run forward on this batch first")
        return self.cache

    def check_dout(self, dout, expected_shape, like):
        """Backward's other guard: dout is an array shaped and typed like forward's output."""
        if not hasattr(dout, "shape"):
            raise TypeError(f"{self!r}: dout must be an array, got {type(dout).__name__}")
        self.check_same_device("dout and the forward input", dout, like)
        if tuple(dout.shape) != tuple(expected_shape):
            raise ValueError(f"{self!r}: dout has shape {tuple(dout.shape)}, expected the forward "
                             f"output's shape {tuple(expected_shape)}")
        if dout.dtype != like.dtype:
            raise TypeError(f"{self!r}: dout dtype {dout.dtype} differs from the forward "
                            f"input's dtype {like.dtype}")

    def check_same_device(self, what: str, *arrays):
        """The array module of `arrays`; a TypeError naming this layer if NumPy and CuPy are mixed."""
        try:
            return backend.get_array_module(*arrays)
        except TypeError as e:
            raise TypeError(f"{self!r}: {what} are on different devices; {e}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def state_dict_mismatch(own: dict, state: dict) -> str | None:
    """Why `state` cannot load into the arrays `own` (names, then shapes), or None if it fits."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        return f"missing keys {_first(missing)}, unexpected keys {_first(unexpected)}"
    for name, target in own.items():
        got = tuple(state[name].shape)
        if got != tuple(target.shape):
            return f"'{name}' has shape {got} in the saved weights, the model expects {tuple(target.shape)}"
    return None


def _first(keys: list, n: int = 5) -> str:
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"


def pair(v, name: str = "value") -> tuple[int, int]:
    """3 -> (3, 3); (3, 5) -> (3, 5): PyTorch's int-or-tuple arguments."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t
