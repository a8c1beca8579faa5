"""Transfer learning the fast way: extract a trained VGG's features once, train only a linear head.

The network without its head (minivgg.models.conv_base.ConvBase, Keras's include_top=False) turns each
image into a vector of C numbers (pooling='avg' or 'max'); a Linear layer with softmax
cross-entropy is then trained on those vectors alone, which takes seconds instead of the
minutes a pass through the whole network costs per epoch. The data is Fashion-MNIST, restricted
to the classes you pick (e.g. the five a network never saw), resized to the checkpoint's input.

    python3 examples/extract_features.py --checkpoint runs/<name>/best.npz --classes 5,6,7,8,9 \\
        --train-images 1000 --test-images 5000
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as it is
import minivgg  # noqa: E402  (before NumPy's BLAS threads start: see minivgg/__init__.py)
from minivgg.data import load_fashion_mnist  # noqa: E402
from minivgg.data.fashion_mnist import DatasetNotFoundError  # noqa: E402
from minivgg.data.folder import prepare_images  # noqa: E402
from minivgg.deploy.predictor import Predictor  # noqa: E402
from minivgg.layers import Linear, SoftmaxCrossEntropy  # noqa: E402
from minivgg.models.conv_base import ConvBase  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="a train_vgg11.py checkpoint (.npz)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                   help="Fashion-MNIST class indices to keep, comma-separated (default: all ten)")
    p.add_argument("--train-images", type=int, default=1000,
                   help="training images for the head, the first ones of the chosen classes")
    p.add_argument("--test-images", type=int, default=2000, help="test images to score the head on")
    p.add_argument("--pooling", choices=["avg", "max"], default="avg",
                   help="how each feature map becomes one number (Keras's pooling=)")
    p.add_argument("--epochs", type=int, default=200, help="full-batch Adam steps on the features")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate for the head")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward while extracting")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initial weights")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST's IDX files are")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while extracting")
    args = p.parse_args(argv)
    try:
        args.classes = [int(c) for c in args.classes.split(",")]
    except ValueError:
        p.error(f"--classes: expected comma-separated integers such as 5,6,7, got {args.classes!r}")
    if not args.classes or len(set(args.classes)) != len(args.classes) or \
            not all(0 <= c <= 9 for c in args.classes):
        p.error(f"--classes: expected distinct Fashion-MNIST classes 0..9, got {args.classes}")
    for name in ("train_images", "test_images", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr: must be positive, got {args.lr}")
    return args


def pick(split, classes, n, data_dir):
    """The first n images of `classes` in a split, labels renumbered 0..len(classes)-1."""
    images, labels = load_fashion_mnist(split, data_dir=data_dir)
    keep = np.flatnonzero(np.isin(labels, classes))[:n]
    remap = {c: i for i, c in enumerate(classes)}
    return images[keep], np.array([remap[int(y)] for y in labels[keep]], dtype=np.int64)


def train_head(features, labels, k, epochs, lr, seed):
    """A Linear layer on fixed features, full-batch Adam on softmax cross-entropy."""
    minivgg.seed(seed)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6     # standardise each feature
    head, loss_fn = Linear(features.shape[1], k), SoftmaxCrossEntropy()
    opt = Adam(head, lr=lr)
    x = (features - mean) / std                                          # (n, C)
    for _ in range(epochs):
        loss = loss_fn.forward(head.forward(x), labels)                  # forward, loss
        head.backward(loss_fn.backward())                                # backward
        opt.step()                                                       # step
    return head, mean, std, float(loss)


def main(argv=None):
    args = parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint)
        xtr, ytr = pick("train", args.classes, args.train_images, args.data_dir)
        xte, yte = pick("test", args.classes, args.test_images, args.data_dir)
    except (FileNotFoundError, CheckpointError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = ConvBase(predictor.model, args.pooling)

    def features(images):
        x = predictor.normalize(prepare_images(images, predictor.image_size, predictor.channels,
                                               progress=not args.no_progress))
        return base.extract(x, args.batch_size, progress=not args.no_progress)

    t0 = time.perf_counter()
    ftr, fte = features(xtr), features(xte)
    t1 = time.perf_counter()
    head, mean, std, loss = train_head(ftr, ytr, len(args.classes), args.epochs, args.lr, args.seed)
    t2 = time.perf_counter()
    train_acc = float((head.forward((ftr - mean) / std).argmax(1) == ytr).mean())
    test_acc = float((head.forward((fte - mean) / std).argmax(1) == yte).mean())
    print(f"features: {ftr.shape[1]} per image ({args.pooling} pooling), {len(ftr)} train and "
          f"{len(fte)} test images in {t1 - t0:.1f} s")
    print(f"head: {args.epochs} Adam steps in {t2 - t1:.1f} s, final loss {loss:.4f}")
    print(f"accuracy on classes {args.classes}: train {100 * train_acc:.2f}%, "
          f"test {100 * test_acc:.2f}% ({len(fte)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
