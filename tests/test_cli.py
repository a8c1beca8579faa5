"""The command-line examples: --help, clean errors, a 5-step run on real Fashion-MNIST, resume, predict."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_vgg11.py"
PREDICT = ROOT / "examples" / "predict.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# the smallest VGG-11 that still is one: 1..8 channels, a 16-wide head
TINY = ["--width-ratio", "64", "--hidden", "16", "--batch-size", "8", "--no-progress"]


def cli(script, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("MINIVGG_DEBUG", None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_explains_every_option(tmp_path):
    r = cli(TRAIN, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for flag in ("--device", "--model", "--bn", "--dataset", "--data-dir", "--image-size", "--width-ratio",
                 "--hidden", "--head", "--epochs", "--batch-size", "--optimizer", "--lr", "--momentum",
                 "--weight-decay", "--schedule", "--warmup", "--label-smoothing", "--augment", "--no-augment",
                 "--seed", "--out", "--resume", "--freeze-features", "--max-steps", "--train-subset",
                 "--preset", "--accum-steps", "--patience", "--amp", "--amp-growth-interval"):
        assert flag in r.stdout, flag
    assert "d2l" in r.stdout and "examples:" in r.stdout and "folder:PATH" in r.stdout
    r = cli(PREDICT, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--top" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--image-size", "16"], r"--image-size 16 is too small"),
    (["--data-dir", "/nonexistent/fmnist"], r"--data-dir /nonexistent/fmnist does not exist"),
    (["--dataset", "folder:/nonexistent/photos"], r"/nonexistent/photos does not exist"),
    (["--dataset", "imagenet"], r"--dataset must be fashion-mnist or folder:PATH"),
    (["--resume", "garbage.npz"], r"garbage\.npz: cannot read the checkpoint"),
])
def test_bad_input_is_one_clean_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint at all")
    r = cli(TRAIN, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), r.stderr


def write_test_images(folder: Path) -> list[Path]:
    """An RGBA PNG and a grayscale JPEG of odd sizes: predict must convert and resize both."""
    rng = np.random.default_rng(0)
    rgba = folder / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8), "RGBA").save(rgba)
    gray = folder / "gray.jpg"
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), "L").save(gray)
    return [rgba, gray]


def predictions(stdout: str) -> dict:
    """{image: [probabilities in the order printed]} from predict.py's output."""
    out, current = {}, None
    for line in stdout.splitlines():
        m = re.match(r"\s+\d+\. .*?\s+([\d.]+)%$", line)
        if m:
            out[current].append(float(m.group(1)) / 100)
        else:
            current = line.strip()
            out[current] = []
    return out


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"real Fashion-MNIST not installed at {FMNIST} "
                                                 "(apt-get install dataset-fashion-mnist)")
def test_smoke_run_on_fashion_mnist_then_resume_then_predict(tmp_path):
    out = tmp_path / "run"
    # 40 images / batch 8 = 5 steps: one whole epoch, so the end-of-epoch files are written
    r = cli(TRAIN, *TINY, "--train-subset", "40", "--val-size", "16", "--test-subset", "32", "--epochs", "1",
            "--max-steps", "5", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("last.npz", "best.npz", "history.json", "history.csv", "history.png", "confusion.png",
                 "predictions.png", "mistakes.png", "test_confusion.png", "architecture.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "Total params" in r.stdout                                   # the model summary
    assert re.search(r"test set accuracy: top-1 [\d.]+, top-5 [\d.]+ \(32 images", r.stdout), r.stdout
    assert "plots:" in r.stdout and "last.npz" in r.stdout

    # resume: the options come from the checkpoint, only --epochs is new
    r = cli(TRAIN, "--resume", out / "last.npz", "--epochs", "2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after 2 epoch(s), 10 steps" in r.stdout

    images = write_test_images(tmp_path)
    r = cli(PREDICT, "--checkpoint", out / "best.npz", *images, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = predictions(r.stdout)
    assert set(got) == {str(p) for p in images}
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot")
    assert any(n in r.stdout for n in names)
    for probs in got.values():
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001


def test_amp_run_then_resume_keeps_mixed_precision(tmp_path):
    out = tmp_path / "amp"
    r = cli(TRAIN, *TINY, "--amp", "--amp-growth-interval", "2", "--train-subset", "24", "--val-size", "8",
            "--test-subset", "16", "--epochs", "1", "--no-plots", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"mixed precision: loss scale \d+, \d+ step\(s\) skipped", r.stdout), r.stdout
    r = cli(TRAIN, "--resume", out / "last.npz", "--epochs", "2", "--no-progress", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed precision: loss scale" in r.stdout          # --amp came back from the checkpoint


def test_folder_dataset_run_and_predict_top5_of_5_classes_sums_to_1(tmp_path):
    """An image folder of 5 classes: predict's 5 probabilities are the whole distribution."""
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for c in ("ant", "bee", "cat", "dog", "eel"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "run"
    r = cli(TRAIN, *TINY, "--dataset", f"folder:{root}", "--image-size", "32", "--epochs", "1",
            "--max-steps", "2", "--no-plots", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "20 training, 5 validation" in r.stdout and "stopped: max_steps" in r.stdout
    images = write_test_images(tmp_path)
    r = cli(PREDICT, "--checkpoint", out / "last.npz", *images, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for probs in predictions(r.stdout).values():
        assert len(probs) == 5 and abs(sum(probs) - 1) < 1e-3
    assert "ant" in r.stdout and "eel" in r.stdout

    r = cli(PREDICT, "--checkpoint", out / "last.npz", tmp_path / "missing.png", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.png" in r.stderr


def load_cli_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_vgg11", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_command_keeps_freed_memory_unless_told_not_to():
    cli_module = load_cli_module()
    assert cli_module.parse_args([]).keep_freed_memory is True
    assert cli_module.parse_args(["--no-keep-freed-memory"]).keep_freed_memory is False


def test_option_precedence_defaults_preset_flags():
    cli_module = load_cli_module()
    args = cli_module.parse_args([])
    assert args.model == "vgg11" and args.bn and args.image_size == 32 and args.pool_size == 1
    args = cli_module.parse_args(["--preset", "d2l"])
    assert (args.bn, args.width_ratio, args.image_size, args.optimizer, args.lr, args.epochs, args.batch_size,
            args.init, args.hidden, args.pool_size) == (False, 4, 224, "sgd", 0.05, 10, 128, "xavier",
                                                        (4096, 4096), 7)
    args = cli_module.parse_args(["--preset", "d2l", "--lr", "0.01", "--hidden", "none"])
    assert args.lr == 0.01 and args.hidden == () and args.optimizer == "sgd"    # flags beat the preset
    assert cli_module.parse_args(["--preset", "d2l-adam"]).optimizer == "adam"


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"real Fashion-MNIST not installed at {FMNIST} "
                    "(apt install dataset-fashion-mnist)")
def test_two_phase_transfer_on_the_command_line_resumes_exactly_and_keeps_its_phases(tmp_path):
    """--freeze-blocks 5 --unfreeze-at 1 --unfreeze-blocks 2: stopped in the second phase and resumed,
    the run ends with the uninterrupted run's weights and optimizer state; a resumed run refuses
    another --freeze-blocks by name."""
    common = [*TINY, "--train-subset", "64", "--val-size", "16", "--test-subset", "16", "--epochs", "2",
              "--freeze-blocks", "5", "--unfreeze-at", "1", "--unfreeze-blocks", "2", "--no-plots", "--seed", "1"]
    whole = cli(TRAIN, *common, "--out", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    part = cli(TRAIN, *common, "--out", "part", "--max-steps", "11", cwd=tmp_path)   # 8 steps an epoch
    assert part.returncode == 0, part.stderr
    resumed = cli(TRAIN, "--resume", "part/last.npz", "--no-progress", "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "whole" / "last.npz"), np.load(tmp_path / "part" / "last.npz")
    names = [k for k in a.files if k.startswith(("model/", "optim/", "sched/"))]
    assert any(k.startswith("optim/") for k in names)
    for k in names:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    import json
    phases = [row.get("phase") for row in json.loads(str(a["history"]))]
    assert len(set(phases)) == 2, phases          # the history says which phase each epoch trained in
    refused = cli(TRAIN, "--resume", "part/last.npz", "--freeze-blocks", "3", "--no-progress", cwd=tmp_path)
    assert refused.returncode == 2 and "--freeze-blocks" in refused.stderr, refused.stderr


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"real Fashion-MNIST not installed at {FMNIST} "
                    "(apt install dataset-fashion-mnist)")
def test_pretrained_weights_and_tensorboard_from_the_command_line(tmp_path):
    """--pretrained FILE builds the network the file holds and starts from its weights (frozen features
    keep them exactly; the head is new for 10 classes); --tensorboard DIR gets each epoch's scalars and plots.
    A 1-channel dataset is refused in one line before any training."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    from minivgg import random_stream
    from minivgg.models import VGG
    random_stream.seed(5)
    source = VGG("vgg11_bn", num_classes=1000, in_channels=3, width_ratio=16, hidden=(32, 32), pool_size=1)
    weights = {k: np.array(v) for k, v in source.state_dict().items()}   # (ascontiguousarray makes 0-d 1-d)
    save_file(weights, str(tmp_path / "vgg11_bn.safetensors"))
    common = [*TINY, "--pretrained", "vgg11_bn.safetensors", "--train-subset", "32", "--val-size", "16",
              "--test-subset", "16", "--epochs", "2"]
    r = cli(TRAIN, *common, "--channels", "3", "--freeze-features", "--tensorboard", "tb", "--out", "run",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = np.load(tmp_path / "run" / "last.npz")
    feature_keys = [k for k in weights if k.startswith("features.")]
    assert feature_keys
    for k in feature_keys:
        np.testing.assert_array_equal(ckpt[f"model/{k}"], weights[k], err_msg=k)
    assert ckpt["model/classifier.6.weight"].shape == (10, 32)            # a new 10-class head
    from test_tensorboard import read_events
    tags = {v.tag for e in read_events(tmp_path / "tb") for v in e.summary.value}
    assert {"train_loss", "val_top1", "lr"} <= tags and any(t.startswith("plots/") for t in tags), tags
    r = cli(TRAIN, *common, "--out", "gray", cwd=tmp_path)
    assert r.returncode == 2 and "3-channel" in r.stderr and "Traceback" not in r.stderr, r.stderr
