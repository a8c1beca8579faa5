"""The random stream: one seed for every number minivgg draws, on the CPU and the GPU.

Weight initialisation, dropout masks and data shuffling all draw from here unless a layer is
handed its own generator. `seed(s)` makes a run repeatable; a checkpoint stores `rng_state()`
and `set_rng_state` puts it back, so a resumed run draws the numbers the uninterrupted one would.
"""
from __future__ import annotations

import numpy as np

from .kernels.gpu import uniform_gpu

# The CPU random generator every layer and data loader draws from, unless it is
# handed its own. `seed()` resets it; checkpoints save and restore its state.
_rng = np.random.default_rng(0)
# The GPU's random numbers come from minivgg's Philox kernel (kernels/kernels.cu): counter-based,
# so the whole state is (seed, offset), the count of numbers drawn so far. Checkpoints store it.
_gpu_stream = {"seed": 0, "offset": 0}


def seed(value: int) -> None:
    """Seed every generator minivgg draws from: NumPy's on the CPU, the Philox stream on the GPU."""
    global _rng
    _rng = np.random.default_rng(value)
    _gpu_stream.update(seed=int(value) % 2**64, offset=0)


def get_rng() -> np.random.Generator:
    """The shared CPU generator (weight init, dropout on the CPU, shuffling)."""
    return _rng


def rng_state() -> dict:
    """Both generators' states, as plain data a checkpoint can store."""
    return {"cpu": _rng.bit_generator.state, "gpu": dict(_gpu_stream)}


def set_rng_state(state: dict) -> None:
    if "bit_generator" in state:   # a checkpoint from before the GPU stream was saved
        state = {"cpu": state, "gpu": {"seed": 0, "offset": 0}}
    _rng.bit_generator.state = state["cpu"]
    _gpu_stream.update(seed=int(state["gpu"]["seed"]), offset=int(state["gpu"]["offset"]))


def random_uniform(xp, shape, dtype):
    """Uniform [0, 1) numbers of `dtype` made on the device of `xp`.

    On the GPU they are drawn on the device (no copy from the host) by minivgg's Philox
    kernel, and the stream's offset advances by their count.
    """
    if xp is np:
        return _rng.random(shape, dtype=np.float32 if dtype == np.float16 else dtype).astype(dtype, copy=False)
    u = uniform_gpu(shape, _gpu_stream["seed"], _gpu_stream["offset"])      # float32
    _gpu_stream["offset"] += int(np.prod(shape, dtype=np.int64))
    return u.astype(dtype, copy=False)
