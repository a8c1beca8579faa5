"""Train a VGG on Fashion-MNIST (or a folder of images) from the command line, on the CPU or a GPU.

    PYTHONPATH=. python examples/train_vgg11.py                 # laptop defaults: 12 epochs, ~5 min on 2 cores
    PYTHONPATH=. python examples/train_vgg11.py --preset d2l --device gpu
    PYTHONPATH=. python examples/train_vgg11.py --help

Everything a run leaves (checkpoints, history, plots) goes to --out; --resume continues a run
exactly where it stopped. Every option is one row of OPTIONS below (its default, its help, and
what --resume does with it); named recipes are PRESETS. Change them there.
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

from minivgg.train import options as option_table  # noqa: E402
from minivgg.train.options import FIXED, IGNORED, MAY_CHANGE, Option, OptionError, Section  # noqa: E402
from minivgg.layers.conv_engines import CONV_ENGINES  # noqa: E402


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


# Named recipes: each overrides the defaults; flags given on the command line override both.
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

# Every option, one row each: Option(name, default, type, help, what --resume does with it, argparse extras).
# The laptop defaults: VGG-11 with BatchNorm at 1/8 width on 32x32 Fashion-MNIST, a small head,
# Adam 2e-3 with cosine decay, random flips, 12 epochs: 92.12% test top-1 in 5 min 17 s on 2 cores
# (README, "Results"). On --resume: FIXED options (the network, the data split, the optimizer) keep the
# checkpoint's value and refuse another; MAY_CHANGE ones keep it unless typed; IGNORED ones are per invocation.
OPTIONS = [
    Section("run"),
    Option("preset", None, str, "a named recipe that sets many options at once (flags you give still win): "
           "d2l = d2l.ai's VGG-11 run (width 1/4, 224x224, SGD lr 0.05, xavier, 10 epochs, batch 128); "
           "d2l-adam = the same with Adam lr 1e-4", IGNORED, choices=tuple(sorted(PRESETS))),
    Option("device", "cpu", str, "cpu, gpu or gpu:N (a GPU needs CuPy)", IGNORED),
    Option("seed", 0, int, "seeds weight init, dropout, the validation split, shuffling and augmentation", FIXED),
    Option("out", None, str, "where checkpoints, history and plots go (default: runs/<model>-<dataset>)",
           MAY_CHANGE, metavar="DIR"),
    Option("resume", None, str, "continue from a checkpoint (last.npz), bit-exactly on the CPU: every option the "
           "run was started with is read from it; a typed --epochs is the new total, and options the run cannot "
           "change (network, data split, optimizer, --lr ...) are refused", IGNORED, metavar="PATH"),
    Option("max_steps", None, int, "stop after N optimizer steps in total (smoke tests; a checkpoint is written)",
           IGNORED, metavar="N"),
    Option("patience", None, int, "early stopping: stop after N epochs without a better validation accuracy",
           MAY_CHANGE, metavar="N"),
    Option("progress", True, bool, "show progress bars", IGNORED),
    Option("plots", True, bool, "draw PNG plots every epoch", IGNORED),
    Option("keep_freed_memory", True, bool, "let glibc keep freed host memory for the next step instead of "
           "unmapping it (minivgg/hostmem.py): arrays over 32 MiB, as at 224x224, then reuse their pages "
           "instead of faulting in fresh zeroed ones each step (d2l's VGG-11 in benchmarks/train_speed.py: "
           "1.12x the images/s with im2col-fast, 1.23x with auto); the numbers are the same either way, "
           "resident memory stays at its peak", IGNORED),
    Option("tensorboard", None, str, "also write the run as TensorBoard event files into DIR (every number of "
           "each epoch's history row, and the plots as images): tensorboard --logdir DIR; needs the "
           "tensorboard extra (tensorboardX)", IGNORED, metavar="DIR"),
    Option("grad_flow", None, int, "write grad_flow.png: every layer's weight-gradient norm over the first STEPS "
           "optimizer steps (100 if no number is given); shows vanishing or exploding gradients", IGNORED,
           nargs="?", const=100, metavar="STEPS"),

    Section("data parallel (pip install -e '.[mpi]'; start with mpirun -n K)"),
    Option("distributed", False, bool, "train one model on the K processes mpirun started: each takes 1/K of "
           "every --batch-size batch and the gradients are averaged before every step (MPI on the CPU, NCCL on "
           "GPUs: rank r uses gpu:r of its machine); rank 0 alone writes --out, and every rank evaluates with "
           "rank 0's BatchNorm running statistics (as PyTorch DDP)", IGNORED),
    Option("sync_bn", False, bool, "with --distributed: BatchNorm statistics over the whole global batch (all "
           "ranks), instead of each rank's own share", MAY_CHANGE),

    Section("model"),
    Option("model", "vgg11", str, "VGG depth: 11, 13, 16 or 19 weight layers (configurations A, B, D, E)", FIXED,
           choices=("vgg11", "vgg13", "vgg16", "vgg19")),
    Option("bn", True, bool, "BatchNorm after every convolution (vgg11_bn ...); trains faster and more stably",
           FIXED),
    Option("width_ratio", 8, int, "divide every conv channel count by R (64..512 -> 64/R..512/R); R=1 is the "
           "paper's VGG, d2l uses 4", FIXED, metavar="R"),
    Option("head", "classic", str, "classic = adaptive average pool to --pool-size, then Linear layers of "
           "--hidden widths; gap = global average pool + one Linear", FIXED, choices=("classic", "gap")),
    Option("hidden", "256,256", hidden_widths, "widths of the classic head's hidden Linear layers (4096,4096 in "
           "the paper; 'none' for a single Linear)", FIXED, metavar="W1,W2"),
    Option("pool_size", 1, int, "the classic head pools the last feature map to PxP (7 as torchvision at "
           "224x224; 1 suits 32x32 inputs, whose last map is 1x1)", FIXED, metavar="P"),
    Option("dropout", 0.0, float, "dropout after each hidden Linear", FIXED),
    Option("conv_algo", None, str, "how the convolutions are computed (the same results, to rounding): "
           "im2col-fast (im2col + GEMM, tuned), winograd2 / winograd4 (Winograd's F(2x2,3x3) / F(4x4,3x3)), "
           "auto (one of those per layer by a rule from its shapes), im2col (the textbook); a resumed run may "
           "switch (default: auto on the CPU, where benchmarks/train_speed.py measures it faster; im2col-fast "
           "on a GPU, where Winograd's speed is not measured yet)", MAY_CHANGE,
           choices=tuple(sorted(CONV_ENGINES))),
    Option("init", "xavier", str, "weight init: kaiming (torchvision's) or xavier (d2l's)", FIXED,
           choices=("kaiming", "xavier")),
    Option("pretrained", None, str, "start from ImageNet VGG weights (torchvision's .pth, or .safetensors in "
           "torchvision's or timm's layout): the file sets the architecture (--model, --bn, --width-ratio, "
           "--head and --hidden are not used), the last Linear layer is made anew for the dataset's classes; "
           "needs 3-channel images (--channels 3); a resumed run reads the file again for the architecture",
           FIXED, metavar="PATH"),
    Option("init_from", None, str, "copy the convolutional weights (features.*) from a minivgg checkpoint before "
           "training, for fine-tuning; the head starts fresh", IGNORED, metavar="PATH"),
    Option("freeze_features", False, bool, "train only the head: the convolutional layers keep their weights",
           FIXED),
    Option("freeze_blocks", None, int, "freeze the first K convolutional blocks (5 = --freeze-features); their "
           "BatchNorm runs in eval mode", FIXED, metavar="K"),
    Option("unfreeze_at", None, int, "second phase after EPOCH epochs: unfreeze the top --unfreeze-blocks, restart "
           "the optimizer", FIXED, metavar="EPOCH"),
    Option("unfreeze_blocks", None, int, "with --unfreeze-at: how many of the frozen blocks (the top ones) train; "
           "None: all of them", FIXED, metavar="N"),
    Option("finetune_lr", None, float, "with --unfreeze-at: the second phase's peak learning rate; None: --lr / 10",
           FIXED, metavar="LR"),

    Section("data"),
    Option("dataset", "fashion-mnist", str, "fashion-mnist, or folder:PATH for a folder with one sub-folder of "
           "images per class (20%% of it is held out for validation; a resumed run refuses a folder whose file "
           "list changed)", FIXED, metavar="NAME"),
    Option("data_dir", None, str, "folder holding the Fashion-MNIST .gz files (searched first; then "
           "$MINIVGG_DATA, ~/.cache/minivgg, /usr/share/datasets/fashion-mnist)", MAY_CHANGE, metavar="DIR"),
    Option("stream", False, bool, "folder: datasets only: decode images batch by batch with worker threads "
           "instead of loading the folder into memory first (for folders larger than memory); the same batches, "
           "except that mean/std come from 2,000 sampled training images when there are more", MAY_CHANGE),
    Option("download", True, bool, "download Fashion-MNIST when it is not found", IGNORED),
    Option("image_size", 32, int, "resize images to SxS (at least 32: VGG halves the image 5 times)", FIXED,
           metavar="S"),
    Option("channels", None, int, "1 (gray) or 3 (RGB) input channels (default: 1 for Fashion-MNIST, 3 for a "
           "folder)", FIXED, choices=(1, 3)),
    Option("augment", True, bool, "random horizontal flips and random crops of the training images", MAY_CHANGE),
    Option("crop_padding", 0, int, "with --augment: pad by P pixels, then crop back at random (0 = flips only; "
           "S/8, e.g. 4 at 32x32, is the usual choice)", MAY_CHANGE, metavar="P"),
    Option("skip_bad_images", False, bool, "with --dataset folder:PATH, leave out images that cannot be read "
           "(each is named in a warning) instead of stopping; with --stream, files that are missing or dangling "
           "links when the run starts (a file that exists but does not decode stops the run when its batch is "
           "built, named)", MAY_CHANGE),
    Option("normalize", True, bool, "subtract the training set's mean and divide by its std, per channel", FIXED),
    Option("train_subset", None, int, "train on only N images (quick runs); validation shrinks to N/10 unless "
           "--val-size", FIXED, metavar="N"),
    Option("val_size", 5000, int, "Fashion-MNIST training images held out for validation (best.npz, early "
           "stopping); 0 validates on the test set, as d2l does", FIXED, metavar="N"),
    Option("test_subset", None, int, "evaluate the final model on only N test images", MAY_CHANGE, metavar="N"),

    Section("optimisation"),
    Option("epochs", 12, int, "total number of epochs", MAY_CHANGE),
    Option("batch_size", 128, int, "images per micro-batch", FIXED),
    Option("accum_steps", 1, int, "accumulate gradients over K micro-batches per optimizer step (an effective "
           "batch of K x --batch-size in the memory of one)", FIXED, metavar="K"),
    Option("optimizer", "adam", str, "adam, adamw (decoupled weight decay) or sgd (with --momentum)", FIXED,
           choices=("adam", "adamw", "sgd")),
    Option("lr", 2e-3, float, "peak learning rate", FIXED),
    Option("momentum", 0.9, float, "SGD momentum", FIXED),
    Option("weight_decay", 0.0, float, "L2 penalty (sgd, adam) or decoupled decay (adamw)", FIXED),
    Option("schedule", "cosine", str, "learning-rate schedule over the epochs: constant, step (x0.1 every "
           "epochs/3), exponential (x0.92 per epoch) or cosine to 0", FIXED,
           choices=("none", "step", "exp", "cosine")),
    Option("warmup", 0.0, float, "ramp the learning rate up linearly over this many epochs (fractions allowed)",
           FIXED, metavar="EPOCHS"),
    Option("label_smoothing", 0.0, float, "train against (1-EPS) one-hot + EPS/K targets", MAY_CHANGE,
           metavar="EPS"),
    Option("clip_norm", None, float, "clip the global gradient norm to C before each step", MAY_CHANGE,
           metavar="C"),
    Option("amp", False, bool, "mixed precision: float16 forward and backward, float32 master weights, "
           "optimizer, BatchNorm and loss, dynamic loss scaling (minivgg/amp.py); made for GPUs, slower on the "
           "CPU", MAY_CHANGE),
    Option("amp_growth_interval", 2000, int, "with --amp: double the loss scale after N steps without inf/NaN "
           "gradients (it halves, and the step is skipped, on any)", MAY_CHANGE, metavar="N"),
]

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
    def _get_help_string(self, action):
        """An option whose help already says its default (one that depends on others) says it once."""
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def make_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The CLI; with suppress=True only options given on the command line appear in the result."""
    return option_table.make_parser(
        OPTIONS, suppress, prog="train_vgg11.py", formatter_class=Formatter, epilog=EPILOG,
        description="Train a VGG (NumPy on the CPU, CuPy on a GPU) with progress bars, evaluation every "
                    "epoch, checkpoints that resume exactly, and plots of the run.")


def parse_args(argv=None) -> argparse.Namespace:
    """defaults < --preset < a resumed checkpoint's options < flags on the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    given = vars(make_parser(suppress=True).parse_args(argv))
    saved, chosen = None, set(given)
    if args.resume:
        saved = saved_options(args.resume)
        if "init_from" in given:
            raise UsageError("--init-from cannot be used with --resume: the checkpoint holds every weight")
        if "given" in saved:   # saved by this version: its options are the values the run used
            chosen |= {k for k in saved if k in RESTORED}
    merged = option_table.resolve(OPTIONS, given, saved, PRESETS.get(args.preset), same=_same)
    merged["given"] = sorted(chosen)         # options typed, or recorded by the resumed run
    merged["hidden"] = _same("hidden", merged["hidden"])
    if merged["conv_algo"] is None:          # not typed, not in a preset or the resumed checkpoint
        merged["conv_algo"] = default_conv_algo(merged["device"])
    return argparse.Namespace(**merged)


def default_conv_algo(device: str) -> str:
    """auto on the CPU (Winograd where a layer gains: VGG-11's training step 1.3-1.5x faster on the
    machines measured, docs/benchmarks/winograd.md); im2col-fast on a GPU until Winograd is timed there."""
    return "auto" if device == "cpu" else "im2col-fast"


RESTORED = option_table.names(OPTIONS, FIXED) + option_table.names(OPTIONS, MAY_CHANGE)   # taken from a checkpoint


def _same(key, value):
    """An option's value in one form, whether typed or read back from a checkpoint's JSON."""
    if key == "hidden":
        return tuple(hidden_widths(value) if isinstance(value, str) else value)
    return tuple(value) if isinstance(value, list) else value


def saved_options(path) -> dict:
    return saved_extra(path).get("args", {})


def saved_extra(path) -> dict:
    """A checkpoint's extra (the options and data the run was started with), read once per path."""
    from minivgg.train import load_checkpoint
    if path not in _SAVED:
        _SAVED[path] = load_checkpoint(path)["extra"]
    return _SAVED[path]


_SAVED: dict = {}


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
    if args.amp and args.distributed:
        raise UsageError("--amp with --distributed is not supported yet (the overflow flag would need an "
                         "all-reduce over the ranks); leave out one of the two")
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
def load_data(args):
    """The run's data (minivgg.data.load_dataset), with what the command line decides around it: the
    validation size a --train-subset run uses, the warning for skipped images, --no-normalize."""
    from minivgg.data import DataError, load_dataset
    from minivgg.data.folder import UnreadableImagesError
    val_size = args.val_size
    if args.dataset == "fashion-mnist" and args.train_subset and "val_size" not in args.given:
        val_size = min(val_size, max(args.train_subset // 10, 1)) if val_size else 0
    try:
        data = load_dataset(args.dataset, args.image_size, args.channels, args.seed, data_dir=args.data_dir,
                            download=args.download, val_size=val_size, train_subset=args.train_subset,
                            test_subset=args.test_subset, stream=args.stream, skip_bad=args.skip_bad_images)
    except UnreadableImagesError as e:
        raise UsageError(f"{len(e.skipped)} unreadable image(s) in {args.dataset[len('folder:'):]} "
                         "(--skip-bad-images leaves them out): "
                         + "; ".join(f"{p} ({why})" for p, why in e.skipped)) from None
    except DataError as e:
        if e.param and str(e).startswith(e.param):   # a value asked for: say it as the flag
            raise UsageError("--" + e.param.replace("_", "-") + str(e)[len(e.param):]) from None
        raise
    if args.dataset == "fashion-mnist":
        args.val_size = data.val_size   # recorded as used, so a resumed run splits the same way
    if data.skipped:
        print(f"warning: --skip-bad-images left out {len(data.skipped)} unreadable image(s): "
              + ", ".join(str(p) for p, _ in data.skipped), file=sys.stderr)
    C = data.channels
    flat = [c for c in range(C) if data.std[c] == 0]
    if flat and args.normalize:
        raise UsageError(f"channel(s) {flat} of the training images are constant (std 0): normalising "
                         "would divide by zero; pass --no-normalize")
    if not args.normalize:
        data.mean, data.std = (0.0,) * C, (1.0,) * C
    return data


def data_record(data) -> dict:
    """What a checkpoint's extra records of the data: {"data": a folder's file count and digest}, checked on
    resume ({} for Fashion-MNIST)."""
    return {"data": {"files": data.files, "files_digest": data.files_digest}} if data.files_digest else {}


def check_same_folder(args, data) -> None:
    """A resumed folder run refuses a folder whose file list changed: its split would be drawn anew."""
    if not data.files_digest:
        return
    saved = saved_extra(args.resume).get("data", {})
    if "files_digest" not in saved:
        print(f"warning: {args.resume} does not record the file list of {args.dataset[len('folder:'):]} (saved "
              "by an older version): the train/validation split is drawn from the folder as it is now",
              file=sys.stderr)
    elif saved["files_digest"] != data.files_digest:
        raise UsageError(f"--dataset {args.dataset}: the folder's file list changed since {args.resume} was "
                         f"saved ({saved['files']:,} image files then, {data.files:,} now), so the "
                         "train/validation split would be drawn from other files; put the folder back as it "
                         "was, or start a new run (--out) on the folder as it is")


def make_loaders(args, data, dist=None):
    """Train / val / test loaders; with `dist`, this rank's shards (training: its part of every batch)."""
    from minivgg.data import DataLoader, ShardedLoader, shard_bounds, transforms
    augment = None
    if args.augment:
        s = args.image_size
        pad = s // 8 if args.crop_padding is None else args.crop_padding
        steps = [transforms.RandomCrop(s, padding=pad)] if pad > 0 else []
        augment = transforms.Compose(steps + [transforms.RandomHorizontalFlip()])
    norm = (data.mean, data.std)
    common = dict(batch_size=args.batch_size, normalize=norm, device=args.device)
    if dist is not None:   # data parallel: evaluation sets split in K consecutive parts
        train = ShardedLoader(*data.train, rank=dist.rank, world=dist.world, shuffle=True, seed=args.seed,
                              transform=augment, **common)
        part = lambda a: tuple(v[slice(*shard_bounds(len(a[1]), dist.rank, dist.world))] for v in a)  # noqa: E731
        return (train, DataLoader(*part(data.val), shuffle=False, **common),
                DataLoader(*part(data.test), shuffle=False, **common))
    train = DataLoader(*data.train, shuffle=True, seed=args.seed, transform=augment, **common)
    val = DataLoader(*data.val, shuffle=False, **common)
    test = DataLoader(*data.test, shuffle=False, **common)
    return train, val, test


# -- model and optimiser ------------------------------------------------------------------------
def make_model(args, num_classes, channels):
    from minivgg import random_stream
    from minivgg.models import VGG
    random_stream.seed(args.seed)
    if args.pretrained:
        from minivgg.models.pretrained import load_pretrained
        if channels != 3:
            raise UsageError(f"--pretrained {args.pretrained}: ImageNet weights take 3-channel images, this "
                             f"dataset has {channels} (add --channels 3)")
        try:
            model = load_pretrained(args.pretrained, num_classes=num_classes, dropout=args.dropout)
        except ValueError as e:   # another architecture, a truncated file, a pickle that is not weights
            raise UsageError(f"--pretrained: {e}") from None
        return model.to(args.device)
    arch = args.model + ("_bn" if args.bn else "")
    try:
        model = VGG(arch, num_classes=num_classes, in_channels=channels, width_ratio=args.width_ratio,
                    head=args.head, hidden=args.hidden, pool_size=args.pool_size, dropout=args.dropout,
                    init=args.init, conv_algo=args.conv_algo)
    except ValueError as e:   # VGG checks its arguments (e.g. a --width-ratio that leaves no channels)
        raise UsageError(f"the model cannot be built from these options: {e}") from None
    if args.init_from:
        copy_features(model, args.init_from)
    return model.to(args.device)


def open_tensorboard(logdir):
    from minivgg.train.tensorboard import TensorBoardWriter
    try:
        return TensorBoardWriter(logdir)
    except ImportError as e:
        raise UsageError(f"--tensorboard {logdir}: {e}") from None


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
    try:
        dist = distributed.init(args.device)
    except RuntimeError as e:   # no mpi4py, or fewer GPUs than ranks: what to install or change
        raise UsageError(str(e)) from None
    dist.install_excepthook()
    if args.batch_size < dist.world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: {dist.world} ranks need at least "
                         f"{dist.world} (one image per rank per step)")
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
    from minivgg.data import data_digest
    from minivgg.layers.sync_norm import convert_sync_batchnorm
    per_rank = ("device", "progress", "plots", "grad_flow", "given", "out")
    try:   # the data too: the same path may hold other files on another machine
        dist.check_same({"options": {k: v for k, v in vars(args).items() if k not in per_rank},
                         "model": model.config, "training images": len(data.train[1]),
                         "steps per epoch": len(train_loader), "classes": data.classes,
                         "data": {"digest": data_digest(data)[:16], "mean": data.mean, "std": data.std}})
    except ValueError as e:   # check_same's one error: the ranks disagree
        raise UsageError(str(e)) from None
    if args.sync_bn:
        convert_sync_batchnorm(model, dist.engine)
    dist.broadcast_model(model)


# -- the run ------------------------------------------------------------------------------------
def run(args) -> int:
    from minivgg import backend, hostmem
    from minivgg.amp import LossScaler
    from minivgg.losses import SoftmaxCrossEntropy
    from minivgg.models import draw_architecture, summary
    from minivgg.train import NonFiniteLossError, Trainer, freeze_features, load_checkpoint
    from minivgg.train.files import atomic_write_text
    from minivgg.train.plots import GradFlowRecorder, plot_confusion

    check_args(args)
    if args.keep_freed_memory:
        hostmem.keep_freed_memory()   # False on a C library other than glibc: nothing to do there
    dist = start_distributed(args) if args.distributed else None
    if args.sync_bn and dist is None:
        print("note: --sync-bn acts only with --distributed (one process: BatchNorm already sees the whole "
              "batch)", file=sys.stderr)
    try:
        backend.get_xp(args.device)   # a missing GPU fails here, with what to install
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    out = Path(args.out or f"runs/{args.model}{'_bn' if args.bn else ''}-{args.dataset.replace(':', '-').replace('/', '_')}")
    args.out = str(out)
    check_out(out)
    t0 = time.perf_counter()
    data = load_data(args)
    if args.resume:
        check_same_folder(args, data)
    train_loader, val_loader, test_loader = make_loaders(args, data, dist)
    C, S = data.channels, args.image_size
    print(f"data: {len(data.train[1]):,} training, {len(data.val[1]):,} validation"
          f"{' (the test set)' if data.val is data.test else ''}, {len(data.test[1]):,} "
          f"{data.test_name} images, {C}x{S}x{S}, {len(data.classes)} classes "
          f"({time.perf_counter() - t0:.1f} s)")

    model = make_model(args, len(data.classes), C)
    if args.freeze_features:
        freeze_features(model)
    unfreeze = transfer_phases(args, model, max(1, len(train_loader) // args.accum_steps))
    if dist is not None:
        join_model(args, dist, model, data, train_loader)
    print(summary(model, (1, C, S, S), batch_size=args.batch_size))
    opt, sched = make_optimizer(args, model, max(1, len(train_loader) // args.accum_steps))
    extra = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
             "image_size": [S, S], "channels": C,
             "normalize": {"mean": list(data.mean), "std": list(data.std)}, **data_record(data)}
    trainer = Trainer(model, opt, train_loader, val_loader=val_loader,
                      loss_fn=SoftmaxCrossEntropy(args.label_smoothing), scheduler=sched, out_dir=out,
                      accum_steps=args.accum_steps, clip_norm=args.clip_norm, patience=args.patience,
                      class_names=data.classes, device=args.device, max_steps=args.max_steps,
                      extra=extra, plots=args.plots, progress=args.progress,
                      skip_input_grad=True,   # the images need no gradient (as in torch)
                      distributed=dist,
                      amp=LossScaler(growth_interval=args.amp_growth_interval) if args.amp else False,
                      unfreeze=unfreeze)
    out.mkdir(parents=True, exist_ok=True)
    if args.plots:
        draw_architecture(model, (C, S, S), out / "architecture.png")
    grad_flow = GradFlowRecorder(opt, args.grad_flow, out / "grad_flow.png") if args.grad_flow else None
    board = open_tensorboard(args.tensorboard) if args.tensorboard and trainer.writes else None
    if board is not None:
        trainer.on_epoch = lambda row, drawn: board.epoch(row, row["epoch"], images=drawn)
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
    if board is not None:
        board.close()
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
    if trainer.best_path.exists() and data.val is not data.test:
        best = load_checkpoint(trainer.best_path, model)
        which = f"best.npz (epoch {best['epoch']})"
    ev = trainer.evaluate(test_loader)   # data parallel: each rank scores its part, with rank 0's BN statistics
    if dist is not None and not dist.is_root:
        return 0
    if args.plots:
        plot_confusion(ev["confusion"], data.classes, out / "test_confusion.png",
                       title=f"{data.test_name}, {which}")
    atomic_write_text(out / "test.json", json.dumps({"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"],
                                                     "n": ev["n"], "weights": which,
                                                     "confusion": ev["confusion"].tolist()}, indent=1))
    print(f"{data.test_name} accuracy: top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f} "
          f"({ev['n']:,} images, {which})")
    print("per class: " + ", ".join(f"{name} {acc:.2f}" for name, acc in zip(data.classes, ev["per_class"])
                                    if acc == acc))   # (acc != acc: NaN, a class absent from the test images)
    pngs = [p.name for p in sorted(out.glob("*.png"))]
    if pngs:
        print(f"plots: {out}/ {', '.join(pngs)}")
    print(f"checkpoints: {trainer.last_path}" + (f", {trainer.best_path}" if trainer.best_path.exists() else ""))
    print(f"history: {out / 'history.json'}, {out / 'history.csv'}")
    print(f"predict: python examples/predict.py --checkpoint {trainer.best_path if trainer.best_path.exists() else trainer.last_path} IMAGE...")
    return 0


def bad_input_errors() -> tuple:
    """What bad input raises: this command's checks (UsageError, OptionError), data that cannot be used
    (minivgg.data.DataError, DatasetNotFoundError), a checkpoint that cannot be read or does not fit
    (CheckpointError), a file named that does not exist. Anything else is a bug: it keeps its traceback."""
    from minivgg.data import DataError, DatasetNotFoundError
    from minivgg.train import CheckpointError
    return (UsageError, OptionError, DataError, DatasetNotFoundError, CheckpointError, FileNotFoundError)


def main(argv=None) -> int:
    """Run the CLI; bad input is reported in one line (MINIVGG_DEBUG=1 shows the traceback)."""
    from minivgg.data import DatasetNotFoundError

    def hint(e):
        return (" Pass --data-dir DIR with the four .gz files, or see minivgg/data/fashion_mnist.py."
                if isinstance(e, DatasetNotFoundError) else "")
    return option_table.run_command(lambda: run(parse_args(argv)), bad_input_errors(), hint)


if __name__ == "__main__":
    from minivgg.distributed import abort_if_failed   # an MPI rank that fails takes the others with it
    sys.exit(abort_if_failed(main()))
