"""Keep freed host memory in the process, so each training step's large arrays reuse the pages of
the step before instead of faulting in fresh ones.

Why it matters. NumPy takes an array's memory from the C library's malloc. glibc's malloc serves
every block above its mmap threshold, which slides up to at most 32 MiB on 64-bit machines, with
an mmap of its own and hands it back to the kernel (munmap) as soon as it is freed. A training
step frees its activations and gradients at the end and asks for the same sizes again in the next
step; each of those arrays above 32 MiB then starts on fresh pages, and the kernel zeroes every
page on its first touch (a page fault per 4 KiB page, or per 2 MiB huge page). On d2l's VGG-11 at
224x224, batch 16, the first layers' maps are 51 MB each (16 x 16 x 224 x 224 float32), forward and
backward, so every step pays for a few hundred MB of zeroed pages: with them kept, that step ran at
1.12x the images/s with im2col-fast and 1.23x with --conv-algo auto on the development machine
(benchmarks/train_speed.py --host-memory both, docs/PERFORMANCE.md). Smaller networks, whose arrays
stay under the threshold, are served from malloc's heap already and do not change (VGG-11 at 32x32:
0.98x, the spread). PyTorch's CPU tensors come from the same malloc: its VGG-11 step at 32x32 ran
1.5x faster with these settings, in the same run.

What keep_freed_memory() does: two settings of glibc's mallopt(3),
    M_MMAP_MAX = 0               serve every block from the heap, none by its own mmap;
    M_TRIM_THRESHOLD = 2**31-1   keep freed memory at the heap's top instead of returning it,
so the next step's arrays land on pages already mapped. The numbers computed do not change (no
arithmetic does); what changes is that the process's resident memory stays near its peak between
steps instead of falling back. It acts on the whole process (every later allocation of NumPy, of
the libraries, of torch), which is why the library never calls it on import: the training command
does (--keep-freed-memory, on by default) and so can a user's script. PyTorch's CPU tuning guide
gets the same effect by preloading jemalloc or tcmalloc; glibc's own environment variables
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... do it before the process starts.

On a C library other than glibc (musl, macOS) nothing is changed and the call returns False.
"""
from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1      # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
KEEP_UP_TO = 2**31 - 1     # bytes of free memory kept at the heap's top (mallopt takes an int)


def _glibc():
    """The process's C library, if it is glibc; else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)       # the C library already loaded into this process
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve large blocks from its heap and keep what is freed (see the
    module docstring). Returns True when both settings took, False where the C library is not
    glibc (and nothing was changed). Calling it again changes nothing more."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
