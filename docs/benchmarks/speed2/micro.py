"""The small measurements behind the 2026-11-23 afternoon changes (docs/PERFORMANCE.md).

    PYTHONPATH=. python docs/benchmarks/speed2/micro.py

Each figure is the median of 9 calls, the variants alternating call by call. Not a
benchmark kept up to date: a record of how the choices were made, runnable again.
  db:    dL/db by dout.sum(axis=(0, 2, 3)) against D @ 1 (GEMV), on VGG-11's conv outputs
  flip:  a VGG-11 conv's forward + backward with dL/dx forced through each of the two paths
  adam:  Adam on VGG-11's parameter shapes, whole arrays against 1 MB blocks (1 and 2 threads)
  conv1: the parts of conv1 3->64 @ 32x32 (batch 64) beside its three GEMMs
"""
import time

import numpy as np

import minivgg.layers.conv as conv_module
from minivgg.kernels import col2im, cpu, im2col
from minivgg.layers import Conv2d
from minivgg.optim import optimizers


def medians(fns: dict, repeats: int = 9) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(t)) for k, t in times.items()}


def show(title: str, ms: dict) -> None:
    print(f"{title:34s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))


def chwn(rng, shape):
    N, C, H, W = shape
    return rng.standard_normal((C, H, W, N), dtype=np.float32).transpose(3, 0, 1, 2)


def db_section(rng):
    for F, H in [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]:
        d = chwn(rng, (64, F, H, H))
        D = d.transpose(1, 2, 3, 0).reshape(F, -1)
        ones = np.ones(D.shape[1], np.float32)
        show(f"db  F={F} {H}x{H}", medians({"sum": lambda: d.sum(axis=(0, 2, 3)), "GEMV": lambda: D @ ones}))


def flip_section(rng):
    original = conv_module.flipped_kernel_applies
    try:
        for C, F, H in [(64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2)]:
            x = chwn(rng, (64, C, H, H))
            layer = Conv2d(C, F, 3, padding=1)
            d = chwn(rng, (64, F, H, H))

            def step(flip):
                conv_module.flipped_kernel_applies = lambda *a: flip
                layer.forward(x)
                layer.backward(d)
            show(f"fwd+bwd {C}->{F} {H}x{H}", medians({"flip": lambda: step(True), "col2im": lambda: step(False)}))
    finally:
        conv_module.flipped_kernel_applies = original


def adam_section(rng):
    shapes = [(64, 1, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3), (512, 256, 3, 3),
              (512, 512, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3), (512, 512), (512, 512), (10, 512)]

    class Holder:                           # the parameter walk Adam needs, nothing else
        def __init__(self):
            self.p = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
            self.g = [rng.standard_normal(s, dtype=np.float32) for s in shapes]

        def named_parameters(self):
            return [(str(i), p, g) for i, (p, g) in enumerate(zip(self.p, self.g))]
    opt = optimizers.Adam(Holder())
    blocked, threads = optimizers.over_blocks, cpu.get_num_threads()

    def run(mode):
        optimizers.over_blocks = (lambda fn, n, *a, **k: fn(slice(0, n))) if mode == "whole" else blocked
        cpu.set_num_threads(1 if mode == "blocks, 1 thread" else threads)
        opt.step()
    try:
        show(f"Adam, {sum(int(np.prod(s)) for s in shapes):,} parameters",
             medians({m: (lambda m=m: run(m)) for m in ("whole", "blocks, 1 thread", f"blocks, {threads} threads")}))
    finally:
        optimizers.over_blocks = blocked
        cpu.set_num_threads(threads)


def conv1_section(rng):
    x = rng.standard_normal((64, 1 * 3, 32, 32), dtype=np.float32)    # the images: NCHW
    layer = Conv2d(3, 64, 3, padding=1)
    d = chwn(rng, (64, 64, 32, 32))
    Wm, b = layer.params["weight"].reshape(64, -1), layer.params["bias"].reshape(1, 64, 1, 1)
    cols = im2col(x, 3, 3, (1, 1), (1, 1))
    D = d.transpose(1, 2, 3, 0).reshape(64, -1)
    out = (Wm @ cols).reshape(64, 32, 32, 64).transpose(3, 0, 1, 2)
    dcols = Wm.T @ D
    ones = np.ones(D.shape[1], np.float32)

    def layer_step():
        layer.forward(x)
        layer.backward(d)

    def bias_add():
        out.__iadd__(b)
    show("conv1 layer and GEMMs", medians({"fwd+bwd": layer_step, "fwd GEMM": lambda: Wm @ cols,
                                           "dW GEMM": lambda: D @ cols.T, "dx GEMM": lambda: Wm.T @ D}))
    show("conv1 passes", medians({"im2col": lambda: im2col(x, 3, 3, (1, 1), (1, 1), out=cols),
                                  "bias add": bias_add, "db GEMV": lambda: D @ ones,
                                  "col2im": lambda: col2im(dcols, x.shape, 3, 3, (1, 1), (1, 1))}))


if __name__ == "__main__":
    from benchmarks import common          # PYTHONPATH=. makes both this and minivgg importable
    print(common.header(common.machine_info("cpu"), f"minivgg threads: {cpu.get_num_threads()}"))
    rng = np.random.default_rng(0)
    for section in (db_section, flip_section, adam_section, conv1_section):
        section(rng)
