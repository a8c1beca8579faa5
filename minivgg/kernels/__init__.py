"""One-line dispatchers: the same call runs the NumPy or the CuPy kernel.

Layers call ``im2col(x, ...)``; which implementation runs depends only on
where ``x`` lives. Also holds the im2col workspace limit that bounds the
scratch memory of a convolution (see ``get_workspace_limit``).
"""
from __future__ import annotations

import os

from ..backend import device_memory, is_gpu_array
from .cpu import (col2im_cpu, col2im_naive, im2col_cpu, im2col_naive, maxpool_backward_cpu, maxpool_forward_cpu,
                  out_size, pad_input, winograd_tiles_cpu, winograd_untile_cpu)
from .threads import get_num_threads, set_num_threads

__all__ = ["im2col", "col2im", "winograd_tiles", "winograd_untile", "im2col_naive", "col2im_naive", "maxpool_forward",
           "maxpool_backward", "out_size", "pad_input", "set_workspace_limit", "get_workspace_limit",
           "gpu_workspace_default", "batch_chunks", "set_num_threads", "get_num_threads"]

# Scratch budget of one convolution's columns, in bytes. im2col makes an array
# KH*KW times the input's size; the batch is cut into chunks that fit.
CPU_WORKSPACE_MB = 256.0
GPU_WORKSPACE_FRACTION = 1 / 16   # of the device's total memory
_workspace_limit = None           # bytes; None: each device's default
_gpu_defaults: dict = {}          # device id -> bytes, read from the device once


def set_workspace_limit(megabytes) -> None:
    """Cap the im2col scratch memory of one convolution, on every device; None: back to
    $MINIVGG_WORKSPACE_MB if set, else each device's default (see get_workspace_limit). A
    single sample always gets through, even if its columns alone exceed the cap."""
    global _workspace_limit
    if megabytes is None:
        env = os.environ.get("MINIVGG_WORKSPACE_MB")
        _workspace_limit = None if env is None else int(float(env) * 2**20)
        return
    if megabytes <= 0:
        raise ValueError(f"workspace limit must be positive, got {megabytes} MB")
    _workspace_limit = int(megabytes * 2**20)


def get_workspace_limit(like=None) -> int:
    """The cap, in bytes, for a convolution on like's device (the CPU when None).

    set_workspace_limit(mb) or $MINIVGG_WORKSPACE_MB, when given, holds on every device.
    Otherwise the CPU's is 256 MB (columns that stay in its caches matter more than large
    GEMMs), and a GPU's is 1/16 of its total memory, at least 256 MB (gpu_workspace_default):
    at 256 MB, VGG-16 at 224x224 with batch 128 would run its second layer in 2-image chunks,
    64 small GEMMs and columns rebuilt in backward. Total, not free, memory: what CuPy's pool
    holds changes the free figure from run to run, and with it the chunking and the rounding.
    """
    if _workspace_limit is not None:
        return _workspace_limit
    if like is not None and is_gpu_array(like):
        device = like.device.id
        if device not in _gpu_defaults:
            _gpu_defaults[device] = gpu_workspace_default(device_memory(like)[1])
        return _gpu_defaults[device]
    return int(CPU_WORKSPACE_MB * 2**20)


def gpu_workspace_default(total_bytes: int) -> int:
    """A GPU's default cap for a device of total_bytes memory: 1/16 of it, at least the CPU's."""
    return max(int(CPU_WORKSPACE_MB * 2**20), int(total_bytes * GPU_WORKSPACE_FRACTION))


def batch_chunks(N: int, bytes_per_sample: int, like=None):
    """Split range(N) into consecutive slices whose columns fit the workspace of like's device."""
    per_chunk = max(1, min(N, get_workspace_limit(like) // max(1, bytes_per_sample)))
    return [slice(i, min(i + per_chunk, N)) for i in range(0, N, per_chunk)]


set_workspace_limit(None)


def _gpu():
    from . import gpu  # compiled on first use, only where CuPy is present
    return gpu


def im2col(x, KH, KW, stride, pad, out=None):
    """x (N, C, H, W) -> cols (C*KH*KW, OH*OW*N), written into `out` if given (a contiguous
    array of that shape, reused to spare an allocation)."""
    if is_gpu_array(x):
        return _gpu().im2col_gpu(x, KH, KW, stride, pad, out)
    return im2col_cpu(x, KH, KW, stride, pad, out)


def col2im(cols, x_shape, KH, KW, stride, pad):
    """cols (C*KH*KW, OH*OW*N) -> dx (N, C, H, W), the adjoint of im2col."""
    if is_gpu_array(cols):
        return _gpu().col2im_gpu(cols, x_shape, KH, KW, stride, pad)
    return col2im_cpu(cols, x_shape, KH, KW, stride, pad)


def maxpool_forward(x, KH, KW, stride, pad):
    """x (N, C, H, W) -> (out, argmax), both (N, C, OH, OW)."""
    if is_gpu_array(x):
        return _gpu().maxpool_forward_gpu(x, KH, KW, stride, pad)
    return maxpool_forward_cpu(x, KH, KW, stride, pad)


def maxpool_backward(dout, argmax, x_shape, KH, KW, stride, pad):
    """dout (N, C, OH, OW) -> dx (N, C, H, W)."""
    if is_gpu_array(dout):
        return _gpu().maxpool_backward_gpu(dout, argmax, x_shape, KH, KW, stride, pad)
    return maxpool_backward_cpu(dout, argmax, x_shape, KH, KW, stride, pad)


def winograd_tiles(x, L, step: int, pad: tuple, tiles: tuple, out=None, scratch=None):
    """x (N, C, H, W) -> (k*k, C, TH*TW*N): every q x q tile of the zero-padded x, at a stride
    of `step`, as L d L^T (L (k, q), on x's device; float64 on the GPU). Into `out` when given
    (contiguous, of that shape); the CPU's gather copies into a backend.Scratch when given."""
    if is_gpu_array(x):
        return _gpu().winograd_tiles_gpu(x, L, step, pad, tiles, out)
    return winograd_tiles_cpu(x, L, step, pad, tiles, out, scratch)


def winograd_untile(T, q: int, step: int, pad: tuple, shape: tuple, tiles: tuple, bias=None):
    """T (q*q, C, TH*TW*N) -> (N, C, H, W): the tiles added back onto the map (overlaps sum),
    cropped by `pad`, plus bias (C,) if given; the adjoint of winograd_tiles' gather."""
    if is_gpu_array(T):
        return _gpu().winograd_untile_gpu(T, q, step, pad, shape, tiles, bias)
    return winograd_untile_cpu(T, q, step, pad, shape, tiles, bias)
