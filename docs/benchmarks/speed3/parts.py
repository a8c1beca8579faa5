"""conv1's parts (VGG-11 at 32x32, batch 64: 3 -> 64 channels, K = 27, M = 65,536), each timed
alone: the three GEMMs, the passes around them, and the bias trick's versions of the first two.
Medians of 41 calls after 20 untimed ones (the first calls on fresh arrays run 2-4x slower).

    PYTHONPATH=. python docs/benchmarks/speed3/parts.py
"""
import time

import minivgg  # noqa: F401  before NumPy, as the library is meant to be imported
import numpy as np

from minivgg.kernels import col2im, im2col


def ms(fn, warmup=20, repeats=41):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


N, C, H, W, F = 64, 3, 32, 32, 64
rng = np.random.default_rng(0)
x = rng.standard_normal((N, C, H, W), dtype=np.float32)
Wm = rng.standard_normal((F, C * 9), dtype=np.float32)
b = rng.standard_normal(F, dtype=np.float32)
cols = im2col(x, 3, 3, (1, 1), (1, 1))
K, M = cols.shape
y = Wm @ cols
out = y.reshape(F, H, W, N).transpose(3, 0, 1, 2)              # (N, F, OH, OW), CHWN in memory
D = rng.standard_normal((F, M), dtype=np.float32)
ones = np.ones(M, np.float32)
dcols = Wm.T @ D
cols1 = np.empty((K + 1, M), np.float32)
cols1[:K], cols1[K] = cols, 1
Wb = np.empty((F, K + 1), np.float32)


def forward_folded():
    Wb[:, :K], Wb[:, K] = Wm, b
    np.matmul(Wb, cols1, out=y)


parts = {
    "im2col": lambda: im2col(x, 3, 3, (1, 1), (1, 1), out=cols),
    "forward GEMM  Wm @ cols": lambda: np.matmul(Wm, cols, out=y),
    "bias add      out += b": lambda: out.__iadd__(b.reshape(1, F, 1, 1)),
    "forward, folded  [Wm | b] @ [cols; 1]": forward_folded,
    "dW GEMM       D @ cols.T": lambda: D @ cols.T,
    "db GEMV       D @ 1": lambda: D @ ones,
    "dW and db, folded  D @ [cols; 1].T": lambda: D @ cols1.T,
    "dx GEMM       Wm.T @ D": lambda: np.matmul(Wm.T, D, out=dcols),
    "col2im": lambda: col2im(dcols, x.shape, 3, 3, (1, 1), (1, 1)),
}
for name, fn in parts.items():
    print(f"{name:40s} {ms(fn):6.2f} ms")
