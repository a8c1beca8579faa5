"""Where does one minivgg training step spend its time? Layer by layer, and inside each convolution.

Runs the training step of benchmarks/train_speed.py (forward, softmax cross-entropy, backward,
Adam) on a fixed batch and times, by wrapping the public methods (no change to the library):
  - every layer's forward and backward, summed by kind (Conv2d, BatchNorm2d, MaxPool2d, ReLU,
    Linear, Dropout, ...), and Adam's step;
  - inside the convolutions: the im2col and col2im calls (the names minivgg.layers.conv calls);
  - each convolution's three GEMMs (forward, dW, dx) timed alone on the same shapes, so that
    "conv other" = conv time - im2col - col2im - GEMMs is what the layer adds beyond its copies
    and products: reordering, bias, allocation.
Each figure is the median over --steps timed steps after --warmup.

    PYTHONPATH=. python benchmarks/profile_step.py                      # VGG-11 @ 32x32, batch 64
    PYTHONPATH=. python benchmarks/profile_step.py --batch-norm --json out.json
    PYTHONPATH=. python benchmarks/profile_step.py --model d2l-224 --batch 16
    PYTHONPATH=. python benchmarks/profile_step.py --model d2l-224 --conv-algo auto   # Winograd's transforms too
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/profile_step.py` without PYTHONPATH=.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

import numpy as np  # noqa: E402

from benchmarks import train_speed  # noqa: E402
from minivgg.layers import conv_fast as conv_module  # noqa: E402  (the engine the models build)
from minivgg.layers import conv_winograd  # noqa: E402
from minivgg.layers import CONV_ENGINES, Conv2d  # noqa: E402
from minivgg.layers.conv_engines import DEFAULT_CONV_ENGINE  # noqa: E402
from minivgg.losses import SoftmaxCrossEntropy  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import skip_input_grad  # noqa: E402


class Clock:
    """Seconds accumulated per label during the current step."""

    def __init__(self):
        self.now = collections.defaultdict(float)
        self.steps = collections.defaultdict(list)

    def add(self, label, seconds):
        self.now[label] += seconds

    def end_step(self):
        for k, v in self.now.items():
            self.steps[k].append(v)
        self.now.clear()

    def medians(self):
        return {k: float(np.median(v)) for k, v in self.steps.items()}


def timed(clock, label, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(label, time.perf_counter() - t0)
    return wrapper


def leaf_layers(layer):
    kids = layer.children()
    if not kids or isinstance(layer, Conv2d):
        return [layer]
    return [leaf for _, child in kids for leaf in leaf_layers(child)]


def instrument(model, opt, clock):
    """Wrap every leaf layer's forward/backward, the optimizer step and the conv kernels."""
    for layer in leaf_layers(model):
        kind = "Conv2d" if isinstance(layer, Conv2d) else type(layer).__name__   # any engine
        layer.forward = timed(clock, f"{kind} forward", layer.forward)
        layer.backward = timed(clock, f"{kind} backward", layer.backward)
    opt.step = timed(clock, "Adam step", opt.step)
    for name in ("im2col", "col2im"):
        setattr(conv_module, name, timed(clock, f"conv {name}", getattr(conv_module, name)))
    for name in ("winograd_tiles", "winograd_untile"):   # the Winograd engine's transforms (--conv-algo)
        setattr(conv_winograd, name, timed(clock, f"conv {name}", getattr(conv_winograd, name)))


def conv_gemm_seconds(model, x, repeats: int = 5) -> dict:
    """The three GEMMs of every Conv2d, alone, on the shapes a step gives them:
    forward (F, CKK) @ (CKK, M), dW (F, M) @ (M, CKK), dx (CKK, F) @ (F, M), M = N*OH*OW;
    dx is skipped for a layer that skips its input gradient, as the step does."""
    shapes = []
    h = x
    for layer in leaf_layers(model):
        if isinstance(layer, Conv2d):
            N, C, H, W = h.shape
            (KH, KW), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            OH, OW = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
            shapes.append((layer.out_channels, C * KH * KW, N * OH * OW, layer.needs_input_grad))
        h = layer.forward(h)
    rng = np.random.default_rng(0)
    total = {"forward": 0.0, "dW": 0.0, "dx": 0.0}
    for F, K, M, dx in shapes:
        Wm = rng.standard_normal((F, K), dtype=np.float32)
        cols = rng.standard_normal((K, M), dtype=np.float32)
        D = rng.standard_normal((F, M), dtype=np.float32)
        runs = {"forward": lambda: Wm @ cols, "dW": lambda: D @ cols.T}
        if dx:
            runs["dx"] = lambda: Wm.T @ D
        for part, fn in runs.items():
            total[part] += common.measure(fn, "cpu", repeats=repeats, warmup=1).median
    return total


def profile(config: dict, steps: int, warmup: int, seed: int = 0) -> dict:
    x, y = train_speed.make_batch(config, seed)
    model = train_speed.build_minivgg(config, seed)
    opt, loss_fn = Adam(model, lr=train_speed.LR), SoftmaxCrossEntropy()
    skip_input_grad(model)   # as train_speed's step: the images need no gradient

    def step():              # train_speed.minivgg_step_fn's step, with the optimizer in reach
        loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    clock = Clock()
    for _ in range(warmup):
        step()
    walls = []
    instrument(model, opt, clock)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        clock.end_step()
    med = clock.medians()
    gemm = conv_gemm_seconds(model, x)
    return {"step_seconds": float(np.median(walls)), "parts": med, "conv_gemm_seconds": gemm}


def report(result: dict) -> str:
    parts, gemm = result["parts"], result["conv_gemm_seconds"]
    step = result["step_seconds"]
    conv = parts.get("Conv2d forward", 0) + parts.get("Conv2d backward", 0)
    i2c, c2i = parts.get("conv im2col", 0), parts.get("conv col2im", 0)
    tiles, untile = parts.get("conv winograd_tiles", 0), parts.get("conv winograd_untile", 0)
    g = sum(gemm.values())
    gemm_row = "GEMMs (timed alone: fwd %s, dW %s, dx %s)" % tuple(common.fmt_ms(gemm[k]) for k in ("forward", "dW", "dx"))
    rows = [["whole step", common.fmt_ms(step), "100%"],
            ["Conv2d forward + backward", common.fmt_ms(conv), f"{conv / step:.0%}"],
            ["  of which im2col", common.fmt_ms(i2c), f"{i2c / step:.0%}"],
            ["  of which col2im", common.fmt_ms(c2i), f"{c2i / step:.0%}"]]
    if tiles or untile:   # a Winograd engine: its transforms, then the rest (its a*a GEMMs, copies)
        rest_conv = conv - i2c - c2i - tiles - untile
        rows += [["  of which Winograd tile gathers + transforms", common.fmt_ms(tiles), f"{tiles / step:.0%}"],
                 ["  of which Winograd untiles", common.fmt_ms(untile), f"{untile / step:.0%}"],
                 ["  other (a*a GEMMs, im2col layers' GEMMs, bias, allocation)", common.fmt_ms(rest_conv),
                  f"{rest_conv / step:.0%}"],
                 ["  (for comparison: the im2col " + gemm_row + ")", common.fmt_ms(g), f"{g / step:.0%}"]]
    else:
        rows += [["  of which " + gemm_row, common.fmt_ms(g), f"{g / step:.0%}"],
                 ["  other (reorder, bias, allocation)", common.fmt_ms(conv - i2c - c2i - g),
                  f"{(conv - i2c - c2i - g) / step:.0%}"]]
    kinds = sorted({k.rsplit(" ", 1)[0] for k in parts if not k.startswith(("conv ", "Conv2d", "Adam"))})
    for kind in kinds:
        f, b = parts.get(f"{kind} forward", 0), parts.get(f"{kind} backward", 0)
        rows.append([f"{kind} forward + backward", f"{common.fmt_ms(f)} + {common.fmt_ms(b)}",
                     f"{(f + b) / step:.0%}"])
    rows.append(["Adam step", common.fmt_ms(parts.get("Adam step", 0)), f"{parts.get('Adam step', 0) / step:.0%}"])
    rest = step - sum(v for k, v in parts.items() if not k.startswith("conv "))
    rows.append(["loss and the rest", common.fmt_ms(rest), f"{rest / step:.0%}"])
    return common.table(["part", "median ms per step", "share"], rows, align="lrr")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The step, model and batch are those of benchmarks/train_speed.py.")
    p.add_argument("--model", choices=("vgg11-32", "d2l-224", "quick-start"), default="vgg11-32",
                   help="VGG-11 on 32x32 (default), d2l's VGG-11 (width 1/4) on 224x224, or the quick "
                        "start's VGG-11-BN (width 1/8) on 32x32")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 / 16 / 128)")
    p.add_argument("--batch-norm", action="store_true", help="VGG-11-BN (vgg11-32 only)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; medians are reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--conv-algo", choices=sorted(CONV_ENGINES), default=DEFAULT_CONV_ENGINE,
                   help=f"the convolution engine (default: {DEFAULT_CONV_ENGINE})")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="let glibc keep freed memory as the training command does (minivgg/hostmem.py); for "
                        "the whole process, so run it in a process of its own")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model == "vgg11-32":
        config = train_speed.vgg11_32_config(args.batch or 64, batch_norm=args.batch_norm)
    elif args.model == "d2l-224":
        config = train_speed.d2l_224_config(args.batch or 16)
    else:
        config = train_speed.quick_start_config(args.batch or 128)
    config = train_speed.with_algo(config, args.conv_algo)
    if args.keep_freed_memory:
        from minivgg import hostmem
        print(f"keep freed memory (glibc mallopt): {hostmem.keep_freed_memory()}")
    info = common.machine_info("cpu")
    print(common.header(info))
    print(f"profile: {config['name']}, batch {config['batch']}, median of {args.steps} steps after "
          f"{args.warmup} warm-up", flush=True)
    result = profile(config, args.steps, args.warmup, args.seed)
    print(report(result))
    if args.json:
        common.write_json(args.json, {"benchmark": "profile_step", "config": config, "machine": info,
                                      "steps": args.steps, **result})
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
