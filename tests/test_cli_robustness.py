"""Issue 14 on the command line: a resumed run is the same run, and mistakes are named, not silent."""
import re

import numpy as np
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
