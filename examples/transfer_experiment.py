"""Transfer learning measured on Fashion-MNIST: pretrain on five classes, transfer to the other five.

A small VGG-11-BN (1/8 width, 32x32, a 256-256 head) is pretrained on classes 0-4 (T-shirt,
trouser, pullover, dress, coat), then trained on 100 or 1,000 images of classes 5-9 (sandal,
shirt, sneaker, bag, ankle boot) in three ways, each scored on the 5,000 test images of 5-9:

  scratch    random weights, everything trains
  head       the pretrained convolutional base frozen (all five blocks), a new head trains
  finetune   two phases: the head alone, then the top blocks unfrozen at a lower learning rate

    python3 examples/transfer_experiment.py pretrain                   # once: runs/transfer/pretrain/best.npz
    python3 examples/transfer_experiment.py run --method finetune --images 100
    python3 examples/transfer_experiment.py all                        # every row, then the table

Sized for a shared 2-core CPU (reduced width and epochs): see docs/TRAINING.md for the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as it is
import minivgg  # noqa: E402  (before NumPy's BLAS threads start: see minivgg/__init__.py)

import numpy as np  # noqa: E402

from minivgg.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,  # noqa: E402
                          DataLoader, load_fashion_mnist, prepare_images, transforms)
from minivgg.models import VGG  # noqa: E402
from minivgg.optim import Adam, make_scheduler  # noqa: E402
from minivgg.train import Trainer, evaluate, load_checkpoint  # noqa: E402

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MODEL = dict(arch="vgg11_bn", in_channels=1, width_ratio=8, head="classic", hidden=(256, 256),
             pool_size=1, dropout=0.0, init="xavier")
SIZE = 32
METHODS = ("scratch", "head", "finetune")


def pick(split, classes, n=None, data_dir=None):
    """uint8 (n, 1, 32, 32) images of `classes` (the first n of them) and labels renumbered 0..K-1."""
    images, labels = load_fashion_mnist(split, data_dir=data_dir)
    keep = np.flatnonzero(np.isin(labels, classes))[:n]
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    return prepare_images(images[keep], size=(SIZE, SIZE), channels=1), remap[labels[keep]]


def loaders(train, test, batch_size, seed):
    norm = (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    flip = transforms.RandomHorizontalFlip()
    return (DataLoader(*train, batch_size=batch_size, shuffle=True, seed=seed, transform=flip, normalize=norm),
            DataLoader(*test, batch_size=256, shuffle=False, normalize=norm))


def extra_for(classes):
    """What examples/predict.py needs to use a checkpoint of this experiment."""
    return {"image_size": [SIZE, SIZE], "channels": 1,
            "normalize": {"mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)},
            "class_names": [FASHION_MNIST_CLASSES[c] for c in classes]}


def pretrain(args) -> dict:
    """VGG-11-BN on classes 0-4 (30,000 images, 2,500 held out), Adam + cosine; keeps best.npz."""
    out = Path(args.out) / "pretrain"
    images, labels = pick("train", SOURCE, data_dir=args.data_dir)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    val, train = order[:2500], order[2500:]
    train_loader, val_loader = loaders((images[train], labels[train]), (images[val], labels[val]),
                                       128, args.seed)
    minivgg.seed(args.seed)
    model = VGG(num_classes=len(SOURCE), **MODEL)
    opt = Adam(model, lr=2e-3)
    sched = make_scheduler("cosine", opt, args.pretrain_epochs, len(train_loader))
    t0 = time.perf_counter()
    trainer = Trainer(model, opt, train_loader, val_loader, scheduler=sched, out_dir=out, plots=False,
                      progress=not args.no_progress, skip_input_grad=True, extra=extra_for(SOURCE),
                      class_names=[FASHION_MNIST_CLASSES[c] for c in SOURCE])
    trainer.fit(args.pretrain_epochs)
    seconds = time.perf_counter() - t0
    load_checkpoint(trainer.best_path, model)
    test = pick("test", SOURCE, data_dir=args.data_dir)
    ev = evaluate(model, loaders(test, test, 256, 0)[1])
    result = {"what": "pretrain", "classes": list(SOURCE), "images": len(train), "epochs": args.pretrain_epochs,
              "test_top1": ev["top1"], "test_images": ev["n"], "seconds": seconds,
              "checkpoint": str(trainer.best_path)}
    print(json.dumps(result))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def transfer(args, method, images) -> dict:
    """One row: `images` training images of classes 5-9, scored on their 5,000 test images."""
    from minivgg.train import Unfreeze, freeze_blocks
    out = Path(args.out) / f"{method}-{images}"
    train = pick("train", TARGET, images, args.data_dir)
    test = pick("test", TARGET, data_dir=args.data_dir)
    batch = 32 if images <= 100 else 64
    train_loader, test_loader = loaders(train, test, batch, args.seed)
    epochs = args.epochs or (30 if images <= 100 else 10)
    minivgg.seed(args.seed)
    model = VGG(num_classes=len(TARGET), **MODEL)
    unfreeze = None
    if method != "scratch":   # the pretrained base, a new head
        saved = load_checkpoint(Path(args.out) / "pretrain" / "best.npz")["model"]
        model.features.load_state_dict({k[len("features."):]: v for k, v in saved.items()
                                        if k.startswith("features.")})
        freeze_blocks(model, "all")
    lr = 2e-3 if method == "scratch" else 1e-2 if images <= 100 else 2e-3
    opt = Adam(model, lr=lr)
    steps = len(train_loader)
    sched = make_scheduler("cosine", opt, epochs if method != "finetune" else epochs // 2, steps)
    if method == "finetune":   # the head for half the epochs, then blocks 4-5 at a tenth of the lr
        unfreeze = Unfreeze(epochs // 2, 3, lr / 10, lambda o, n: make_scheduler("cosine", o, n, steps))
    t0 = time.perf_counter()
    trainer = Trainer(model, opt, train_loader, scheduler=sched, out_dir=out, plots=False, progress=False,
                      skip_input_grad=True, extra=extra_for(TARGET), unfreeze=unfreeze,
                      class_names=[FASHION_MNIST_CLASSES[c] for c in TARGET])
    trainer.fit(epochs)
    seconds = time.perf_counter() - t0
    ev = evaluate(model, test_loader)
    result = {"method": method, "images": images, "epochs": epochs, "test_top1": ev["top1"],
              "test_images": ev["n"], "seconds": seconds}
    print(json.dumps(result), flush=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("what", choices=["pretrain", "run", "all"],
                   help="pretrain: the source model; run: one row of the table; all: every row")
    p.add_argument("--out", default="runs/transfer", help="folder for the checkpoints and results")
    p.add_argument("--data-dir", default=None, help="folder with Fashion-MNIST's .gz files")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order, flips and the split")
    p.add_argument("--pretrain-epochs", type=int, default=5, help="epochs of the pretraining run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--method", choices=METHODS, default="finetune", help="run: how the row trains")
    p.add_argument("--images", type=int, default=100, help="run: training images of classes 5-9")
    p.add_argument("--epochs", type=int, default=None, help="run: epochs (default 30 for 100 images, 10 else)")
    args = p.parse_args(argv)
    if args.pretrain_epochs < 1:
        p.error(f"--pretrain-epochs must be >= 1, got {args.pretrain_epochs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.what == "pretrain":
        pretrain(args)
    elif args.what == "run":
        transfer(args, args.method, args.images)
    else:
        rows = [transfer(args, m, n) for n in (100, 1000) for m in METHODS]
        print("| training images | method | test top-1 | seconds |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['images']:,} | {r['method']} | {r['test_top1']:.2%} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
