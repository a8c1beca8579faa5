"""How far is each convolution algorithm from the exact result, on VGG's layers and real data?

Runs real Fashion-MNIST images (padded to 32x32) through a float64 VGG-11-BN (Kaiming init,
train mode, cross-entropy on the true labels) and records every convolution's input x and
upstream gradient dout. Then, layer by layer, computes out, dL/dx and dL/dW in float32 (and
float16) with each algorithm (im2col-fast, winograd2, winograd4) from the float64 layer's
weights, and compares them with the float64 loop convolution (conv2d_naive and its backward),
fed the same inputs rounded to that dtype. Errors are ||a - ref|| / ||ref|| and
max|a - ref| / max|ref|.

    PYTHONPATH=. python benchmarks/winograd_error.py                    # batch 16, float32
    PYTHONPATH=. python benchmarks/winograd_error.py --float16 --batch 8
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    from benchmarks import common
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

import numpy as np  # noqa: E402

from minivgg import backend, random_stream  # noqa: E402
from minivgg.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from minivgg.layers import Conv2d, SoftmaxCrossEntropy, conv2d_naive, conv2d_naive_backward, make_conv2d  # noqa: E402
from minivgg.models import VGG  # noqa: E402

ALGOS = ("im2col-fast", "winograd2", "winograd4")


def record_layers(batch: int, width_ratio: int, seed: int):
    """[(name, conv layer, x, dout)] of a float64 VGG-11-BN's forward and backward on real images."""
    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(labels), batch, replace=False)
    x = np.pad(images[pick].astype(np.float64) / 255.0, ((0, 0), (2, 2), (2, 2)))[:, None]   # (N, 1, 32, 32)
    x = (x - x.mean()) / x.std()
    random_stream.seed(seed)
    model = VGG("vgg11_bn", num_classes=10, in_channels=1, width_ratio=width_ratio, hidden=(256, 256),
                pool_size=1, dropout=0.0, init="kaiming").astype(np.float64)
    seen = []
    for name, m in model.modules():
        if isinstance(m, Conv2d):
            fwd, bwd = m.forward, m.backward
            entry = {"name": name, "layer": m}
            seen.append(entry)

            def forward(a, fwd=fwd, entry=entry):
                entry["x"] = np.array(a)
                return fwd(a)

            def backward(d, bwd=bwd, entry=entry):
                entry["dout"] = np.array(d)
                return bwd(d)
            m.forward, m.backward = forward, backward
    loss = SoftmaxCrossEntropy()
    loss.forward(model.forward(x), labels[pick])
    model.backward(loss.backward())
    return seen


def errors(a, ref) -> tuple[float, float]:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return (float(np.linalg.norm(a - ref) / np.linalg.norm(ref)),
            float(np.abs(a - ref).max() / np.abs(ref).max()))


def measure_layer(entry, dtype) -> dict:
    layer = entry["layer"]
    w64 = backend.to_numpy(layer.params["weight"]).astype(dtype).astype(np.float64)
    b64 = backend.to_numpy(layer.params["bias"]).astype(dtype).astype(np.float64)
    x64 = entry["x"].astype(dtype).astype(np.float64)
    d64 = entry["dout"].astype(dtype).astype(np.float64)
    ref_out = conv2d_naive(x64, w64, b64, padding=1)
    ref_dx, ref_dW, _ = conv2d_naive_backward(x64, w64, d64, padding=1)
    row = {}
    for algo in ALGOS:
        conv = make_conv2d(layer.in_channels, layer.out_channels, 3, padding=1, algo=algo).astype(dtype)
        conv.params["weight"][...] = w64
        conv.params["bias"][...] = b64
        out = conv.forward(x64.astype(dtype))
        dx = conv.backward(d64.astype(dtype))
        row[algo] = {"out": errors(out, ref_out), "dx": errors(dx, ref_dx),
                     "dW": errors(conv.grads["weight"], ref_dW)}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="real test images (default 16)")
    p.add_argument("--width-ratio", type=int, default=1, help="divide VGG-11's widths by this (default 1)")
    p.add_argument("--float16", action="store_true", help="also measure float16 (slow for im2col on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    print(common.header(common.machine_info("cpu")), flush=True)
    print(f"VGG-11-BN (width 1/{args.width_ratio}) on {args.batch} real Fashion-MNIST test images at 32x32, "
          f"Kaiming init, train mode; error = ||a - ref|| / ||ref|| (max: max|a - ref| / max|ref|) "
          f"against the float64 loop convolution on the same rounded inputs\n", flush=True)
    layers = record_layers(args.batch, args.width_ratio, args.seed)
    dtypes = [np.float32] + ([np.float16] if args.float16 else [])
    results = []
    for dtype in dtypes:
        rows = []
        for entry in layers:
            r = measure_layer(entry, dtype)
            x = entry["x"]
            shape = f"{x.shape[0]}x{x.shape[1]}x{x.shape[2]}x{x.shape[3]} -> {entry['layer'].out_channels}"
            results.append({"dtype": np.dtype(dtype).name, "layer": entry["name"], "shape": shape, "errors": r})
            rows.append([entry["name"], shape] +
                        [f"{r[a][q][0]:.1e}" for q in ("out", "dx", "dW") for a in ALGOS])
        short = {"im2col-fast": "im2col", "winograd2": "F2", "winograd4": "F4"}
        heads = ["layer", "shape"] + [f"{q} {short[a]}" for q in ("out", "dx", "dW") for a in ALGOS]
        print(f"{np.dtype(dtype).name}: relative error ||a - ref|| / ||ref|| (F2, F4: winograd2, winograd4)")
        print(common.table(heads, rows))
        for a in ALGOS:
            worst = {q: max(r["errors"][a][q][0] for r in results if r["dtype"] == np.dtype(dtype).name)
                     for q in ("out", "dx", "dW")}
            worst_max = max(r["errors"][a][q][1] for r in results if r["dtype"] == np.dtype(dtype).name
                            for q in ("out", "dx", "dW"))
            print(f"  {a:12s} worst relative error: out {worst['out']:.1e}, dx {worst['dx']:.1e}, "
                  f"dW {worst['dW']:.1e}; worst max|a - ref| / max|ref| {worst_max:.1e}")
        print(flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "winograd_error", "batch": args.batch,
                                      "width_ratio": args.width_ratio, "results": results})


if __name__ == "__main__":
    main()
