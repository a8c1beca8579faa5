"""The program tests/test_distributed.py starts under mpirun (K ranks) or alone (the 1-process reference).

It trains a tiny VGG-11 (width 1/16, 32x32, 4 classes) with Adam on synthetic images through the
Trainer, and rank 0 saves the final state_dict and history to --out. Flags inject the failures the
tests need (a rank killed, a rank raising, a rank built with different options).

    python tests/distributed_worker.py --out ref.npz                   # one process, batch 16
    mpirun -n 2 python tests/distributed_worker.py --distributed --out dp.npz
    python tests/distributed_worker.py --simulate 2 --bn local --out sim.npz   # per-rank BN, by hand
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivgg import backend, random_stream  # noqa: E402
from minivgg.data import DataLoader, ShardedLoader, shard_bounds  # noqa: E402
from minivgg.models import VGG  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import Trainer  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distributed", action="store_true", help="join the MPI job (rank, world from mpirun)")
    p.add_argument("--device", default="cpu", help="cpu, or gpu (the CuPy stand-in under MINIVGG_FAKE_CUPY=1)")
    p.add_argument("--simulate", type=int, default=0, metavar="K",
                   help="one process plays K ranks with per-rank BatchNorm (K model copies, averaged grads)")
    p.add_argument("--bn", choices=["none", "local", "sync"], default="none",
                   help="no BatchNorm, per-rank BatchNorm, or SyncBatchNorm2d")
    p.add_argument("--eps", type=float, default=1e-8,
                   help="Adam's eps (BN tests raise it: a conv bias before BatchNorm has an exactly zero "
                        "gradient, whose float32 rounding noise Adam at eps 1e-8 would blow up to lr-sized steps)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--n", type=int, default=48, help="training images (3 steps per epoch at batch 16)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--ckpt-dir", default=None, help="write last.npz here (checkpoints on)")
    p.add_argument("--out", required=True, help="rank 0 writes the final weights and history here")
    p.add_argument("--die-rank", type=int, default=None, help="this rank ... ")
    p.add_argument("--die-how", choices=["kill", "raise"], default="kill", help="... is SIGKILLed or raises ...")
    p.add_argument("--die-step", type=int, default=2, help="... at this optimizer step")
    p.add_argument("--mismatch-rank", type=int, default=None, help="this rank builds a wider model")
    return p.parse_args(argv)


def make_data(n, seed=0):
    """Class k images are noise plus a bright k-th quarter of the rows: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 120, (n, 1, 32, 32)).astype(np.uint8)                 # (N, 1, 32, 32)
    for i, k in enumerate(labels):
        images[i, 0, 8 * k:8 * k + 8] += 100
    return images, labels


def make_model(bn, width_ratio=16):
    random_stream.seed(0)
    return VGG("vgg11_bn" if bn != "none" else "vgg11", num_classes=4, in_channels=1, width_ratio=width_ratio,
               head="classic", hidden=(16,), pool_size=1, dropout=0.0, init="kaiming")


def save(path, model, history):
    arrays = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    arrays["history"] = np.array(json.dumps(history))
    np.savez(path, **arrays)


def simulate(args, images, labels):
    """K ranks by hand in one process: K copies of the model, each its shard, gradients averaged."""
    K = args.simulate
    models = [make_model(args.bn) for _ in range(K)]
    opts = [Adam(m, lr=1e-3, eps=args.eps) for m in models]
    loaders = [ShardedLoader(images, labels, args.batch_size, r, K, seed=0, prefetch=0) for r in range(K)]
    from minivgg.losses import SoftmaxCrossEntropy
    loss_fn = SoftmaxCrossEntropy()
    for e in range(args.epochs):
        for batches in zip(*[iter(ld) for ld in loaders]):
            grads, counts = [], []
            for m, (x, y) in zip(models, batches):
                m.train()
                loss_fn(m.forward(x), y)
                m.backward(loss_fn.backward())
                grads.append({n: g.copy() for n, _, g in m.named_parameters()})
                counts.append(len(y))
            mean = {n: sum(c * g[n] for c, g in zip(counts, grads)) / np.float32(sum(counts)) for n in grads[0]}
            for m, opt in zip(models, opts):
                for prefix, layer in m.modules():
                    for k in layer.params:
                        layer.grads[k] = mean[f"{prefix}.{k}" if prefix else k].astype(np.float32)
                opt.step()
    save(args.out, models[0], [])


def main(argv=None) -> int:
    args = parse(argv)
    images, labels = make_data(args.n)
    val = make_data(20, seed=1)
    if args.simulate:
        simulate(args, images, labels)
        return 0
    dist = None
    rank, world = 0, 1
    if args.distributed:
        from minivgg import distributed
        dist = distributed.init(args.device)
        dist.install_excepthook()
        rank, world = dist.rank, dist.world
    try:
        width = 8 if args.mismatch_rank == rank else 16
        device = dist.device if dist is not None else args.device
        model = make_model(args.bn, width).to(device)
        if dist is not None:
            dist.check_same({"model": model.config, "batch_size": args.batch_size, "n": args.n})
            if args.bn == "sync":
                from minivgg.layers.sync_norm import convert_sync_batchnorm
                convert_sync_batchnorm(model, dist.engine)
            dist.broadcast_model(model)
            train = ShardedLoader(images, labels, args.batch_size, rank, world, seed=0, prefetch=0, device=device)
            a, b = shard_bounds(len(val[1]), rank, world)
            val_loader = DataLoader(val[0][a:b], val[1][a:b], 8, shuffle=False, prefetch=0, device=device)
        else:
            train = DataLoader(images, labels, args.batch_size, seed=0, prefetch=0, device=device)
            val_loader = DataLoader(*val, 8, shuffle=False, prefetch=0, device=device)
        opt = Adam(model, lr=1e-3, eps=args.eps)
        if args.die_rank == rank:
            step, done = opt.step, []

            def dying_step():
                done.append(1)
                if len(done) == args.die_step:
                    if args.die_how == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError(f"injected failure at step {args.die_step}")
                step()
            opt.step = dying_step
        trainer = Trainer(model, opt, train, val_loader=val_loader, out_dir=args.ckpt_dir or Path(args.out).parent / "run",
                          plots=False, progress=False, checkpoints=args.ckpt_dir is not None,
                          max_steps=args.max_steps, distributed=dist, device=device)
        trainer.fit(args.epochs, resume=args.resume)
        if rank == 0:
            save(args.out, model, trainer.history)
    except Exception as e:
        if dist is None:
            raise
        dist.abort(1, f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
