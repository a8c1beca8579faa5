"""How much faster is a training step when the convolutional base is frozen, now that frozen layers
make no weight gradients and nothing below the lowest trainable layer runs backward?

One step = forward, softmax cross-entropy, backward, Adam on the trainable parameters, on a fixed
random batch, for the training command's default network (VGG-11-BN, 1/8 width, 32x32, 256-256
head) or any --width-ratio / --image-size. Variants, timed interleaved (measure_many: every round
times each once, so load from elsewhere lands on all of them alike):

  all trainable          nothing frozen
  base frozen, before    features frozen the old way: the optimizer skips them, but backward still
                         makes every gradient and dL/dx down to the first convolution (BatchNorm in
                         training mode); emulated by freezing the base for the optimizer step only
  base frozen            freeze_blocks(model, 'all'): the head's backward alone
  3 blocks frozen        freeze_blocks(model, 3): blocks 4-5 and the head

Before timing, each variant's trainable gradients are checked against a full backward of the same
model (the skipped work must change no number that is used).

    PYTHONPATH=. python benchmarks/frozen_speed.py
    PYTHONPATH=. python benchmarks/frozen_speed.py --width-ratio 2 --batch 64 --repeats 7
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/frozen_speed.py` without PYTHONPATH=.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

import numpy as np  # noqa: E402

import minivgg  # noqa: E402
from minivgg.losses import SoftmaxCrossEntropy  # noqa: E402
from minivgg.models import VGG  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import freeze_blocks, skip_input_grad  # noqa: E402


def build(args):
    minivgg.seed(args.seed)
    model = VGG("vgg11_bn", num_classes=10, in_channels=1, width_ratio=args.width_ratio, hidden=(256, 256),
                pool_size=1, dropout=0.0)
    skip_input_grad(model)   # the images need no gradient, as in training
    return model


def step_fn(model, x, y, frozen, old_way=False):
    """One training step with the first `frozen` blocks frozen; old_way: every gradient made first."""
    opt, loss_fn = Adam(model, lr=1e-4), SoftmaxCrossEntropy()
    freeze_blocks(model, frozen)

    def step():
        if old_way:
            freeze_blocks(model, 0)                # backward as before: every gradient is made
        model.train()
        logits = model.forward(x)                  # (N, K)
        loss = loss_fn(logits, y)
        model.backward(loss_fn.backward())
        if old_way:
            freeze_blocks(model, frozen)           # ... and the optimizer skips the frozen ones
        opt.step()
        return loss
    return step


def check(args, x, y) -> None:
    """The gradients a frozen variant makes equal a full backward's after the same forward."""
    loss_fn = SoftmaxCrossEntropy()
    for frozen in (5, 3):
        model = build(args)
        freeze_blocks(model, frozen)
        model.train()
        loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        kept = {n: g.copy() for n, _, g in model.named_parameters()}
        loss_fn(model.forward(x), y)               # the same forward (frozen BatchNorm in eval mode) ...
        freeze_blocks(model, 0)                    # ... and a backward that makes every gradient
        model.backward(loss_fn.backward())
        full = {n: g for n, _, g in model.named_parameters()}
        for name, g in kept.items():
            err = common.rel_err(g, full[name])
            if err > 1e-5:
                raise SystemExit(f"check failed: {frozen} frozen blocks, '{name}' differs from the full "
                                 f"backward by {err:.2e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--width-ratio", type=int, default=8, help="divide every conv width by R (8: the CLI's default)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (each times every variant once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure and the machine info here")
    args = p.parse_args(argv)
    info = common.machine_info("cpu")
    print(common.header(info))
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; VGG-11-BN, width 1/"
          f"{args.width_ratio}, {args.image_size}x{args.image_size}, batch {args.batch}, Adam")
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch, 1, args.image_size, args.image_size)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    check(args, x, y)
    print("check: the trainable gradients of each frozen variant equal a full backward's (rel err <= 1e-5)")
    variants = {"all trainable": (0, False), "base frozen, before": (5, True),
                "base frozen": (5, False), "3 blocks frozen": (3, False)}
    fns = {name: step_fn(build(args), x, y, frozen, old) for name, (frozen, old) in variants.items()}
    timings = common.measure_many(fns, repeats=args.repeats, warmup=2)
    base = timings["all trainable"].median
    before = timings["base frozen, before"].median
    rows = [[name, common.fmt_ms(t.median), f"{common.fmt_ms(t.min)}-{common.fmt_ms(t.max)}",
             f"{args.batch / t.median:,.0f}", f"{base / t.median:.2f}x", f"{before / t.median:.2f}x"]
            for name, t in timings.items()]
    print(common.table(["variant", "step (median)", "min-max", "images/s", "vs all trainable",
                        "vs frozen before"], rows))
    result = {"machine": info, "args": vars(args),
              "timings": {name: t.to_dict() for name, t in timings.items()}}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
