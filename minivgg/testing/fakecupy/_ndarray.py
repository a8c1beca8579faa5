"""cupy.ndarray for the stand-in: "device memory" is a NumPy array that NumPy code cannot reach.

Rules kept as CuPy keeps them (cupy/_core/core.pyx): no implicit conversion to NumPy
(`np.asarray(x)`, `x.__array__()`), NumPy arrays refused as operands and as assigned values
(CuPy gh-2079), NumPy scalars and Python numbers accepted, every result a device array (a
reduction gives a 0-d array, not a scalar). What CuPy allocates itself for a computation (an
operator, a ufunc, a reduction, where, clip, concatenate, matmul) is C-contiguous whatever the
inputs' strides (c_order below), where NumPy keeps the inputs' memory order. Stricter than CuPy, because minivgg's rule is
`xp.f(x)`, never `np.f(x)` on device data: NumPy functions and ufuncs called on these arrays
are refused (CuPy would dispatch them through __array_function__). `empty` memory is
poisoned with NaN (or -7777 for integers), so a kernel that leaves an element unwritten shows.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import _state
from ._device import Device

IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")


def unsupported(v) -> TypeError:
    return TypeError(f"Unsupported type {type(v)}")


def unwrap(v):
    """Device array -> its storage; NumPy array -> refused; containers recursively; the rest as is."""
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, np.ndarray):
        raise unsupported(v)
    if isinstance(v, (list, tuple)):
        return type(v)(unwrap(e) for e in v)
    return v


def wrap(r):
    """NumPy result -> device array (scalars become 0-d arrays, as CuPy returns)."""
    if isinstance(r, np.ndarray):
        return ndarray._wrap(r)
    if isinstance(r, np.generic):
        return ndarray._wrap(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(wrap(e) for e in r)
    return r


def c_order(r):
    """A computed result laid out as CuPy allocates it: C-contiguous.

    CuPy's ufuncs and elementwise kernels allocate their outputs with _ndarray_init, C order,
    whatever the inputs' strides (cupy/_core/_kernel.pyx, _get_out_args_from_optionals), and so
    do its reductions (_reduction.pyx), concatenate and stack (_routines_manipulation.pyx) and
    matmul (_routines_linalg.pyx); NumPy keeps the inputs' memory order (order='K'). An `out=`
    array is written as it is laid out, in both. Creation `*_like`, astype and copy(order='K')
    keep the layout in CuPy as in NumPy (cupy/_creation/basic.py, core.pyx _astype), and
    views (transpose, reshape, slicing) are views in both: those pass through NumPy unchanged.
    """
    if isinstance(r, np.ndarray) and not r.flags.c_contiguous:
        return r.copy(order="C")     # a fresh result, never a view of an argument: safe to copy
    if isinstance(r, tuple):
        return tuple(c_order(e) for e in r)
    return r


def poison(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    elif a.dtype.kind in "iu":
        a.fill(-7777 if a.dtype.kind == "i" else 7777 % (np.iinfo(a.dtype).max + 1))
    return a


def _index(key):
    """An index for the storage: device arrays unwrapped; host arrays and lists copied over (CuPy does)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, (np.ndarray, list)):
        _state.stats["h2d"] += 1
        return np.array(key)
    return key


def _binary(name):
    def op(self, other):
        if isinstance(other, ndarray):
            other = other._a
        elif isinstance(other, np.ndarray) or not isinstance(other, (int, float, complex, bool, np.generic)):
            raise unsupported(other)
        result = getattr(self._a, name)(other)
        if result is NotImplemented:
            return result
        if name.startswith("__i"):
            return self                # in place: self's memory, as laid out
        return wrap(c_order(result))
    op.__name__ = name
    return op


def _method(name, computes):
    """ndarray.<name> on the storage; `computes`: CuPy allocates the result (C order, c_order)."""
    def m(self, *args, **kwargs):
        out = kwargs.get("out")
        result = getattr(self._a, name)(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        if isinstance(out, ndarray):
            return out
        return wrap(c_order(result) if computes else result)
    m.__name__ = name
    return m


class _Pointer:
    def __init__(self, a):
        self.ptr = a.ctypes.data


class ndarray:
    """A device array of the stand-in; see the module docstring for its rules."""

    __slots__ = ("_a", "__weakref__")

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("fakecupy.ndarray(memptr=, strides=) is not supported")
        self._a = poison(np.empty(shape, dtype=dtype, order=order))
        _track(self._a)

    @classmethod
    def _wrap(cls, a: np.ndarray) -> "ndarray":
        self = cls.__new__(cls)
        self._a = a
        if a.base is None:
            _track(a)
        return self

    # -- what NumPy may not do with device memory --------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was called on a cupy.ndarray. {IMPLICIT} "
                        f"(minivgg's device code calls xp.{func.__name__}, with xp = get_array_module(x))")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # A NumPy scalar on the left (np.float32(2) * x) reaches here; CuPy computes it on the device.
        # Everything else is a NumPy function called on device data, or a NumPy array mixed in.
        scalars = [i for i in inputs if not isinstance(i, ndarray)]
        for i in scalars:
            if isinstance(i, np.ndarray):
                raise unsupported(i)
        if method == "__call__" and not kwargs and scalars and \
                all(isinstance(i, (int, float, complex, bool, np.generic)) for i in scalars):
            return wrap(c_order(ufunc(*[i._a if isinstance(i, ndarray) else i for i in inputs])))
        raise TypeError(f"numpy.{ufunc.__name__} was called on a cupy.ndarray. {IMPLICIT} "
                        f"(minivgg's device code calls xp.{ufunc.__name__}, with xp = get_array_module(x))")

    # -- copies to the host (each one counted) ------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        _state.stats["d2h"] += 1
        host = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def item(self):
        _state.stats["d2h"] += 1
        return self._a.item()

    def tolist(self):
        _state.stats["d2h"] += 1
        return self._a.tolist()

    def _scalar(self, convert):
        if self._a.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        _state.stats["d2h"] += 1
        return convert(self._a.reshape(()).item())

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __complex__(self):
        return self._scalar(complex)

    def __bool__(self):
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return self._scalar(bool)

    def __repr__(self):
        _state.stats["d2h"] += 1
        return repr(self._a)

    def __str__(self):
        _state.stats["d2h"] += 1
        return str(self._a)

    def __format__(self, spec):
        _state.stats["d2h"] += 1
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def set(self, arr, stream=None):
        """Copy a host array into this device array (cupy.ndarray.set)."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"Shape or dtype mismatch: {arr.shape} {arr.dtype} vs {self.shape} {self.dtype}")
        _state.stats["h2d"] += 1
        self._a[...] = arr

    # -- metadata (no transfer) -------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _Pointer(self._a))
    T = property(lambda self: wrap(self._a.T))

    @property
    def device(self):
        return Device(0)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (wrap(self._a[i]) for i in range(len(self._a)))

    def __getitem__(self, key):
        return wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, ndarray):
            value = value._a
        elif not isinstance(value, (int, float, complex, bool, np.generic)):
            raise unsupported(value)   # CuPy refuses assignment from host arrays (gh-2079)
        self._a[_index(key)] = value

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return wrap(self._a.reshape(shape, order=order))

    def transpose(self, *axes):
        return wrap(self._a.transpose(*axes))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return wrap(self._a.astype(dtype, order=order, casting=casting or "unsafe", copy=copy))

    def copy(self, order="C"):
        return wrap(self._a.copy(order=order))

    def fill(self, value):
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, np.ndarray):
            raise unsupported(value)
        self._a.fill(value)


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__",
              "__matmul__", "__rmatmul__", "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__",
              "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
              "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
              "__iand__", "__ior__", "__ixor__"):
    setattr(ndarray, _name, _binary(_name))
for _name in ("sum", "mean", "var", "std", "max", "min", "argmax", "argmin", "any", "all", "prod", "cumsum",
              "clip", "dot", "take", "repeat", "nonzero", "round", "__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _name, _method(_name, computes=True))
for _name in ("ravel", "flatten", "squeeze", "swapaxes", "view"):   # views, or C-order copies in both
    setattr(ndarray, _name, _method(_name, computes=False))
ndarray.__hash__ = None


_tracked: dict = {}   # id(storage) -> bytes, while the storage lives


def _track(a: np.ndarray) -> None:
    if id(a) in _tracked:
        return
    _tracked[id(a)] = a.nbytes
    _state.live_bytes[0] += a.nbytes
    weakref.finalize(a, _release, id(a))


def _release(key: int) -> None:
    _state.live_bytes[0] -= _tracked.pop(key, 0)
