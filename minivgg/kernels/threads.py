"""The CPU kernels' thread pool: independent slices of one job run on every core.

NumPy works in one thread; it lets go of Python's lock while it does, so work cut
into slices runs on every core. Only work whose slices are independent is split
(copies, per-channel loops, elementwise updates; never a sum across slices), so
the result is the same bit for bit whatever the thread count.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _threads_from_environment() -> int:
    """$MINIVGG_NUM_THREADS, else the cores this process may run on (at most 8)."""
    value = os.environ.get("MINIVGG_NUM_THREADS", "")
    if value.strip():
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"MINIVGG_NUM_THREADS must be a whole number >= 1, got {value!r}")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


_THREADS = _threads_from_environment()
PARALLEL_MIN_BYTES = 2**20     # under 1 MB a thread costs more than it saves
_pool, _pool_size, _pool_pid = None, 0, None


def set_num_threads(n: int) -> None:
    """How many threads minivgg's own CPU kernels use (1: none besides the caller). Default
    $MINIVGG_NUM_THREADS, else one per core (at most 8). NumPy's BLAS keeps its own setting
    (OPENBLAS_NUM_THREADS). Results are the same bit for bit whatever n is."""
    global _THREADS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected a whole number >= 1, got {n!r}")
    _THREADS = n


def get_num_threads() -> int:
    """How many threads minivgg's own CPU kernels use (see set_num_threads)."""
    return _THREADS


def _thread_pool() -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    # first use, a forked child (the parent's threads are not in it), or more threads asked for
    if _pool_pid != os.getpid() or _pool_size < _THREADS - 1:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False)       # its threads finish what they hold, then exit
        _pool_size, _pool_pid = max(1, _THREADS - 1), os.getpid()
        _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="minivgg-cpu")
    return _pool


def run_on_cores(calls) -> None:
    """Run the zero-argument callables on the cores (in order on one core); wait for all.
    Each must write only its own arrays: they run at the same time. The calling thread
    works too: it and _THREADS - 1 helpers each take the next call until none is left."""
    calls = list(calls)
    if _THREADS == 1 or len(calls) < 2:
        for call in calls:
            call()
        return
    todo, lock = iter(calls), threading.Lock()

    def work():
        while True:
            with lock:
                call = next(todo, None)
            if call is None:
                return
            call()
    helpers = [_thread_pool().submit(work) for _ in range(min(_THREADS, len(calls)) - 1)]
    try:
        work()
    finally:
        for f in helpers:
            f.result()


def over_cores(fn, n: int, nbytes: int) -> None:
    """fn(slice) for one consecutive slice of range(n) per core, all at once; a single
    fn(slice(0, n)) when the work touches under PARALLEL_MIN_BYTES."""
    parts = min(_THREADS, n) if nbytes >= PARALLEL_MIN_BYTES else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    run_on_cores([lambda s=slice(a, b): fn(s) for a, b in zip(bounds[:-1], bounds[1:])])


def over_blocks(fn, n: int, bytes_per_item: int, block_bytes: int = 2**21) -> None:
    """fn(slice) for consecutive blocks of range(n), each about block_bytes, on the cores.

    For work that makes several passes over its arrays (max-pool's per-offset
    passes, Adam's ten): on a block of a couple of MB the later passes find it in
    cache instead of reading memory again, and
    blocks on different cores run at once, each core taking the next block when
    it is free.
    """
    per_block = max(1, min(n, block_bytes // max(1, bytes_per_item)))
    run_on_cores([lambda a=a: fn(slice(a, min(a + per_block, n))) for a in range(0, n, per_block)])


def parallel_copyto(dst, src) -> None:
    """np.copyto(dst, src) over the cores, dst and src sliced along their longest axis but
    the last (the last keeps its runs whole; the longest gives each core an even share)."""
    axis = max(range(max(1, dst.ndim - 1)), key=lambda a: dst.shape[a])
    index = (slice(None),) * axis
    over_cores(lambda s: np.copyto(dst[index + (s,)], src[index + (s,)]), dst.shape[axis], dst.nbytes)
