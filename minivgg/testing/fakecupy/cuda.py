"""cupy.cuda for the stand-in: one (or $MINIVGG_FAKECUPY_DEVICES) device of 16 GiB (or
$MINIVGG_FAKECUPY_MEMORY_MB), streams, the memory pool."""
from __future__ import annotations

from . import _state
from ._device import CUDARuntimeError, Device, runtime  # noqa: F401  (cupy.cuda's names)
from ._host_cuda import CompileException  # noqa: F401  (cupy.cuda.compiler.CompileException)


class Stream:
    """cupy.cuda.Stream: work on the stand-in is synchronous, so a stream only counts synchronisations."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self) -> None:
        _state.stats["sync"] += 1

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


Stream.null = Stream(null=True)


def get_current_stream(device_id=-1) -> Stream:
    return Stream.null


class MemoryPool:
    """cupy.get_default_memory_pool(): bytes held by live device arrays."""

    def used_bytes(self) -> int:
        return _state.live_bytes[0]

    def total_bytes(self) -> int:
        return _state.live_bytes[0]

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        pass


_pool = MemoryPool()
