"""minivgg: VGG networks from scratch in NumPy and CuPy, every backward pass by hand."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenBLAS, NumPy's BLAS, keeps its idle threads spinning for about 2^28 cycles after every
# matrix product. On the CPU minivgg's own copies and adds come right after a product, split
# over the same cores, and the spinning threads hold those cores (benchmarks/threads_after_gemm.py).
# OPENBLAS_THREAD_TIMEOUT=4 puts them to sleep at once. OpenBLAS reads it once, when NumPy
# loads it, so this works only when minivgg is imported before NumPy, and a value the user set
# (0: OpenBLAS's own default) is kept. docs/PERFORMANCE.md has the measurements.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import backend, layers  # noqa: E402
from .random_stream import seed  # noqa: E402

__all__ = ["backend", "layers", "seed", "__version__"]
