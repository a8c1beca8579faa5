"""What the stand-in counts: copies between host and device, synchronisations, kernel launches,
and the bytes of live device arrays. The bottom of the stand-in's imports: it imports none of them."""
from __future__ import annotations

import contextlib

# d2h: device -> host copies (asnumpy, .get(), .item(), float(x), int(x), bool(x), repr ...)
# h2d: host -> device copies (asarray / array of host data, NumPy or list indices)
# sync: explicit synchronisations (Device / Stream .synchronize(), runtime.deviceSynchronize)
# launches: RawKernel launches
stats = {"d2h": 0, "h2d": 0, "sync": 0, "launches": 0}
live_bytes = [0]   # bytes of the live device arrays: the memory pool's used_bytes()


def reset_counters() -> None:
    for k in stats:
        stats[k] = 0


@contextlib.contextmanager
def counting():
    """with counting() as c: ...  -> c holds what happened inside the block."""
    before = dict(stats)
    result: dict = {}
    try:
        yield result
    finally:
        result.update({k: stats[k] - before[k] for k in stats})
