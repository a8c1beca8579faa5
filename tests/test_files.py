"""Atomic writes: a failure or a kill mid-write leaves the old file whole; a kill's temp file is cleared later."""
import json

import numpy as np
import pytest

from minivgg.train.checkpoint import atomic_savez
from minivgg.train.files import atomic_write, remove_stale_temps


class Kill(BaseException):
    """Stands for SIGKILL/Ctrl-C arriving halfway through a write."""


def test_a_write_interrupted_halfway_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "history.json"
    target.write_text('[{"epoch": 1}]')

    def half(f):
        f.write(b'[{"epoch": 1}, {"ep')
        raise Kill

    with pytest.raises(Kill):
        atomic_write(target, half)
    assert json.loads(target.read_text()) == [{"epoch": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_a_failed_write_names_the_target_not_the_temp_file(tmp_path):
    (tmp_path / "eval.json").mkdir()   # a folder in the way: the rename fails
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "eval.json", lambda f: f.write(b"{}"))
    assert e.value.filename == str(tmp_path / "eval.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_history_is_replaced_whole_when_a_row_fails_midway(tmp_path):
    """history.csv was written row by row into the open file: a failure left it truncated."""
    from minivgg.layers import Linear
    from minivgg.optim import SGD
    from minivgg.train import Trainer

    class Boom(float):   # JSON writes it (float.__repr__); the CSV writer's str() is killed
        def __str__(self):
            raise Kill
        __repr__ = __str__

    model = Linear(2, 2)
    t = Trainer(model, SGD(model, lr=0.1), [], out_dir=tmp_path, plots=False, progress=False)
    t.history = [{"epoch": 1, "train_loss": 0.5}]
    t.write_history()
    before = (tmp_path / "history.csv").read_text()
    t.history += [{"epoch": 2, "train_loss": 0.4}, {"epoch": 3, "train_loss": Boom(0.3)}]
    with pytest.raises(Kill):
        t.write_history()
    assert (tmp_path / "history.csv").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_temps_left_by_a_kill_are_removed_at_the_next_start(tmp_path):
    from minivgg.layers import Linear
    from minivgg.optim import SGD
    from minivgg.train import Trainer

    stale = [tmp_path / ".last.npz.k3j_9a2b.tmp", tmp_path / ".history.json.abcdefgh.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    mine = tmp_path / ".notes.txt.abcdefgh.tmp"   # not a name minivgg writes: left alone
    mine.write_text("user's")
    model = Linear(2, 2)
    Trainer(model, SGD(model, lr=0.1), [], out_dir=tmp_path, plots=False, progress=False).fit(0)
    assert not any(p.exists() for p in stale) and mine.exists()
    assert remove_stale_temps(tmp_path) == []


def test_atomic_savez_is_loadable_and_leaves_no_temp(tmp_path):
    atomic_savez(tmp_path / "x.npz", {"a": np.arange(3)})
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
