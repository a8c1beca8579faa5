"""Issue 14 on the command line: a resumed run is the same run, and mistakes are named, not silent."""
import re

import numpy as np
from PIL import Image
import pytest

from test_cli import FMNIST, TINY, TRAIN, cli

needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"real Fashion-MNIST not installed at {FMNIST}")
# 48 images / batch 8 = 6 steps an epoch; every option the resume must take from the checkpoint is non-default
RUN = [*TINY, "--train-subset", "48", "--val-size", "24", "--test-subset", "16", "--epochs", "2", "--lr", "1e-3",
       "--no-plots"]


def run_state(path):
    """The arrays a resumed run must reproduce exactly: weights, optimizer state, progress."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("model/", "optim/", "sched/")) or k in ("epoch",
                                                                                                  "global_step")}


@needs_fmnist
def test_resume_with_only_resume_equals_the_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = cli(TRAIN, *RUN, "--out", whole, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(TRAIN, *RUN, "--max-steps", "8", "--out", cut, cwd=tmp_path)   # stops inside epoch 2
    assert r.returncode == 0 and "max_steps" in r.stdout, r.stderr[-3000:]
    r = cli(TRAIN, "--resume", cut / "last.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 validation" in r.stdout and "after 2 epoch(s), 12 steps" in r.stdout, r.stdout
    a, b = run_state(whole / "last.npz"), run_state(cut / "last.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@needs_fmnist
@pytest.mark.parametrize("flag, value", [("--lr", "0.5"), ("--val-size", "10"), ("--batch-size", "4"),
                                         ("--model", "vgg13")])
def test_resume_refuses_an_option_it_cannot_change_by_name(tmp_path, flag, value):
    out = tmp_path / "run"
    r = cli(TRAIN, *RUN, "--max-steps", "2", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(TRAIN, "--resume", out / "last.npz", flag, value, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{flag} " in lines[0] and "cannot change on --resume" in lines[0], r.stderr
    r = cli(TRAIN, "--resume", out / "last.npz", "--lr", "1e-3", "--max-steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]   # the value the run was started with is fine


def test_out_that_is_a_file_is_refused_before_the_data_loads(tmp_path):
    (tmp_path / "taken").write_text("a file")
    r = cli(TRAIN, *TINY, "--data-dir", tmp_path, "--out", tmp_path / "taken", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()   # (--data-dir holds no data: the check came first)
    assert len(lines) == 1 and "--out" in lines[0] and "taken is a file" in lines[0], r.stderr


@needs_fmnist
def test_a_failed_write_is_one_line_naming_the_file_and_the_checkpoint_stands(tmp_path):
    out = tmp_path / "run"
    (out / "history.json").mkdir(parents=True)   # something in the way of the first history write
    r = cli(TRAIN, *RUN, "--max-steps", "6", "--out", out, cwd=tmp_path)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(out / "history.json") in lines[-1], r.stderr
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    np.load(out / "last.npz", allow_pickle=False).close()   # written before, and whole


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], r"--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], r"--lr must be a finite number > 0, got nan"),
    (["--lr", "-0.1"], r"--lr must be a finite number > 0, got -0.1"),
    (["--momentum", "nan"], r"--momentum must be a finite number >= 0"),
])
def test_bad_flags_are_refused_by_name(tmp_path, args, message):
    r = cli(TRAIN, *TINY, "--train-subset", "16", "--max-steps", "1", "--no-plots", *args, "--out", tmp_path / "run",
            cwd=tmp_path)   # (bounded, should a flag slip through)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder:"], r"--dataset folder: needs the folder's path"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1"),
    (["--crop-padding", "-1"], r"--crop-padding must be >= 0, got -1"),
    pytest.param(["--val-size", "60000"], r"--val-size 60000 leaves no training images: the training set has "
                 r"60,000", marks=needs_fmnist),
])
def test_bad_data_flags_are_refused_by_name(tmp_path, args, message):
    test_bad_flags_are_refused_by_name(tmp_path, args, message)


def test_a_missing_dataset_folder_leaves_no_run_folder_behind(tmp_path):
    # the default --out is runs/<model>-folder-<path>: the missing folder must be found before it is made
    r = cli(TRAIN, *TINY, "--dataset", "folder:no_such_photos", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_photos" in lines[0] and "not a folder" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists(), sorted(p.name for p in (tmp_path / "runs").iterdir())


def image_tree(root, classes, n=5, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_one_class_folder_says_the_classes_may_be_one_level_down(tmp_path):
    image_tree(tmp_path / "photos" / "train", ["cat", "dog"])
    r = cli(TRAIN, *TINY, "--dataset", f"folder:{tmp_path / 'photos'}", "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "one class sub-folder (train)" in line and f"try {tmp_path / 'photos' / 'train'}" in line, r.stderr


def test_unreadable_images_are_all_named_and_can_be_skipped(tmp_path):
    root = tmp_path / "photos"
    image_tree(root, ["cat", "dog"], n=6)
    bad = [root / "cat" / "broken.png", root / "dog" / "empty.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    bad[1].write_bytes(b"")
    run = [*TINY, "--dataset", f"folder:{root}", "--epochs", "1", "--max-steps", "1", "--no-plots",
           "--out", tmp_path / "run"]
    r = cli(TRAIN, *run, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 unreadable image(s)" in lines[0] and "--skip-bad-images" in lines[0], r.stderr
    assert all(str(p) in lines[0] for p in bad), r.stderr
    r = cli(TRAIN, *run, "--skip-bad-images", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning: --skip-bad-images")]
    assert len(warning) == 1 and all(str(p) in warning[0] for p in bad), r.stderr
    assert "UserWarning" not in r.stderr
    assert not list((tmp_path / "run").glob("*.png"))   # --no-plots: not even the test confusion matrix
    assert "plots:" not in r.stdout


def test_a_constant_channel_suggests_no_normalize(tmp_path):
    root = tmp_path / "photos"
    for c in ("black", "also_black"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (36, 36)).save(root / c / f"{i}.png")
    r = cli(TRAIN, *TINY, "--dataset", f"folder:{root}", "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "constant" in r.stderr and "--no-normalize" in r.stderr.strip().splitlines()[-1], r.stderr


def test_a_directory_given_as_checkpoint_says_it_is_a_directory(tmp_path):
    from test_cli import PREDICT
    (tmp_path / "run").mkdir()
    r = cli(TRAIN, "--resume", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(PREDICT, "--checkpoint", tmp_path / "run", tmp_path / "x.png", cwd=tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_crop_padding_agrees_with_its_default(tmp_path):
    r = cli(TRAIN, "--help", cwd=tmp_path)
    text = " ".join(r.stdout.split())
    start = text.rindex("--crop-padding P")   # the entry, not the usage line
    help_text = re.match(r"--crop-padding P (.*?\(default: [^)]*\))", text[start:]).group(1)
    assert "(default: 0)" in help_text and "default S/8" not in help_text, help_text


def test_a_resumed_folder_run_refuses_a_folder_whose_file_list_changed(tmp_path):
    root = tmp_path / "photos"
    image_tree(root, ["cat", "dog"], n=6)
    out = tmp_path / "run"
    run = [*TINY, "--dataset", f"folder:{root}", "--epochs", "2", "--no-plots", "--out", out]
    r = cli(TRAIN, *run, "--max-steps", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    Image.new("RGB", (36, 36)).save(root / "dog" / "added.png")
    r = cli(TRAIN, "--resume", out / "last.npz", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--dataset folder:{root}: the folder's file list changed" in lines[0], r.stderr
    assert "(12 image files then, 13 now)" in lines[0] and "start a new run" in lines[0], r.stderr
    (root / "dog" / "added.png").unlink()   # put back as it was: the run continues
    r = cli(TRAIN, "--resume", out / "last.npz", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and "training stopped: completed after 2 epoch(s)" in r.stdout, r.stderr[-3000:]


def test_stream_with_skip_bad_images_leaves_out_a_dangling_link_and_says_so(tmp_path):
    root = tmp_path / "photos"
    image_tree(root, ["cat", "dog"], n=6)
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    run = [*TINY, "--dataset", f"folder:{root}", "--stream", "--epochs", "1", "--max-steps", "1", "--no-plots",
           "--out", tmp_path / "run"]
    r = cli(TRAIN, *run, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--skip-bad-images" in r.stderr, r.stderr[-3000:]
    r = cli(TRAIN, *run, "--skip-bad-images", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning: --skip-bad-images")]
    assert len(warning) == 1 and "gone.png" in warning[0], r.stderr
