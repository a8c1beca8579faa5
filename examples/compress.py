"""Make a trained VGG lighter and measure what it cost: prune, distil, quantize to int8, export float16,
and one table of every result.

    PYTHONPATH=. python examples/compress.py prune    --checkpoint runs/base/best.npz --ratio 0.5 --out runs/pruned
    PYTHONPATH=. python examples/compress.py distill  --teacher runs/base/best.npz --out runs/student
    PYTHONPATH=. python examples/compress.py quantize --checkpoint runs/base/best.npz --out base.int8.onnx
    PYTHONPATH=. python examples/compress.py fp16     --checkpoint runs/base/best.npz --out base.fp16.onnx
    PYTHONPATH=. python examples/compress.py table    --model base=runs/base/best.npz --model int8=base.int8.onnx
    PYTHONPATH=. python examples/compress.py --help   (and  <command> --help)

prune and distill train on Fashion-MNIST with the split, image size and normalisation of the checkpoint
they start from, and write ordinary checkpoints (best.npz, last.npz) that predict.py, export_onnx.py and
serve.py take. Their library parts: minivgg/models/prune.py, minivgg/distill.py,
minivgg/train/compress_trainer.py, minivgg/quantize.py, minivgg/deploy/onnx_int8.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:  # minivgg before NumPy: it sets OpenBLAS's thread timeout (minivgg/__init__.py)
    import minivgg  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=. or pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import minivgg  # noqa: F401

import numpy as np  # noqa: E402

EPILOG = """\
commands:
  prune     network slimming: [--sparsity L for --sparsity-epochs K: train with L * sum|gamma| on every
            BatchNorm scale], then remove the --ratio fraction of channels with the smallest |gamma| (one
            global threshold; --rule l1 ranks filters by their L1 norm instead), rebuild a smaller dense
            VGG and fine-tune it for --epochs (with --teacher: distilled while it fine-tunes)
  distill   a student at 1/--shrink of the teacher's width, trained for --epochs on
            alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy;
            --alpha 0 trains the same student on the labels alone (the teacher is not run)
  quantize  int8: per-output-channel symmetric int8 weights, uint8 activations calibrated on
            --calibration training images (--rule minmax or percentile), written as QLinearConv ONNX;
            checked against minivgg's simulation of the same integer arithmetic
  fp16      ONNX with float16 weights and float16 arithmetic inside (float32 in and out)
  table     for every --model NAME=PATH (.npz checkpoint or .onnx file): parameters, mult-adds per image,
            ONNX file size, test accuracy (10,000 images), latency at batch 1 and 64 in minivgg and in
            onnxruntime; writes a Markdown table and JSON

exit status: 0 done, 1 a verification failed, 2 bad input (a missing checkpoint, a bad option), 4 a file
could not be written (the old one stands).
"""


class UsageError(Exception):
    """Bad input: reported in one line, exit status 2, before any compute."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress.py", formatter_class=Formatter, epilog=EPILOG,
                                description="Prune, distil, quantize (int8) or export (float16) a trained "
                                            "minivgg VGG, and measure each result in one table.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def training(q):
        g = q.add_argument_group("training (Fashion-MNIST, with the starting checkpoint's split and preprocessing)")
        g.add_argument("--out", required=True, metavar="DIR", help="where best.npz, last.npz and the history go")
        g.add_argument("--epochs", type=int, default=4, help="training epochs (0: no training)")
        g.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, cosine-decayed over --epochs")
        g.add_argument("--batch-size", type=positive_int, default=128)
        g.add_argument("--seed", type=int, default=0, help="seeds shuffling, augmentation and a student's init")
        g.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                       help="train on the first N training images only (smoke tests)")
        g.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the Fashion-MNIST .gz files")
        g.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                       help="after training, score the kept network (best.npz) on the first N test images "
                            "only (default: all 10,000), into DIR/test.json")
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
        g.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
        g.add_argument("--alpha", type=float, default=0.9,
                       help="weight of the teacher's soft targets (0: labels only, teacher not run)")

    q = sub.add_parser("prune", formatter_class=Formatter, help="remove channels, rebuild smaller, fine-tune",
                       description="Network slimming (Liu et al. 2017) or filter-norm pruning (Li et al. 2017) "
                                   "into a smaller dense VGG, then fine-tuning.")
    q.add_argument("--checkpoint", required=True, metavar="PATH", help="the trained network (best.npz)")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, default=None,
                     help="fraction of all conv channels to remove, by one global threshold, in [0, 1)")
    how.add_argument("--fewer-params", type=float, default=None, metavar="F",
                     help="instead of --ratio: the smallest ratio (in steps of 0.01) that leaves at least "
                          "F times fewer parameters")
    q.add_argument("--rule", choices=["bn", "l1"], default="bn",
                   help="bn: rank channels by |BatchNorm gamma|; l1: by the L1 norm of their filters")
    q.add_argument("--min-channels", type=positive_int, default=4, help="every conv keeps at least this many")
    q.add_argument("--sparsity", type=float, default=0.0, metavar="LAMBDA",
                   help="L1 strength on BatchNorm scales during --sparsity-epochs before pruning")
    q.add_argument("--sparsity-epochs", type=int, default=0, metavar="K",
                   help="epochs of training with the L1 penalty before pruning (0: prune at once)")
    q.add_argument("--teacher", default=None, metavar="PATH",
                   help="fine-tune by distillation from this checkpoint (pruned + distilled)")
    training(q)

    q = sub.add_parser("distill", formatter_class=Formatter, help="train a narrower student from a teacher",
                       description="Knowledge distillation (Hinton et al. 2015) into a student of the "
                                   "teacher's architecture at 1/--shrink of its width, trained from scratch.")
    q.add_argument("--teacher", required=True, metavar="PATH", help="the trained teacher (best.npz)")
    q.add_argument("--shrink", type=positive_int, default=4, help="the student's channels = the teacher's / SHRINK")
    training(q)

    q = sub.add_parser("quantize", formatter_class=Formatter, help="int8 ONNX by post-training quantization",
                       description="Post-training int8 quantization (minivgg/quantize.py) into an ONNX file of "
                                   "QLinearConv nodes, verified against minivgg's integer simulation.")
    q.add_argument("--checkpoint", required=True, metavar="PATH")
    q.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    q.add_argument("--calibration", type=positive_int, default=512, metavar="N",
                   help="training images the activation ranges are calibrated on")
    q.add_argument("--rule", choices=["minmax", "percentile"], default="percentile",
                   help="activation range: min/max, or the --percentile of the values")
    q.add_argument("--percentile", type=float, default=99.99)
    q.add_argument("--weight-bits", choices=["auto", "8", "7"], default="auto",
                   help="7 on CPUs without VNNI (their u8 x s8 kernels saturate int16 pairs), else 8")
    q.add_argument("--data-dir", default=None, metavar="DIR")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    q = sub.add_parser("fp16", formatter_class=Formatter, help="float16 ONNX",
                       description="Export a checkpoint as ONNX with float16 weights and arithmetic "
                                   "(float32 input and outputs), verified against minivgg in float32.")
    q.add_argument("--checkpoint", required=True, metavar="PATH")
    q.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")

    q = sub.add_parser("table", formatter_class=Formatter, help="measure every model in one table",
                       description="Parameters, mult-adds, file size, test accuracy and CPU latency of each "
                                   "model, measured in one run (latencies interleaved round by round).")
    q.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a row: a .npz checkpoint (run by minivgg and, exported to float32 ONNX, by "
                        "onnxruntime) or an .onnx file (onnxruntime only); repeat for every row")
    q.add_argument("--out", required=True, metavar="PATH", help="the Markdown table; PATH.json gets the numbers")
    q.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                   help="score on the first N test images (default: all 10,000)")
    q.add_argument("--rounds", type=positive_int, default=5, help="latency rounds; the median is reported")
    q.add_argument("--threads", type=positive_int, default=2, help="onnxruntime's intra-op threads")
    q.add_argument("--data-dir", default=None, metavar="DIR")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


# -- checks before any compute ----------------------------------------------------------------------
def existing(path, what="checkpoint") -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {path} does not exist" + (f" (did you mean {p / 'best.npz'}?)"
                                                           if (p / "best.npz").is_file() else ""))
    return p


def check_args(args) -> None:
    for key in ("checkpoint", "teacher"):
        if getattr(args, key, None):
            existing(getattr(args, key), f"--{key}")
    if args.command == "prune" and args.fewer_params is not None and not args.fewer_params > 1:
        raise UsageError(f"--fewer-params F: expected a factor > 1, got {args.fewer_params}")
    if args.command == "prune" and args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise UsageError(f"--ratio is the fraction of channels to remove: expected a number in [0, 1), "
                         f"got {args.ratio}")
    if args.command == "prune":
        if args.sparsity < 0 or (args.sparsity > 0) != (args.sparsity_epochs > 0):
            raise UsageError("--sparsity LAMBDA (> 0) and --sparsity-epochs K (> 0) go together; got "
                             f"--sparsity {args.sparsity} --sparsity-epochs {args.sparsity_epochs}")
    if args.command in ("prune", "distill"):
        if args.epochs < 0:
            raise UsageError(f"--epochs must be >= 0, got {args.epochs}")
        if not args.temperature > 0 or not 0 <= args.alpha <= 1:
            raise UsageError(f"--temperature must be > 0 and --alpha in [0, 1], got {args.temperature} "
                             f"and {args.alpha}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a file; name a folder")
    if args.command in ("quantize", "fp16"):
        if not args.out.endswith(".onnx"):
            raise UsageError(f"--out {args.out}: expected a file name ending in .onnx")
        from minivgg.deploy.onnx_export import refuse_overwriting_input
        refuse_overwriting_input(args.checkpoint, args.out)
    if args.command == "quantize" and not 50 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (50, 100], got {args.percentile}")
    if args.command == "table":
        rows = []
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--model {spec!r}: expected NAME=PATH, e.g. --model base=runs/base/best.npz")
            if not path.endswith((".npz", ".onnx")):
                raise UsageError(f"--model {spec}: PATH must be a .npz checkpoint or an .onnx file")
            rows.append((name, existing(path, f"--model {name}:")))
        if len({n for n, _ in rows}) != len(rows):
            raise UsageError("--model: every row needs its own NAME")
        args.rows = rows


# -- data ---------------------------------------------------------------------------------------------
def load_source(path):
    """(model, checkpoint dict) rebuilt from a checkpoint, in eval mode."""
    from minivgg.deploy.predictor import checkpoint_preprocessing
    from minivgg.models import build_model
    from minivgg.train import load_checkpoint, restore
    ckpt = load_checkpoint(path)
    ckpt["meta"] = checkpoint_preprocessing(ckpt)
    model = build_model(ckpt["config"])
    restore(ckpt, model)
    return model.eval(), ckpt


def fashion_mnist_split(ckpt, data_dir=None, train_subset=None, pick=None):
    """uint8 train and validation images (N, C, S, S) and labels, split as the checkpoint's run split them
    (train_vgg11.py: a permutation by its seed, the first val_size images held out). pick(n) -> indices
    chooses training images before any is resized (the calibration set)."""
    from minivgg.data import load_fashion_mnist, prepare_images
    run = ckpt["extra"].get("args", {})
    if str(run.get("dataset", "fashion-mnist")) != "fashion-mnist":
        raise UsageError(f"{ckpt['path']}: trained on {run.get('dataset')}; compress.py trains on "
                         "Fashion-MNIST only")
    m = ckpt["meta"]
    images, labels = load_fashion_mnist("train", data_dir, download=False)
    seed, val_size = int(run.get("split_seed", run.get("seed", 0))), int(run.get("val_size", 5000))
    order = np.random.default_rng(seed).permutation(len(images))      # train_vgg11.py's validation split
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    if pick is not None:
        train_idx = train_idx[pick(len(train_idx))]
    prep = lambda a: prepare_images(a, size=tuple(m["image_size"]), channels=m["channels"])   # noqa: E731
    return (prep(images[train_idx]), labels[train_idx]), (prep(images[val_idx]), labels[val_idx]), \
        {"split_seed": seed, "val_size": val_size}


def normalized(ckpt, images):
    m = ckpt["meta"]
    mean = np.asarray(m["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(m["std"], np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255) - mean) / std


# -- prune and distill ----------------------------------------------------------------------------------
def train(args, model, ckpt, train_set, val_set, split, out, epochs, teacher=None, sparsity=0.0, note=""):
    """Fine-tune (or train) `model` with CompressTrainer; returns the trainer (best.npz / last.npz in out)."""
    from minivgg import random_stream
    from minivgg.data import DataLoader, transforms
    from minivgg.optim import Adam, make_scheduler
    from minivgg.train.compress_trainer import CompressTrainer
    m = ckpt["meta"]
    norm = (tuple(m["mean"]), tuple(m["std"]))
    run = ckpt["extra"].get("args", {})
    augment = transforms.RandomHorizontalFlip() if run.get("augment", True) else None
    train_loader = DataLoader(*train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                              transform=augment, normalize=norm)
    val_loader = DataLoader(*val_set, batch_size=256, shuffle=False, normalize=norm)
    random_stream.seed(args.seed)
    opt = Adam(model, lr=args.lr)
    sched = make_scheduler("cosine", opt, max(epochs, 1), len(train_loader))
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "rows"}
    record.update(split, dataset="fashion-mnist", augment=augment is not None, stage=note)
    extra = {"args": record, "image_size": list(m["image_size"]), "channels": m["channels"],
             "normalize": {"mean": list(m["mean"]), "std": list(m["std"])},
             "compressed_from": str(ckpt["path"])}
    use_teacher = teacher if (teacher is not None and args.alpha > 0) else None
    trainer = CompressTrainer(model, opt, train_loader, val_loader=val_loader, scheduler=sched, out_dir=out,
                              class_names=m["classes"], extra=extra, plots=False, progress=args.progress,
                              skip_input_grad=True, teacher=use_teacher, temperature=args.temperature,
                              alpha=args.alpha, sparsity=sparsity)
    trainer.fit(epochs)
    return trainer


def best_or_last(trainer, model):
    from minivgg.train import load_checkpoint
    path = trainer.best_path if trainer.best_path.exists() else trainer.last_path
    if path.exists():
        load_checkpoint(path, model)
    return path


def score_on_test_set(args, ckpt, model, path, out) -> dict:
    """The kept network's (path, loaded in model) top-1 and top-5 on the Fashion-MNIST test images (the
    first --test-subset N), preprocessed as the starting checkpoint; written to out/test.json."""
    from minivgg.data import DataLoader, load_fashion_mnist, prepare_images
    from minivgg.train import evaluate
    images, labels = load_fashion_mnist("test", args.data_dir, download=False)
    if args.test_subset:
        images, labels = images[:args.test_subset], labels[:args.test_subset]
    m = ckpt["meta"]
    x = prepare_images(images, size=tuple(m["image_size"]), channels=m["channels"])   # uint8 (N, C, S, S)
    ev = evaluate(model, DataLoader(x, labels, batch_size=256, shuffle=False,
                                    normalize=(tuple(m["mean"]), tuple(m["std"]))))
    score = {"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "images": int(len(labels)),
             "checkpoint": str(path)}
    write_json(Path(out) / "test.json", score)
    print(f"test top-1 {ev['top1']:.2%}, top-5 {ev['top5']:.2%} on {len(labels):,} test images ({path})")
    return score


def cmd_prune(args) -> int:
    from minivgg.models.prune import prune, select_channels
    from minivgg.train import evaluate
    from minivgg.data import DataLoader
    model, ckpt = load_source(args.checkpoint)
    teacher = load_source(args.teacher)[0] if args.teacher else None
    train_set, val_set, split = fashion_mnist_split(ckpt, args.data_dir, args.train_subset)
    out = Path(args.out)
    val_loader = DataLoader(*val_set, batch_size=256, shuffle=False,
                            normalize=(tuple(ckpt["meta"]["mean"]), tuple(ckpt["meta"]["std"])))
    report = {"source": str(args.checkpoint), "params_before": model.num_params()}
    if args.sparsity_epochs:
        print(f"slimming: {args.sparsity_epochs} epoch(s) with {args.sparsity} * sum|gamma|")
        t = train(args, model, ckpt, train_set, val_set, split, out / "slim", args.sparsity_epochs,
                  sparsity=args.sparsity, note="sparsity")
        model = model.eval()
        report["slim_checkpoint"] = str(t.last_path)
    if args.fewer_params is not None:
        args.ratio = ratio_for(model, args.fewer_params, args.rule, args.min_channels)
    keep = select_channels(model, args.ratio, args.rule, args.min_channels)
    small = prune(model, args.ratio, args.rule, args.min_channels).eval()
    report.update(channels_before=[int(m.out_channels) for _, m in model.modules() if hasattr(m, "out_channels")],
                  channels_after=[len(k) for k in keep], params_after=small.num_params(),
                  val_top1_unpruned=evaluate(model, val_loader)["top1"],
                  val_top1_pruned_before_finetune=evaluate(small, val_loader)["top1"])
    print(f"pruned {args.ratio:.0%} of the channels ({args.rule}): {report['params_before']:,} -> "
          f"{report['params_after']:,} parameters; channels {report['channels_after']}; validation top-1 "
          f"{report['val_top1_unpruned']:.4f} -> {report['val_top1_pruned_before_finetune']:.4f} before fine-tuning")
    trainer = train(args, small, ckpt, train_set, val_set, split, out, args.epochs, teacher=teacher,
                    note="prune" + (" + distill" if teacher is not None and args.alpha > 0 else ""))
    if args.epochs == 0:
        trainer.save(out / "last.npz")
    path = best_or_last(trainer, small)
    report.update(checkpoint=str(path), val_top1_after=evaluate(small, val_loader)["top1"])
    write_json(out / "prune.json", report)
    print(f"fine-tuned {args.epochs} epoch(s): validation top-1 {report['val_top1_after']:.4f}; wrote {path}")
    score_on_test_set(args, ckpt, small, path, out)
    return 0


def ratio_for(model, factor, rule, min_channels) -> float:
    """The smallest ratio in steps of 0.01 whose pruned network has at least `factor` x fewer parameters."""
    from minivgg.models import VGG
    from minivgg.models.prune import select_channels
    total = model.num_params()
    for ratio in np.arange(1, 100) / 100:
        keep = select_channels(model, float(ratio), rule, min_channels)
        if total / VGG(**dict(model.config, channels=[len(k) for k in keep])).num_params() >= factor:
            return float(ratio)
    raise UsageError(f"--fewer-params {factor}: even removing 99% of the channels (keeping at least "
                     f"--min-channels {min_channels} per conv) leaves more parameters than that")


def cmd_distill(args) -> int:
    from minivgg import random_stream
    from minivgg.models import VGG
    teacher, ckpt = load_source(args.teacher)
    cfg = dict(teacher.config)
    if "channels" in cfg:
        cfg["channels"] = [max(1, c // args.shrink) for c in cfg["channels"]]
    else:
        cfg["width_ratio"] = cfg["width_ratio"] * args.shrink
    if isinstance(cfg.get("hidden"), list) and cfg["hidden"]:
        cfg["hidden"] = tuple(max(1, h // args.shrink) for h in cfg["hidden"])
    random_stream.seed(args.seed)
    try:
        student = VGG(**cfg)
    except ValueError as e:
        raise UsageError(f"--shrink {args.shrink}: {e}") from None
    train_set, val_set, split = fashion_mnist_split(ckpt, args.data_dir, args.train_subset)
    with_teacher = args.alpha > 0
    print(f"student: {student.num_params():,} parameters (teacher {teacher.num_params():,}), "
          f"{'distilled at T=%g, alpha=%g' % (args.temperature, args.alpha) if with_teacher else 'labels only'}")
    trainer = train(args, student, ckpt, train_set, val_set, split, Path(args.out), args.epochs,
                    teacher=teacher, note="distill" if with_teacher else "student without teacher")
    path = best_or_last(trainer, student)
    print(f"wrote {path}")
    score_on_test_set(args, ckpt, student, path, args.out)
    return 0


# -- int8 and fp16 ------------------------------------------------------------------------------------
def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "avx512vnni" in flags


def onnx_meta(ckpt, extra=None):
    m = ckpt["meta"]
    meta = {"image_size": m["image_size"], "channels": m["channels"], "mean": m["mean"], "std": m["std"],
            "scale": 1 / 255, "class_names": m["classes"], "config": ckpt["config"], "layout": "NCHW",
            "preprocessing": "resize to image_size (bilinear), convert to channels (L or RGB), "
                             "x = (pixel / 255 - mean) / std per channel, NCHW float32"}
    meta.update(extra or {})
    return meta


def cmd_quantize(args) -> int:
    from tqdm import tqdm
    from minivgg.deploy.onnx_int8 import build_int8_graph, export_int8
    from minivgg.quantize import quantize_vgg
    import onnxruntime as ort
    model, ckpt = load_source(args.checkpoint)
    pick = lambda n: np.sort(np.random.default_rng(0).permutation(n)[:args.calibration])   # noqa: E731
    train_set, _, _ = fashion_mnist_split(ckpt, args.data_dir, pick=pick)    # calibration: training images
    x = normalized(ckpt, train_set[0])                                       # (N, C, S, S)
    bits = (8 if has_vnni() else 7) if args.weight_bits == "auto" else int(args.weight_bits)
    bar = (lambda it: tqdm(it, desc="calibrating", unit="batch", file=sys.stderr)) if args.progress else None
    q = quantize_vgg(model, x, args.rule, args.percentile, weight_bits=bits, progress=bar)
    meta = onnx_meta(ckpt, {"precision": "int8", "quantization": q.calibration,
                            "source": str(Path(args.checkpoint).resolve())})
    path = export_int8(q, args.out, meta, doc=f"minivgg {ckpt['config']['arch']} int8 from {Path(args.checkpoint).name}")
    # verification: onnxruntime's integer kernels against the simulation, stage by stage, on 64 images
    sess = ort.InferenceSession(build_int8_graph(q, debug=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    xv = x[:64]
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": xv})))
    _, stages = q.features(xv, keep=True)
    worst = max(int(np.abs(outs[f"{n}.q"].astype(np.int32) - s.astype(np.int32)).max()) for n, s in stages.items())
    float_pred = model.forward(xv).argmax(1)
    print(f"wrote {path} ({path.stat().st_size:,} bytes; {bits}-bit weights, {args.rule} calibration on "
          f"{len(x)} images); onnxruntime vs minivgg's simulation: largest difference {worst} step(s) of "
          f"uint8 codes; top-1 agreement with float32 {np.mean(outs['logits'].argmax(1) == float_pred):.3f}")
    return 0 if worst <= 1 else 1


def cmd_fp16(args) -> int:
    from minivgg.deploy import OnnxPredictor, Predictor
    from minivgg.deploy.onnx_export import export_checkpoint
    path = export_checkpoint(args.checkpoint, args.out, precision="float16",
                             extra_meta={"source": str(Path(args.checkpoint).resolve())})
    ref, got = Predictor(args.checkpoint), OnnxPredictor(path)
    x = np.random.default_rng(0).standard_normal((8, ref.channels, *ref.image_size)).astype(np.float32)
    a, b = ref.logits(x), got.logits(x)
    err = float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-30))
    print(f"wrote {path} ({path.stat().st_size:,} bytes); onnxruntime float16 vs minivgg float32 on 8 random "
          f"inputs: max |diff| / max |logit| = {err:.1e}")
    return 0 if err < 1e-2 else 1


# -- the table --------------------------------------------------------------------------------------------
def model_counts(config, image_size, channels):
    """(parameters, mult-adds per image) of the float network a config describes."""
    from minivgg.models import build_model
    from minivgg.models.summary import trace
    model = build_model(config)
    rows = trace(model, (1, channels, *image_size))
    return model.num_params(), int(sum(r["macs"] for r in rows))


def run_ms(fn, x, repeat) -> list[float]:
    """One warm-up call, then `repeat` timed calls: their times in ms."""
    fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def cmd_table(args) -> int:
    import onnxruntime as ort
    from tqdm import tqdm
    from minivgg.data import load_fashion_mnist, prepare_images
    from minivgg.deploy import OnnxPredictor, Predictor
    from minivgg.deploy.onnx_export import export_checkpoint
    from minivgg.kernels.threads import get_num_threads
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, path in args.rows:   # load everything first: a bad file fails before any timing
        row = {"name": name, "path": str(path)}
        if path.suffix == ".npz":
            row["minivgg"] = Predictor(path)
            onnx_path = out.parent / f"{out.stem}.{name}.fp32.onnx"
            export_checkpoint(path, onnx_path)
            row["onnx_path"], row["precision"] = str(onnx_path), "float32"
        else:
            row["onnx_path"] = str(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        pred = OnnxPredictor(row["onnx_path"])
        pred.session = ort.InferenceSession(row["onnx_path"], so, providers=["CPUExecutionProvider"])
        row["onnx"] = pred
        props = pred.session.get_modelmeta().custom_metadata_map
        row.setdefault("precision", json.loads(props.get("precision", '"float32"')))
        row["source"] = json.loads(props["source"]) if "source" in props else None
        row["params"], row["mult_adds"] = model_counts(pred.config, pred.image_size, pred.channels)
        row["file_bytes"] = Path(row["onnx_path"]).stat().st_size
        rows.append(row)
    ref = rows[0]["onnx"]
    images, labels = load_fashion_mnist("test", args.data_dir, download=False)
    if args.test_subset:
        images, labels = images[:args.test_subset], labels[:args.test_subset]
    test = prepare_images(images, size=ref.image_size, channels=ref.channels)      # uint8 (N, C, S, S)
    for row in tqdm(rows, desc="test accuracy", disable=not args.progress, file=sys.stderr):
        engine = row.get("minivgg") or row["onnx"]
        correct = 0
        for s in range(0, len(labels), 250):
            correct += int((engine.logits(engine.normalize(test[s:s + 250])).argmax(1) == labels[s:s + 250]).sum())
        row["top1"] = correct / len(labels)
        row["top1_engine"] = "minivgg" if "minivgg" in row else "onnxruntime"
    batches = {b: rows[0]["onnx"].normalize(np.resize(test, (b, *test.shape[1:]))) for b in (1, 64)}
    timings = {(i, e, b): [] for i in range(len(rows)) for e in ("minivgg", "onnx") for b in batches}
    for _ in tqdm(range(args.rounds), desc="latency rounds", disable=not args.progress, file=sys.stderr):
        for i, row in enumerate(rows):      # interleaved: every model sees the same machine load
            for e in ("minivgg", "onnx"):
                if e in row:
                    for b, x in batches.items():
                        timings[(i, e, b)] += run_ms(row[e].logits, x, 5 if b == 1 else 2)
    by_path = {str(Path(r["path"]).resolve()): r for r in rows if r["path"].endswith(".npz")}
    for row in rows:   # int8 / fp16 rows: speed-up over their own float32 network, when it is a row
        src = by_path.get(row["source"]) if row["source"] else None
        row["source_row"] = src["name"] if src else None
    for i, row in enumerate(rows):
        for e in ("minivgg", "onnx"):
            for b in batches:
                t = timings[(i, e, b)]
                row[f"{e}_ms_b{b}"] = float(np.median(t)) if t else None
                row[f"{e}_best_ms_b{b}"] = float(np.min(t)) if t else None
    return write_table(args, rows, out, get_num_threads())


def write_table(args, rows, out, threads) -> int:
    import os
    import platform
    import onnxruntime as ort
    base, named = rows[0], {r["name"]: r for r in rows}
    ms = lambda v: "—" if v is None else f"{v:.2f} ms"   # noqa: E731
    x = lambda a, b: "" if a == b else f" ({a / b:.1f}x)"   # noqa: E731
    lines = ["| model | precision | parameters | mult-adds / image | ONNX file | test top-1 "
             "| minivgg b=1 | minivgg b=64 | onnxruntime b=1 | onnxruntime b=64 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        src = named.get(r.get("source_row")) or base
        speed = "" if r is src else f" ({src['onnx_ms_b64'] / r['onnx_ms_b64']:.2f}x faster than {src['name']})"
        lines.append(f"| {r['name']} | {r['precision']} | {r['params']:,}{x(base['params'], r['params'])} "
                     f"| {r['mult_adds'] / 1e6:.2f} M{x(base['mult_adds'], r['mult_adds'])} "
                     f"| {r['file_bytes'] / 1e3:,.0f} kB{x(src['file_bytes'], r['file_bytes'])} "
                     f"| {100 * r['top1']:.2f}%{'' if r['top1_engine'] == 'minivgg' else ' (onnxruntime)'} "
                     f"| {ms(r.get('minivgg_ms_b1'))} | {ms(r.get('minivgg_ms_b64'))} "
                     f"| {ms(r.get('onnx_ms_b1'))} | {ms(r.get('onnx_ms_b64'))}{speed} |")
    notes = ("(Nx): N times fewer parameters / mult-adds than the first row; N times smaller file and faster "
             "than the first row, or for int8 / fp16 rows than the float32 network they were made from. "
             "Latency: the median of every timed call; the fastest call at batch 64 in onnxruntime was "
             + ", ".join(f"{r['name']} {r['onnx_best_ms_b64']:.2f} ms" for r in rows) + ".")
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}"
              f" ({cpu_name()}), numpy {np.__version__}, onnxruntime {ort.__version__} ({args.threads} intra-op threads), "
              f"minivgg threads {threads}; load average {os.getloadavg()[0]:.1f} when the table was written; "
              f"{len(rows[0]['onnx'].classes)} classes, test images: "
              f"{args.test_subset or 10000:,}; latency: {args.rounds} rounds, every model timed in turn in each (batch 1: 5 calls, batch 64: 2 calls per round).")
    from minivgg.train.files import atomic_write_text
    atomic_write_text(out, header + "\n\n" + "\n".join(lines) + "\n\n" + notes + "\n")
    keep = ("name", "path", "onnx_path", "source_row", "precision", "params", "mult_adds", "file_bytes", "top1", "top1_engine",
            "minivgg_ms_b1", "minivgg_ms_b64", "onnx_ms_b1", "onnx_ms_b64", "minivgg_best_ms_b1",
            "minivgg_best_ms_b64", "onnx_best_ms_b1", "onnx_best_ms_b64")
    write_json(Path(str(out) + ".json"), {"header": header, "rows": [{k: r.get(k) for k in keep} for r in rows]})
    print(header + "\n\n" + "\n".join(lines))
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + (", AVX-512 VNNI" if has_vnni() else "")
    except OSError:
        pass
    return "unknown CPU"


def write_json(path, obj) -> None:
    from minivgg.train.files import atomic_write_text
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(obj, indent=1))


COMMANDS = {"prune": cmd_prune, "distill": cmd_distill, "quantize": cmd_quantize, "fp16": cmd_fp16,
            "table": cmd_table}


def main(argv=None) -> int:
    """Run the command; bad input is reported in one line (MINIVGG_DEBUG=1 shows the traceback)."""
    from minivgg.data import DataError, DatasetNotFoundError
    from minivgg.train import CheckpointError
    from minivgg.train.options import run_command
    args = make_parser().parse_args(argv)

    def command():
        check_args(args)
        return COMMANDS[args.command](args)
    # ImportError: an extra (onnx, onnxruntime) that is not installed
    return run_command(command, (UsageError, DataError, DatasetNotFoundError, CheckpointError,
                                 FileNotFoundError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
