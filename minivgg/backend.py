"""Where arrays live: the one module in minivgg that imports CuPy.

Layer code never asks "am I on the GPU?". It asks an array which module made
it (``xp = get_array_module(x)``) and calls ``xp.matmul``, ``xp.zeros`` ... so
the same lines run on NumPy (CPU) and CuPy (GPU). This file chooses devices,
and moves arrays between them. The random stream both devices draw from is
minivgg.random_stream; the NCCL lookup lives with data parallelism (minivgg.distributed).
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

if os.environ.get("MINIVGG_FAKE_CUPY") == "1":
    # The test suite's strict CuPy stand-in: the GPU path, its rules and minivgg's own CUDA
    # kernels, run on the CPU (minivgg/testing/fakecupy). Never a GPU, and never silently.
    from .testing import fakecupy as cupy
    _CUPY_IMPORT_ERROR: Exception | None = None
else:
    try:  # CuPy is optional: `pip install minivgg[cuda12]` or `minivgg[cuda13]`.
        import cupy  # type: ignore
        _CUPY_IMPORT_ERROR = None
    except Exception as e:  # ImportError, or a CuPy build that cannot load CUDA
        cupy = None
        _CUPY_IMPORT_ERROR = e

_INSTALL_HINT = ("install CuPy with the extra that matches your NVIDIA driver's CUDA version (nvidia-smi "
                 "prints it): pip install 'minivgg[cuda12]' or pip install 'minivgg[cuda13]'; either brings "
                 "NVRTC, cuBLAS and the CUDA headers, no CUDA toolkit needed")

def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return gpu_count() > 0


def gpu_count() -> int:
    """How many CUDA devices this process sees (after CUDA_VISIBLE_DEVICES); 0 without CuPy or a driver."""
    if cupy is None:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'gpu' or 'cuda' -> ('gpu', 0); 'gpu:1' -> ('gpu', 1)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string like 'cpu', 'gpu' or 'gpu:1', got {device!r}")
    name, colon, index = device.strip().lower().partition(":")
    if name == "cuda":
        name = "gpu"
    if name not in ("cpu", "gpu") or (colon and not index.isdigit()) or (name == "cpu" and colon):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'gpu' or 'gpu:N'")
    return name, int(index or 0)


def get_xp(device: str = "cpu"):
    """The array module for a device: numpy for 'cpu', cupy for 'gpu' / 'gpu:N'.

    Asking for a GPU makes that device current, and fails with a message that
    says what to install when CuPy or a CUDA device is missing.
    """
    name, index = parse_device(device)
    if name == "cpu":
        return np
    if getattr(cupy, "is_fake", False) and not _told_fake:
        _tell_fake()
    if cupy is None:
        raise RuntimeError(f"device {device!r} needs CuPy, which could not be imported "
                           f"({_CUPY_IMPORT_ERROR}); {_INSTALL_HINT}")
    count = 0
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise RuntimeError(f"device {device!r}: CuPy is installed but no CUDA device or driver "
                           f"was found ({e}). Check `nvidia-smi`, or use the device 'cpu'") from e
    if index >= count:
        raise RuntimeError(f"device {device!r}: only {count} CUDA device(s) present "
                           f"(valid: gpu:0 .. gpu:{count - 1})")
    cupy.cuda.Device(index).use()
    return cupy


_told_fake = False


def _tell_fake() -> None:
    global _told_fake
    _told_fake = True
    import warnings
    warnings.warn("minivgg: the GPU backend is the CuPy stand-in (MINIVGG_FAKE_CUPY=1): the device 'gpu' runs "
                  "minivgg's CUDA kernels on the CPU; results are real, speeds are not a GPU's", stacklevel=3)


def is_gpu_array(x) -> bool:
    return cupy is not None and isinstance(x, cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, whichever made the arrays. Mixing the two is an error.

    Arrays that are None are skipped, so a layer can pass an optional bias.
    """
    kinds = {is_gpu_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        names = ", ".join(f"{type(a).__module__}.{type(a).__name__}" for a in arrays if a is not None)
        raise TypeError(f"arrays from different devices in one call ({names}): "
                        "move them to one device first with minivgg.backend.to_device")
    return cupy if kinds == {True} else np


def device_memory(x) -> tuple[int, int]:
    """(free, total) bytes of the GPU that holds x, as cupy.cuda.Device.mem_info reports them."""
    return tuple(int(b) for b in x.device.mem_info)


def out_like(x, dtype=None):
    """`out=` for an elementwise op whose result should be laid out in memory as x is.

    Inside a network feature maps are CHWN in memory (kernels/cpu.py). NumPy's ufuncs lay their
    result out as their input (order 'K'), so on the CPU this is None, NumPy's own default, and
    nothing changes. CuPy's allocate C order whatever the input's strides, so on the GPU it is an
    empty array laid out as x (cupy.empty_like keeps the strides, order 'K'): without it the next
    convolution would copy its input back to CHWN, and its backward dout.
    """
    return cupy.empty_like(x, dtype=dtype) if is_gpu_array(x) else None


def to_device(x, device: str = "cpu"):
    """Copy an array to a device ('cpu', 'gpu', 'gpu:N'); a no-op if it is already there."""
    xp = get_xp(device)
    if xp is np:
        return cupy.asnumpy(x) if is_gpu_array(x) else np.asarray(x)
    _, index = parse_device(device)
    with cupy.cuda.Device(index):
        return cupy.asarray(x)


def to_numpy(x) -> np.ndarray:
    """A NumPy array (on the host) from a NumPy or CuPy array or a Python scalar."""
    return cupy.asnumpy(x) if is_gpu_array(x) else np.asarray(x)


def synchronize(x=None) -> None:
    """Wait for the GPU to finish queued work (for honest timings); no-op on the CPU."""
    if cupy is not None and (x is None or is_gpu_array(x)) and gpu_available():
        cupy.cuda.Device().synchronize()


def device_of(x) -> str:
    """'cpu' or 'gpu:N' for an array."""
    return f"gpu:{x.device.id}" if is_gpu_array(x) else "cpu"


class Scratch:
    """Named work arrays kept from one call to the next, as a layer's engine needs them.

    get(name, shape, like) gives an empty `shape` array of like's kind, device and dtype: a view
    of the memory it gave under that name last time when that memory is large enough, else new
    memory, kept for next time. Why: on the CPU every fresh page of a large array costs a page
    fault, and the kernel zeroes the page before the array is written, so a fresh 50 MB array
    takes about twice as long to fill as a reused one (glibc's malloc gives large freed blocks
    back to the kernel, so a new array of that size starts from fresh pages again). CuPy's memory pool reuses device memory already.
    The arrays are the caller's to overwrite on its next call: nothing it returns may be one.
    Each name grows to the largest shape asked of it, so the memory is bounded by the caller's
    largest working set; clear() lets it go (a model moved to another device or dtype).
    """

    def __init__(self):
        self.buffers = {}   # name -> flat array

    def get(self, name: str, shape: tuple, like, dtype=None):
        dtype = np.dtype(like.dtype if dtype is None else dtype)
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if (buf is None or type(buf) is not type(like) or buf.dtype != dtype or buf.size < n
                or device_of(buf) != device_of(like)):
            xp = get_array_module(like)
            if xp is np:
                buf = np.empty(n, dtype=dtype)
            else:
                with cupy.cuda.Device(like.device.id):
                    buf = cupy.empty(n, dtype=dtype)
            self.buffers[name] = buf
        return buf[:n].reshape(shape)

    def clear(self) -> None:
        self.buffers = {}


_THREAD = threading.local()


def shared_scratch() -> Scratch:
    """This thread's Scratch for work arrays that live only inside one call (a forward or a
    backward): the layers of a network run one at a time, so they can all use the same memory,
    and it grows to the largest layer's need instead of the sum of them all. Each thread has
    its own, so two threads' calls never share."""
    if not hasattr(_THREAD, "scratch"):
        _THREAD.scratch = Scratch()
    return _THREAD.scratch
