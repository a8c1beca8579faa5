"""cupy.cuda's devices for the stand-in: runtime (device count, memory), Device; re-exported by cuda.py.

Below _ndarray (an array names its device) and above _state alone, so the stand-in's imports
run one way: _state -> _device -> _ndarray -> _host_cuda -> cuda -> the package.
"""
from __future__ import annotations

import os

from . import _state


class CUDARuntimeError(RuntimeError):
    pass


class _Runtime:
    """cupy.cuda.runtime: the calls minivgg makes."""

    @staticmethod
    def getDeviceCount() -> int:
        return int(os.environ.get("MINIVGG_FAKECUPY_DEVICES", "1"))

    @staticmethod
    def memGetInfo() -> tuple:
        """(free, total) bytes of the current device, as cudaMemGetInfo: what CuPy's memory pool
        holds, in use or cached for reuse, is not free to the driver."""
        total = int(float(os.environ.get("MINIVGG_FAKECUPY_MEMORY_MB", "16384")) * 2**20)
        return max(0, total - _state.live_bytes[0]), total

    @staticmethod
    def deviceSynchronize() -> None:
        _state.stats["sync"] += 1

    @staticmethod
    def runtimeGetVersion() -> int:
        return 13000

    @staticmethod
    def driverGetVersion() -> int:
        return 13000

    @staticmethod
    def getDeviceProperties(device: int) -> dict:
        Device(device)   # range check
        return {"name": b"fakecupy (CPU stand-in, not a GPU)", "totalGlobalMem": runtime.memGetInfo()[1],
                "major": 0, "minor": 0,
                "multiProcessorCount": 0}


runtime = _Runtime()
_current = [0]


class Device:
    """cupy.cuda.Device(i): .use(), .synchronize(), a context manager, .id."""

    def __init__(self, device=None):
        self.id = _current[0] if device is None else int(device)
        if not 0 <= self.id < runtime.getDeviceCount():
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self._prev = None

    def use(self) -> None:
        _current[0] = self.id

    def synchronize(self) -> None:
        _state.stats["sync"] += 1

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple:
        """(free, total) bytes of this device (cupy/cuda/device.pyx: runtime.memGetInfo() with this
        device current; the stand-in's devices are alike)."""
        return runtime.memGetInfo()

    def __enter__(self):
        self._prev = _current[0]
        self.use()
        return self

    def __exit__(self, *exc):
        _current[0] = self._prev

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"
