"""Train a VGG on Fashion-MNIST (or a folder of images) from the command line, on the CPU or a GPU.

    PYTHONPATH=. python examples/train_vgg11.py                 # laptop defaults: 12 epochs, ~6 min on 2 cores
    PYTHONPATH=. python examples/train_vgg11.py --preset d2l --device gpu
    PYTHONPATH=. python examples/train_vgg11.py --help

Everything a run leaves (checkpoints, history, plots) goes to --out; --resume continues a run
exactly where it stopped. The defaults live in DEFAULTS and PRESETS below: change them there.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

try:  # minivgg before NumPy: it sets OpenBLAS's thread timeout, read when NumPy loads (minivgg/__init__.py)
    import minivgg  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=. or pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import minivgg  # noqa: F401

import numpy as np  # noqa: E402

# The laptop defaults: VGG-11 with BatchNorm at 1/8 width on 32x32 Fashion-MNIST, a small head,
# Adam 2e-3 with cosine decay, random flips, 12 epochs: 91.85% test top-1 in 5 min 44 s on 2 cores
# (README, "Results"). One place to tune them.
DEFAULTS = {
    "device": "cpu", "model": "vgg11", "bn": True, "init": "xavier",
    "dataset": "fashion-mnist", "data_dir": None, "download": True, "image_size": 32, "channels": None,
    "width_ratio": 8, "head": "classic", "hidden": "256,256", "pool_size": 1, "dropout": 0.0,
    "epochs": 12, "batch_size": 128, "accum_steps": 1,
    "optimizer": "adam", "lr": 2e-3, "momentum": 0.9, "weight_decay": 0.0,
    "schedule": "cosine", "warmup": 0.0, "label_smoothing": 0.0, "clip_norm": None,
    "augment": True, "crop_padding": 0, "normalize": True, "seed": 0, "out": None, "resume": None, "init_from": None,
    "freeze_features": False, "patience": None, "max_steps": None, "train_subset": None,
    "val_size": 5000, "test_subset": None, "progress": True, "plots": True,
    "grad_flow": None, "skip_bad_images": False,
    "distributed": False, "sync_bn": False,
    "stream": False,
    "amp": False, "amp_growth_interval": 2000,
    "freeze_blocks": None, "unfreeze_at": None, "unfreeze_blocks": None, "finetune_lr": None,
}

# Named recipes: each overrides DEFAULTS; flags given on the command line override both.
PRESETS = {
    # d2l.ai chapter 8.2 (VGG) as run on its GPU: VGG-11 without BN, 1/4 width, 224x224 inputs,
    # torchvision's head (7x7 pool, 4096-4096, dropout 0.5), Xavier init, plain SGD lr 0.05,
    # batch 128, 10 epochs, no augmentation or normalisation, the test set as validation.
    "d2l": {"model": "vgg11", "bn": False, "init": "xavier", "width_ratio": 4, "image_size": 224,
            "head": "classic", "hidden": "4096,4096", "pool_size": 7, "dropout": 0.5,
            "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "schedule": "none",
            "epochs": 10, "batch_size": 128, "augment": False, "normalize": False, "val_size": 0},
    # The same network and data with Adam (lr 1e-4: VGG without BatchNorm stalls at larger Adam steps).
    "d2l-adam": {"model": "vgg11", "bn": False, "init": "xavier", "width_ratio": 4, "image_size": 224,
                 "head": "classic", "hidden": "4096,4096", "pool_size": 7, "dropout": 0.5,
                 "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "none",
                 "epochs": 10, "batch_size": 128, "augment": False, "normalize": False, "val_size": 0},
}

# Options that describe the data and the network: a resumed run takes them from its checkpoint.
RUN_OPTIONS = ("model", "bn", "init", "dataset", "data_dir", "image_size", "channels", "width_ratio",
               "head", "hidden", "pool_size", "dropout", "optimizer", "momentum", "weight_decay",
               "schedule", "warmup", "label_smoothing", "clip_norm", "augment", "crop_padding", "normalize", "seed",
               "batch_size", "accum_steps", "freeze_features", "train_subset", "val_size", "test_subset",
               "lr", "out", "patience", "sync_bn", "epochs", "skip_bad_images", "stream",
               "amp", "amp_growth_interval", "freeze_blocks", "unfreeze_at", "unfreeze_blocks", "finetune_lr")
# Of those, the ones a resumed run cannot change: the weights, optimizer state, schedule and data split
# in the checkpoint were made with them, so a different typed value is refused (not silently ignored).
FIXED_ON_RESUME = ("model", "bn", "init", "dataset", "image_size", "channels", "width_ratio", "head", "hidden",
                   "pool_size", "dropout", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup",
                   "normalize", "seed", "batch_size", "accum_steps", "freeze_features", "train_subset",
                   "val_size", "freeze_blocks", "unfreeze_at", "unfreeze_blocks", "finetune_lr")

EPILOG = """\
examples:
  # the laptop default: VGG-11-BN, width 1/8, 32x32 Fashion-MNIST, Adam + cosine, 12 epochs
  python examples/train_vgg11.py

  # a 30-second smoke run on 2,000 images
  python examples/train_vgg11.py --train-subset 2000 --test-subset 1000 --epochs 2

  # d2l's run on a GPU (VGG-11, width 1/4, 224x224, SGD lr 0.05, xavier)
  python examples/train_vgg11.py --preset d2l --device gpu --out runs/d2l

  # continue a stopped run to 20 epochs (architecture and data options come from the checkpoint)
  python examples/train_vgg11.py --resume runs/vgg11_bn-fashion-mnist/last.npz --epochs 20

  # your own photos (one sub-folder per class), fine-tuning the head on Fashion-MNIST features
  python examples/train_vgg11.py --dataset folder:photos --image-size 64 --channels 1 \\
      --init-from runs/vgg11_bn-fashion-mnist/best.npz --freeze-features

  # data-parallel on 2 processes (global batch 128 = 2 x 64), BatchNorm statistics over both
  mpirun -n 2 python examples/train_vgg11.py --distributed --sync-bn    # as root: mpirun --allow-run-as-root

  # a folder larger than memory at 224x224: decoded batch by batch by worker threads
  python examples/train_vgg11.py --dataset folder:photos --image-size 224 --stream --width-ratio 4

  # then classify images with the best checkpoint
  python examples/predict.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz shirt.jpg

exit status: 0 done, 2 bad input (options, data, checkpoint), 3 non-finite loss, 4 a file could not be
written or read (the files already there are intact), 130 interrupted.
"""


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def hidden_widths(text) -> tuple[int, ...]:
    """'256,256' -> (256, 256); '' or 'none' or '0' -> ()."""
    text = str(text).strip().lower()
    if text in ("", "none", "0"):
        return ()
    try:
        widths = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 256,256, got {text!r}")
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"hidden widths must be positive, got {text!r}")
    return widths


def make_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The CLI; with suppress=True only options given on the command line appear in the result."""
    p = argparse.ArgumentParser(
        prog="train_vgg11.py", formatter_class=Formatter, epilog=EPILOG,
        argument_default=argparse.SUPPRESS if suppress else None,
        description="Train a VGG (NumPy on the CPU, CuPy on a GPU) with progress bars, evaluation every "
                    "epoch, checkpoints that resume exactly, and plots of the run.")
    D = (lambda key: argparse.SUPPRESS) if suppress else (lambda key: DEFAULTS[key])
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS if suppress else None,
                   help="a named recipe that sets many options at once (flags you give still win): "
                        "d2l = d2l.ai's VGG-11 run (width 1/4, 224x224, SGD lr 0.05, xavier, 10 epochs, "
                        "batch 128); d2l-adam = the same with Adam lr 1e-4")
    g.add_argument("--device", default=D("device"), help="cpu, gpu or gpu:N (a GPU needs CuPy)")
    g.add_argument("--seed", type=int, default=D("seed"),
                   help="seeds weight init, dropout, the validation split, shuffling and augmentation")
    g.add_argument("--out", default=D("out"), metavar="DIR",
                   help="where checkpoints, history and plots go (default: runs/<model>-<dataset>)")
    g.add_argument("--resume", default=D("resume"), metavar="PATH",
                   help="continue from a checkpoint (last.npz), bit-exactly on the CPU: every option the run "
                        "was started with is read from it; a typed --epochs is the new total, and options "
                        "the run cannot change (network, data split, optimizer, --lr ...) are refused")
    g.add_argument("--max-steps", type=int, default=D("max_steps"), metavar="N",
                   help="stop after N optimizer steps in total (smoke tests; a checkpoint is written)")
    g.add_argument("--patience", type=int, default=D("patience"), metavar="N",
                   help="early stopping: stop after N epochs without a better validation accuracy")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=D("progress"),
                   help="show progress bars")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=D("plots"),
                   help="draw PNG plots every epoch")
    g.add_argument("--grad-flow", type=int, nargs="?", const=100, default=D("grad_flow"), metavar="STEPS",
                   help="write grad_flow.png: every layer's weight-gradient norm over the first STEPS "
                        "optimizer steps (100 if no number is given); shows vanishing or exploding gradients")

    g = p.add_argument_group("data parallel (pip install -e '.[mpi]'; start with mpirun -n K)")
    g.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=D("distributed"),
                   help="train one model on the K processes mpirun started: each takes 1/K of every "
                        "--batch-size batch and the gradients are averaged before every step (MPI on the "
                        "CPU, NCCL on GPUs: rank r uses gpu:r of its machine); rank 0 alone writes --out")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=D("sync_bn"),
                   help="with --distributed: BatchNorm statistics over the whole global batch (all ranks), "
                        "instead of each rank's own share")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["vgg11", "vgg13", "vgg16", "vgg19"], default=D("model"),
                   help="VGG depth: 11, 13, 16 or 19 weight layers (configurations A, B, D, E)")
    g.add_argument("--bn", action=argparse.BooleanOptionalAction, default=D("bn"),
                   help="BatchNorm after every convolution (vgg11_bn ...); trains faster and more stably")
    g.add_argument("--width-ratio", type=int, default=D("width_ratio"), metavar="R",
                   help="divide every conv channel count by R (64..512 -> 64/R..512/R); "
                        "R=1 is the paper's VGG, d2l uses 4")
    g.add_argument("--head", choices=["classic", "gap"], default=D("head"),
                   help="classic = adaptive average pool to --pool-size, then Linear layers of --hidden "
                        "widths; gap = global average pool + one Linear")
    g.add_argument("--hidden", type=hidden_widths, default=D("hidden"), metavar="W1,W2",
                   help="widths of the classic head's hidden Linear layers (4096,4096 in the paper; "
                        "'none' for a single Linear)")
    g.add_argument("--pool-size", type=int, default=D("pool_size"), metavar="P",
                   help="the classic head pools the last feature map to PxP (7 as torchvision at "
                        "224x224; 1 suits 32x32 inputs, whose last map is 1x1)")
    g.add_argument("--dropout", type=float, default=D("dropout"), help="dropout after each hidden Linear")
    g.add_argument("--init", choices=["kaiming", "xavier"], default=D("init"),
                   help="weight init: kaiming (torchvision's) or xavier (d2l's)")
    g.add_argument("--init-from", default=D("init_from"), metavar="PATH",
                   help="copy the convolutional weights (features.*) from a minivgg checkpoint before "
                        "training, for fine-tuning; the head starts fresh")
    g.add_argument("--freeze-features", action=argparse.BooleanOptionalAction, default=D("freeze_features"),
                   help="train only the head: the convolutional layers keep their weights")
    g.add_argument("--freeze-blocks", type=int, default=D("freeze_blocks"), metavar="K",
                   help="freeze the first K convolutional blocks (5 = --freeze-features); their BatchNorm runs in eval mode")
    g.add_argument("--unfreeze-at", type=int, default=D("unfreeze_at"), metavar="EPOCH",
                   help="second phase after EPOCH epochs: unfreeze the top --unfreeze-blocks, restart the optimizer")
    g.add_argument("--unfreeze-blocks", type=int, default=D("unfreeze_blocks"), metavar="N",
                   help="with --unfreeze-at: how many of the frozen blocks (the top ones) train (default: all)")
    g.add_argument("--finetune-lr", type=float, default=D("finetune_lr"), metavar="LR",
                   help="with --unfreeze-at: the second phase's peak learning rate (default: --lr / 10)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=D("dataset"), metavar="NAME",
                   help="fashion-mnist, or folder:PATH for a folder with one sub-folder of images per class "
                        "(20%% of it is held out for validation)")
    g.add_argument("--data-dir", default=D("data_dir"), metavar="DIR",
                   help="folder holding the Fashion-MNIST .gz files (searched first; then $MINIVGG_DATA, "
                        "~/.cache/minivgg, /usr/share/datasets/fashion-mnist)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=D("stream"),
                   help="folder: datasets only: decode images batch by batch with worker threads instead of "
                        "loading the folder into memory first (for folders larger than memory); the same batches, "
                        "except that mean/std come from 2,000 sampled training images when there are more")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=D("download"),
                   help="download Fashion-MNIST when it is not found")
    g.add_argument("--image-size", type=int, default=D("image_size"), metavar="S",
                   help="resize images to SxS (at least 32: VGG halves the image 5 times)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=D("channels"),
                   help="1 (gray) or 3 (RGB) input channels (default: 1 for Fashion-MNIST, 3 for a folder)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=D("augment"),
                   help="random horizontal flips and random crops of the training images")
    g.add_argument("--crop-padding", type=int, default=D("crop_padding"), metavar="P",
                   help="with --augment: pad by P pixels, then crop back at random (0 = flips only; "
                        "S/8, e.g. 4 at 32x32, is the usual choice)")
    g.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=D("skip_bad_images"),
                   help="with --dataset folder:PATH, leave out images that cannot be read (each is named in a "
                        "warning) instead of stopping; not with --stream, which reads each image only when its "
                        "batch is built")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=D("normalize"),
                   help="subtract the training set's mean and divide by its std, per channel")
    g.add_argument("--train-subset", type=int, default=D("train_subset"), metavar="N",
                   help="train on only N images (quick runs); validation shrinks to N/10 unless --val-size")
    g.add_argument("--val-size", type=int, default=D("val_size"), metavar="N",
                   help="Fashion-MNIST training images held out for validation (best.npz, early "
                        "stopping); 0 validates on the test set, as d2l does")
    g.add_argument("--test-subset", type=int, default=D("test_subset"), metavar="N",
                   help="evaluate the final model on only N test images")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=D("epochs"), help="total number of epochs")
    g.add_argument("--batch-size", type=int, default=D("batch_size"), help="images per micro-batch")
    g.add_argument("--accum-steps", type=int, default=D("accum_steps"), metavar="K",
                   help="accumulate gradients over K micro-batches per optimizer step "
                        "(an effective batch of K x --batch-size in the memory of one)")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=D("optimizer"),
                   help="adam, adamw (decoupled weight decay) or sgd (with --momentum)")
    g.add_argument("--lr", type=float, default=D("lr"), help="peak learning rate")
    g.add_argument("--momentum", type=float, default=D("momentum"), help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=D("weight_decay"),
                   help="L2 penalty (sgd, adam) or decoupled decay (adamw)")
    g.add_argument("--schedule", choices=["none", "step", "exp", "cosine"], default=D("schedule"),
                   help="learning-rate schedule over the epochs: constant, step (x0.1 every epochs/3), "
                        "exponential (x0.92 per epoch) or cosine to 0")
    g.add_argument("--warmup", type=float, default=D("warmup"), metavar="EPOCHS",
                   help="ramp the learning rate up linearly over this many epochs (fractions allowed)")
    g.add_argument("--label-smoothing", type=float, default=D("label_smoothing"), metavar="EPS",
                   help="train against (1-EPS) one-hot + EPS/K targets")
    g.add_argument("--clip-norm", type=float, default=D("clip_norm"), metavar="C",
                   help="clip the global gradient norm to C before each step")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=D("amp"),
                   help="mixed precision: float16 forward and backward, float32 master weights, optimizer, "
                        "BatchNorm and loss, dynamic loss scaling (minivgg/amp.py); made for GPUs, slower "
                        "on the CPU")
    g.add_argument("--amp-growth-interval", type=int, default=D("amp_growth_interval"), metavar="N",
                   help="with --amp: double the loss scale after N steps without inf/NaN gradients "
                        "(it halves, and the step is skipped, on any)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """defaults < --preset < a resumed checkpoint's options < flags on the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    given = vars(make_parser(suppress=True).parse_args(argv))
    merged = dict(DEFAULTS)
    if args.preset:
        merged.update(PRESETS[args.preset])
    chosen = set(given)
    if args.resume:
        saved = saved_options(args.resume)
        if "init_from" in given:
            raise UsageError("--init-from cannot be used with --resume: the checkpoint holds every weight")
        for k in FIXED_ON_RESUME:
            if k in given and k in saved and _same(k, given[k]) != _same(k, saved[k]):
                raise UsageError(f"--{k.replace('_', '-')} {given[k]!r} cannot change on --resume: the run was "
                                 f"started with {saved[k]!r} (start a new run with --out to change it)")
        merged.update({k: v for k, v in saved.items() if k in RUN_OPTIONS})
        if "given" in saved:   # saved by this version: its options are the values the run used
            chosen |= {k for k in saved if k in RUN_OPTIONS}
    merged.update(given)
    merged["preset"] = args.preset
    merged["given"] = sorted(chosen)         # options typed, or recorded by the resumed run
    merged["hidden"] = _same("hidden", merged["hidden"])
    return argparse.Namespace(**merged)


def _same(key, value):
    """An option's value in one form, whether typed or read back from a checkpoint's JSON."""
    if key == "hidden":
        return tuple(hidden_widths(value) if isinstance(value, str) else value)
    return tuple(value) if isinstance(value, list) else value


def saved_options(path) -> dict:
    from minivgg.train import load_checkpoint
    return load_checkpoint(path)["extra"].get("args", {})


def check_args(args) -> None:
    from minivgg.models import MIN_IMAGE_SIZE
    if args.image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size {args.image_size} is too small: VGG halves the image 5 times, "
                         f"so it needs at least {MIN_IMAGE_SIZE}")
    for name in ("epochs", "batch_size", "accum_steps", "width_ratio", "pool_size", "amp_growth_interval"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "train_subset", "test_subset", "patience"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("val_size", "seed", "crop_padding"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    for name in ("momentum", "weight_decay", "warmup", "label_smoothing", "dropout", "clip_norm"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist or is not a folder")
    if args.dataset != "fashion-mnist" and not args.dataset.startswith("folder:"):
        raise UsageError(f"--dataset must be fashion-mnist or folder:PATH, got {args.dataset!r}")
    if args.stream and not args.dataset.startswith("folder:"):
        raise UsageError("--stream reads image folders only (--dataset folder:PATH); Fashion-MNIST fits in memory")
    if args.stream and args.skip_bad_images:
        raise UsageError("--skip-bad-images reads every image before training, and --stream reads each only when "
                         "its batch is built (an unreadable one then stops the run, named); use one of the two")
    if args.dataset.startswith("folder:") and not args.dataset[len("folder:"):].strip():
        raise UsageError("--dataset folder: needs the folder's path after the colon, e.g. folder:photos")
    if args.dataset.startswith("folder:") and not Path(args.dataset[len("folder:"):]).is_dir():
        # checked here, before --out is made: a missing folder must not leave an empty run folder behind
        raise UsageError(f"--dataset {args.dataset}: {args.dataset[len('folder:'):]} does not exist or is not a "
                         f"folder")


def divergence_advice(e) -> str:
    """The flags that may help after a NonFiniteLossError, from the facts it carries."""
    advice = ["a lower --lr"] + (["--clip-norm"] if e.clipped is False else []) + (
        ["BatchNorm (--bn)"] if e.has_bn is False else [])
    return ", ".join(advice[:-1]) + " or " + advice[-1] if len(advice) > 1 else advice[0]


def check_out(out: Path) -> None:
    """Refuse an --out that cannot be written before the data loads (a file, no permission, ...)."""
    import tempfile
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


# -- data ------------------------------------------------------------------------------------
def load_data(args) -> dict:
    """uint8 (N, C, H, W) train / val / test arrays, class names and normalisation statistics."""
    import warnings
    from minivgg.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, ImageFolder,
                              StreamingImageFolder, compute_mean_std, load_fashion_mnist, prepare_images,
                              sample_mean_std)
    from minivgg.data.folder import UnreadableImagesError
    size = (args.image_size, args.image_size)
    if args.dataset.startswith("folder:"):
        root = args.dataset[len("folder:"):]
        channels = args.channels or 3
        try:
            with warnings.catch_warnings():   # the skipped images are named below, once
                warnings.simplefilter("ignore")
                if args.stream:   # decoded batch by batch: memory holds a few batches, not the folder
                    folder = StreamingImageFolder(root, image_size=size, channels=channels, val_fraction=0.2,
                                                  seed=args.seed)
                else:
                    folder = ImageFolder(root, image_size=size, channels=channels, val_fraction=0.2, seed=args.seed,
                                         skip_bad=args.skip_bad_images)
        except UnreadableImagesError as e:
            raise UsageError(f"{len(e.skipped)} unreadable image(s) in {root} (--skip-bad-images leaves them "
                             "out): " + "; ".join(f"{p} ({why})" for p, why in e.skipped)) from None
        if getattr(folder, "skipped", None):
            print(f"warning: --skip-bad-images left out {len(folder.skipped)} unreadable image(s): "
                  + ", ".join(str(p) for p, _ in folder.skipped), file=sys.stderr)
        if len(folder.val[0]) == 0:
            raise UsageError(f"{root}: too few images to hold any out for validation (need 5 or more per class)")
        train, val = folder.train, folder.val
        if args.train_subset:
            train = (train[0][:args.train_subset], train[1][:args.train_subset])
        test = val if not args.test_subset else (val[0][:args.test_subset], val[1][:args.test_subset])
        names, test_name = list(folder.classes), "validation split"
        mean, std = sample_mean_std(train[0], seed=args.seed) if args.stream else compute_mean_std(train[0])
        flat = [c for c in range(channels) if std[c] == 0]
        if flat and args.normalize:
            raise UsageError(f"channel(s) {flat} of the training images are constant (std 0): normalising "
                             "would divide by zero; pass --no-normalize")
    else:
        channels = args.channels or 1
        images, labels = load_fashion_mnist("train", args.data_dir, download=args.download)
        order = np.random.default_rng(args.seed).permutation(len(images))   # the validation split
        val_size = args.val_size
        if val_size >= len(images):
            raise UsageError(f"--val-size {val_size} leaves no training images: the training set has "
                             f"{len(images):,}")
        if args.train_subset and "val_size" not in args.given:
            val_size = min(val_size, max(args.train_subset // 10, 1)) if val_size else 0
        args.val_size = val_size   # recorded as used, so a resumed run splits the same way
        val_idx, train_idx = order[:val_size], order[val_size:]
        if args.train_subset:
            train_idx = train_idx[:args.train_subset]
        test_images, test_labels = load_fashion_mnist("test", args.data_dir, download=args.download)
        if args.test_subset:
            test_images, test_labels = test_images[:args.test_subset], test_labels[:args.test_subset]
        prep = lambda a: prepare_images(a, size=size, channels=channels)   # noqa: E731
        train = (prep(images[train_idx]), labels[train_idx])
        test = (prep(test_images), test_labels)
        val = (prep(images[val_idx]), labels[val_idx]) if val_size else test
        names, test_name = list(FASHION_MNIST_CLASSES), "test set"
        mean, std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
    if not args.normalize:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return {"train": train, "val": val, "test": test, "classes": names, "channels": channels,
            "test_name": test_name, "mean": tuple(mean), "std": tuple(std)}


def make_loaders(args, data, dist=None):
    """Train / val / test loaders; with `dist`, this rank's shards (training: its part of every batch)."""
    from minivgg.data import DataLoader, ShardedLoader, shard_bounds, transforms
    augment = None
    if args.augment:
        s = args.image_size
        pad = s // 8 if args.crop_padding is None else args.crop_padding
        steps = [transforms.RandomCrop(s, padding=pad)] if pad > 0 else []
        augment = transforms.Compose(steps + [transforms.RandomHorizontalFlip()])
    norm = (data["mean"], data["std"])
    common = dict(batch_size=args.batch_size, normalize=norm, device=args.device)
    if dist is not None:   # data parallel: evaluation sets split in K consecutive parts
        train = ShardedLoader(*data["train"], rank=dist.rank, world=dist.world, shuffle=True, seed=args.seed,
                              transform=augment, **common)
        part = lambda a: tuple(v[slice(*shard_bounds(len(a[1]), dist.rank, dist.world))] for v in a)  # noqa: E731
        return (train, DataLoader(*part(data["val"]), shuffle=False, **common),
                DataLoader(*part(data["test"]), shuffle=False, **common))
    train = DataLoader(*data["train"], shuffle=True, seed=args.seed, transform=augment, **common)
    val = DataLoader(*data["val"], shuffle=False, **common)
    test = DataLoader(*data["test"], shuffle=False, **common)
    return train, val, test


# -- model and optimiser ------------------------------------------------------------------------
def make_model(args, num_classes, channels):
    from minivgg import backend
    from minivgg.models import VGG
    backend.seed(args.seed)
    arch = args.model + ("_bn" if args.bn else "")
    model = VGG(arch, num_classes=num_classes, in_channels=channels, width_ratio=args.width_ratio,
                head=args.head, hidden=args.hidden, pool_size=args.pool_size, dropout=args.dropout,
                init=args.init)
    if args.init_from:
        copy_features(model, args.init_from)
    return model.to(args.device)


def copy_features(model, path) -> None:
    """Fine-tuning: take the convolutional trunk's weights and buffers from another checkpoint."""
    from minivgg.train import load_checkpoint
    saved = load_checkpoint(path)["model"]
    own = model.state_dict()
    keys = [k for k in own if k.startswith("features.")]
    for k in keys:
        if k not in saved or saved[k].shape != own[k].shape:
            got = saved[k].shape if k in saved else "absent"
            raise UsageError(f"--init-from {path}: '{k}' is {got} there, this model needs {own[k].shape} "
                             "(use the same --model, --bn, --width-ratio and --channels)")
    model.features.load_state_dict({k[len("features."):]: saved[k] for k in keys})


def make_optimizer(args, model, steps_per_epoch):
    from minivgg.optim import SGD, Adam, AdamW, make_scheduler
    if args.optimizer == "sgd":
        opt = SGD(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    elif args.optimizer == "adamw":
        opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = Adam(model, lr=args.lr, weight_decay=args.weight_decay)
    sched = make_scheduler(args.schedule, opt, args.epochs, steps_per_epoch, warmup_epochs=args.warmup)
    return opt, sched


def transfer_phases(args, model, steps_per_epoch):
    """--freeze-blocks now, and the Unfreeze of --unfreeze-at (or None)."""
    from minivgg.optim import make_scheduler
    from minivgg.train import Unfreeze, freeze_blocks, frozen_blocks
    if args.freeze_blocks is not None:
        try:
            freeze_blocks(model, args.freeze_blocks)
        except ValueError as e:
            raise UsageError(f"--freeze-blocks {args.freeze_blocks}: {e}") from None
    if args.unfreeze_at is None:
        return None
    k = frozen_blocks(model)
    n = k if args.unfreeze_blocks is None else args.unfreeze_blocks
    if not 1 <= args.unfreeze_at < args.epochs or k == 0 or not 1 <= n <= k:
        raise UsageError(f"--unfreeze-at {args.unfreeze_at} needs frozen blocks (--freeze-blocks or --freeze-features; "
                         f"{k} frozen), 1 <= --unfreeze-at < --epochs {args.epochs} and 1 <= --unfreeze-blocks <= {k}")
    return Unfreeze(args.unfreeze_at, k - n, args.finetune_lr or args.lr / 10,
                    lambda opt, epochs: make_scheduler(args.schedule, opt, epochs, steps_per_epoch))


# -- data parallel --------------------------------------------------------------------------------
def start_distributed(args):
    """Join the MPI job: the rank's device, rank 0 alone prints, draws progress bars and plots."""
    import os
    from minivgg import distributed
    dist = distributed.init(args.device)
    dist.install_excepthook()
    args.device = dist.device
    if not dist.is_root:
        args.progress = args.plots = False
        args.grad_flow = None   # rank 0 records the (all-reduced, so common) gradient norms
        sys.stdout = open(os.devnull, "w")   # errors still reach stderr, prefixed with the rank
    print(f"data parallel: {dist.world} ranks ({dist.engine.name}), global batch {args.batch_size} "
          f"= {dist.world} x ~{args.batch_size / dist.world:g}, BatchNorm statistics "
          f"{'over all ranks (--sync-bn)' if args.sync_bn else 'per rank'}")
    return dist


def join_model(args, dist, model, data, train_loader) -> None:
    """Check every rank was given the same run, then start every copy from rank 0's weights."""
    from minivgg.layers.sync_norm import convert_sync_batchnorm
    per_rank = ("device", "progress", "plots", "grad_flow", "given", "out")
    dist.check_same({"options": {k: v for k, v in vars(args).items() if k not in per_rank},
                     "model": model.config, "training images": len(data["train"][1]),
                     "steps per epoch": len(train_loader), "classes": data["classes"]})
    if args.sync_bn:
        convert_sync_batchnorm(model, dist.engine)
    dist.broadcast_model(model)


# -- the run ------------------------------------------------------------------------------------
def run(args) -> int:
    from minivgg import backend
    from minivgg.amp import LossScaler
    from minivgg.losses import SoftmaxCrossEntropy
    from minivgg.models import draw_architecture, summary
    from minivgg.train import NonFiniteLossError, Trainer, evaluate, freeze_features, load_checkpoint
    from minivgg.train.files import atomic_write_text
    from minivgg.train.plots import GradFlowRecorder, plot_confusion

    check_args(args)
    dist = start_distributed(args) if args.distributed else None
    if args.sync_bn and dist is None:
        print("note: --sync-bn acts only with --distributed (one process: BatchNorm already sees the whole "
              "batch)", file=sys.stderr)
    backend.get_xp(args.device)   # a missing GPU fails here, with what to install
    out = Path(args.out or f"runs/{args.model}{'_bn' if args.bn else ''}-{args.dataset.replace(':', '-').replace('/', '_')}")
    args.out = str(out)
    check_out(out)
    t0 = time.perf_counter()
    data = load_data(args)
    train_loader, val_loader, test_loader = make_loaders(args, data, dist)
    C, S = data["channels"], args.image_size
    print(f"data: {len(data['train'][1]):,} training, {len(data['val'][1]):,} validation"
          f"{' (the test set)' if data['val'] is data['test'] else ''}, {len(data['test'][1]):,} "
          f"{data['test_name']} images, {C}x{S}x{S}, {len(data['classes'])} classes "
          f"({time.perf_counter() - t0:.1f} s)")

    model = make_model(args, len(data["classes"]), C)
    if args.freeze_features:
        freeze_features(model)
    unfreeze = transfer_phases(args, model, max(1, len(train_loader) // args.accum_steps))
    if dist is not None:
        join_model(args, dist, model, data, train_loader)
    print(summary(model, (1, C, S, S), batch_size=args.batch_size))
    opt, sched = make_optimizer(args, model, max(1, len(train_loader) // args.accum_steps))
    extra = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
             "image_size": [S, S], "channels": C,
             "normalize": {"mean": list(data["mean"]), "std": list(data["std"])}}
    trainer = Trainer(model, opt, train_loader, val_loader=val_loader,
                      loss_fn=SoftmaxCrossEntropy(args.label_smoothing), scheduler=sched, out_dir=out,
                      accum_steps=args.accum_steps, clip_norm=args.clip_norm, patience=args.patience,
                      class_names=data["classes"], device=args.device, max_steps=args.max_steps,
                      extra=extra, plots=args.plots, progress=args.progress,
                      skip_input_grad=True,   # the images need no gradient (as in torch)
                      distributed=dist,
                      amp=LossScaler(growth_interval=args.amp_growth_interval) if args.amp else False,
                      unfreeze=unfreeze)
    out.mkdir(parents=True, exist_ok=True)
    if args.plots:
        draw_architecture(model, (C, S, S), out / "architecture.png")
    grad_flow = GradFlowRecorder(opt, args.grad_flow, out / "grad_flow.png") if args.grad_flow else None
    if dist is not None:
        dist.comm.Barrier()   # start the clocks together: rank 0 drew the architecture meanwhile
    try:
        trainer.fit(args.epochs, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"error: {e}. Try {divergence_advice(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume {trainer.last_path} (the last completed epoch)",
              file=sys.stderr)
        return 130
    if grad_flow is not None:
        grad_flow.write()   # a run shorter than --grad-flow steps
    if dist is not None:
        dist.comm.Barrier()   # rank 0 has written best.npz before any rank reads it
    print(f"training stopped: {trainer.stop_reason} after {trainer.epoch} epoch(s), "
          f"{trainer.global_step} steps")
    if trainer.amp is not None:
        scaler = trainer.amp.scaler
        print(f"mixed precision: loss scale {scaler.scale:g}, {scaler.skipped_steps} step(s) skipped "
              "for inf/NaN gradients")

    # the final score: the best checkpoint (by validation accuracy) on the test set
    which = "the final weights"
    if trainer.best_path.exists() and data["val"] is not data["test"]:
        best = load_checkpoint(trainer.best_path, model)
        which = f"best.npz (epoch {best['epoch']})"
    ev = evaluate(model, test_loader)
    if dist is not None:
        ev = dist.reduce_evaluation(ev)   # each rank scored its part of the test set
        if not dist.is_root:
            return 0
    if args.plots:
        plot_confusion(ev["confusion"], data["classes"], out / "test_confusion.png",
                       title=f"{data['test_name']}, {which}")
    atomic_write_text(out / "test.json", json.dumps({"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"],
                                                     "n": ev["n"], "weights": which,
                                                     "confusion": ev["confusion"].tolist()}, indent=1))
    print(f"{data['test_name']} accuracy: top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f} "
          f"({ev['n']:,} images, {which})")
    print("per class: " + ", ".join(f"{name} {acc:.2f}" for name, acc in zip(data["classes"], ev["per_class"])
                                    if acc == acc))   # (acc != acc: NaN, a class absent from the test images)
    pngs = [p.name for p in sorted(out.glob("*.png"))]
    if pngs:
        print(f"plots: {out}/ {', '.join(pngs)}")
    print(f"checkpoints: {trainer.last_path}" + (f", {trainer.best_path}" if trainer.best_path.exists() else ""))
    print(f"history: {out / 'history.json'}, {out / 'history.csv'}")
    print(f"predict: python examples/predict.py --checkpoint {trainer.best_path if trainer.best_path.exists() else trainer.last_path} IMAGE...")
    return 0


def main(argv=None) -> int:
    """Run the CLI; bad input is reported in one line (MINIVGG_DEBUG=1 shows the traceback)."""
    import os
    from minivgg.data import DatasetNotFoundError
    from minivgg.train import CheckpointError
    try:
        args = parse_args(argv)
        return run(args)
    except (UsageError, DatasetNotFoundError, CheckpointError, FileNotFoundError, ValueError,
            RuntimeError) as e:
        if os.environ.get("MINIVGG_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, DatasetNotFoundError):
            first += " Pass --data-dir DIR with the four .gz files, or see minivgg/data/fashion_mnist.py."
        print(f"error: {first}", file=sys.stderr)
        return 2
    except OSError as e:   # a write failed (disk full, permission, a folder in the way): the old files stand
        if os.environ.get("MINIVGG_DEBUG"):
            raise
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from minivgg.distributed import abort_if_failed   # an MPI rank that fails takes the others with it
    sys.exit(abort_if_failed(main()))
