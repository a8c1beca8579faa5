"""fakecupy: a strict CuPy stand-in, so minivgg's GPU path runs (and is checked) on a CPU.

Switched on by MINIVGG_FAKE_CUPY=1 (minivgg.backend then imports this module as `cupy`;
`.ci/run` sets it). Under it `--device gpu` runs on the CPU with CuPy's rules, so code that
would fail on a GPU fails here:
  * device arrays refuse NumPy (no np.asarray(x), no np.f(x), no NumPy array as an operand or
    an assigned value), with CuPy's errors;
  * only the parts of CuPy that minivgg uses exist, with CuPy's signatures: anything else is
    an AttributeError, never a silent NumPy fallback;
  * kernels are minivgg's own CUDA source (minivgg/kernels/kernels.cu), compiled for the host
    by g++ through a small shim and run as a loop over the grid (_host_cuda.py), with each
    launch's arguments checked the way the CUDA driver reads them;
  * copies between host and device, synchronisations and launches are counted
    (`stats`, `counting()`), so tests can state what one training step costs;
  * `empty` memory is poisoned with NaN, so an element a kernel forgets to write shows;
  * results are laid out as CuPy lays them out: what it computes into memory it allocates
    (operators, ufuncs, reductions, where, clip, concatenate, matmul) is C-contiguous whatever
    the inputs' strides, where NumPy keeps their order; `out=`, `*_like`, astype and views keep
    the layout (_ndarray.c_order says where in CuPy's source each rule is).
What it cannot show: speed, memory limits, races between threads (it runs them one after
another), and NVRTC's own acceptance of the source (tests/test_cuda_compile.py builds it with
the real CuPy's NVRTC path, and tests/test_cuda_kernels.py with nvcc, both without a GPU).
"""
from __future__ import annotations

import numpy as _np

from . import cuda
from ._host_cuda import RawKernel, RawModule  # noqa: F401
from ._ndarray import c_order, ndarray, poison, unwrap, wrap
from ._state import counting, reset_counters, stats  # noqa: F401

__version__ = "0.0-fakecupy"
is_fake = True

# dtypes and constants, as CuPy re-exports them from NumPy
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64, uint8 = _np.int8, _np.int16, _np.int32, _np.int64, _np.uint8
bool_, dtype, newaxis, inf, nan, pi = _np.bool_, _np.dtype, _np.newaxis, _np.inf, _np.nan, _np.pi


def get_default_memory_pool():
    return cuda._pool


# -- moving data (counted) ------------------------------------------------------------------
def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data -> a new device array (one host-to-device copy); device arrays pass through."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    stats["h2d"] += 1
    return wrap(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return wrap(_np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    stats["h2d"] += 1
    return wrap(_np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Device array -> a host NumPy array (one device-to-host copy); anything else: numpy.asarray."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


# -- creation on the device (no copy) -----------------------------------------------------------
def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype, order=order)


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    _device_only(a, "empty_like")
    return wrap(poison(_np.empty_like(a._a, dtype=dtype, order=order, shape=shape)))


def ascontiguousarray(a, dtype=None):
    _device_only(a, "ascontiguousarray")
    return wrap(_np.ascontiguousarray(a._a, dtype=dtype))


def _device_only(a, name):
    if not isinstance(a, ndarray):
        raise TypeError(f"cupy.{name} needs a cupy.ndarray, got {type(a)} (move it with cupy.asarray first)")


def _function(name, computes):
    """cupy.<name> computed by numpy.<name> on the storage: device arrays in, device arrays out.
    `computes`: CuPy allocates the result itself, C-contiguous (see _ndarray.c_order)."""
    f = getattr(_np, name)

    def g(*args, **kwargs):
        out = kwargs.get("out")
        result = f(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        if isinstance(out, ndarray):
            return out                     # written as `out` is laid out, as CuPy does
        return wrap(c_order(result) if computes else result)
    g.__name__ = g.__qualname__ = name
    g.__doc__ = f"cupy.{name} (stand-in: numpy.{name} on device storage)"
    return g


# Computations: CuPy allocates their results C-contiguous (ufuncs, elementwise kernels, reductions,
# where, clip, concatenate/stack, matmul/dot, take/repeat/tile/pad, bincount).
for _name in ("matmul", "dot", "vdot", "exp", "log", "log1p", "expm1", "sqrt", "square", "tanh",
              "maximum", "minimum", "multiply", "divide", "true_divide", "add", "subtract", "negative",
              "abs", "absolute", "sign", "power", "floor", "ceil", "where", "sum", "mean", "prod", "cumsum",
              "amax", "amin", "max", "min", "argmax", "argmin", "all", "any", "count_nonzero", "isfinite",
              "isnan", "isinf", "clip", "concatenate", "stack", "bincount", "take_along_axis", "less",
              "greater", "equal", "not_equal", "logical_and", "logical_or", "logical_not",
              "pad", "take", "repeat", "tile"):
    globals()[_name] = _function(_name, computes=True)
# Creation (C order, or *_like's order='K', as NumPy), views and copyto (into its destination): NumPy's
# layout is CuPy's. einsum is left as NumPy lays it out: minivgg only reduces with it, to 1-D.
for _name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace",
              "einsum", "broadcast_to", "reshape", "transpose", "moveaxis", "copyto", "flip"):
    globals()[_name] = _function(_name, computes=False)
