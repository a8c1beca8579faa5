"""examples/extract_features.py: features of a trained VGG, a linear head trained on them alone."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")


def run(script, *args, cwd):
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_head_on_extracted_features_learns_new_classes(tmp_path):
    r = run("train_vgg11.py", "--width-ratio", "16", "--hidden", "16", "--batch-size", "16",
            "--no-progress", "--train-subset", "200", "--val-size", "32", "--test-subset", "32",
            "--epochs", "1", "--no-plots", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("extract_features.py", "--checkpoint", "run/best.npz", "--classes", "5,7,9",
            "--train-images", "150", "--test-images", "150", "--epochs", "100", "--no-progress",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "features: 32 per image (avg pooling), 150 train and 150 test images" in r.stdout
    train, test = map(float, re.search(r"train ([\d.]+)%, test ([\d.]+)%", r.stdout).groups())
    assert train > 60 and test > 45, r.stdout          # chance is 33.3% on three classes


@pytest.mark.parametrize("args,message", [
    (["--classes", "5,x"], "--classes: expected comma-separated integers"),
    (["--classes", "5,5"], "--classes: expected distinct Fashion-MNIST classes 0..9"),
    (["--train-images", "0"], "--train-images: must be at least 1"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    r = run("extract_features.py", "--checkpoint", "none.npz", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_missing_checkpoint_is_one_line(tmp_path):
    r = run("extract_features.py", "--checkpoint", "none.npz", cwd=tmp_path)
    assert r.returncode == 2 and "none.npz" in r.stderr and "Traceback" not in r.stderr
