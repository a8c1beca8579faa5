"""Does VGG-16 at 224x224 train with batch 16 on a small machine? Peak memory of real steps.

Runs a few whole training steps (forward, loss, backward, Adam) of torchvision's
VGG-16 (1000 classes, 138M parameters) on random 224x224 images and prints the
peak resident memory of this process, the part the parameters, gradients and
Adam moments must take, and the im2col workspace limit that bounds the rest.

    python benchmarks/vgg16_memory.py                  # batch 16, 2 steps, 256 MB workspace
    python benchmarks/vgg16_memory.py --workspace-mb 64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import numpy as np  # noqa: E402

import minivgg  # noqa: E402
from benchmarks.common import blas_core  # noqa: E402
from minivgg import kernels  # noqa: E402
from minivgg.losses import SoftmaxCrossEntropy  # noqa: E402
from minivgg.models import vgg16, vgg16_bn  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import skip_input_grad  # noqa: E402


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--steps", type=int, default=2, help="training steps to run (default 2)")
    p.add_argument("--image-size", type=int, default=224, help="side of the square input (default 224)")
    p.add_argument("--bn", action="store_true", help="VGG-16-BN instead of VGG-16")
    p.add_argument("--workspace-mb", type=float, default=None,
                   help="im2col workspace limit in MB (default: the library's, 256 MB)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    if args.workspace_mb is not None:
        kernels.set_workspace_limit(args.workspace_mb)

    base = rss_mb("VmRSS")
    minivgg.seed(0)
    model = (vgg16_bn if args.bn else vgg16)(num_classes=1000, init="xavier")
    skip_input_grad(model)
    n_params = model.num_params()
    opt, loss_fn = Adam(model, lr=1e-4), SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.image_size, args.image_size), dtype=np.float32)
    y = rng.integers(0, 1000, args.batch)
    times, losses = [], []
    for step in range(args.steps):
        t = time.perf_counter()
        loss = loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f}, {times[-1]:.1f} s, "
              f"peak RSS so far {rss_mb('VmHWM'):.0f} MiB", flush=True)
    state_mb = 4 * n_params * 4 / 2**20   # float32 weights, grads, Adam's two moments
    figures = {
        "model": "vgg16_bn" if args.bn else "vgg16", "params": n_params, "batch": args.batch,
        "image_size": args.image_size, "steps": args.steps, "step_seconds": times, "losses": losses,
        "workspace_limit_mb": kernels.get_workspace_limit() / 2**20,
        "baseline_rss_mib": base, "peak_rss_mib": rss_mb("VmHWM"),
        "params_grads_adam_mib": state_mb,
        "blas_core": blas_core(),
    }
    print(f"\n{figures['model']}, {n_params:,} parameters, batch {args.batch} at "
          f"{args.image_size}x{args.image_size}, im2col workspace limit "
          f"{figures['workspace_limit_mb']:.0f} MB")
    print(f"peak resident memory: {figures['peak_rss_mib']:.0f} MiB (process, imports included: "
          f"{base:.0f} MiB before the model); weights + grads + Adam moments alone: {state_mb:.0f} MiB")
    median = statistics.median(times)
    print(f"median step: {median:.1f} s ({args.batch / median:.2f} images/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
