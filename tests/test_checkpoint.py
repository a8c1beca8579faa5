"""Checkpoints: a round trip restores everything; bad files and crashes fail loudly and safely."""
import json
import os

import numpy as np
import pytest

from minivgg import random_stream
from minivgg.layers import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from minivgg.optim import Adam, StepLR
from minivgg.train import CheckpointError, load_checkpoint, save_checkpoint
from minivgg.train.checkpoint import atomic_savez, checkpoint_arrays


def small_net(channels=4, seed=0):
    random_stream.seed(seed)
    net = Sequential(Conv2d(1, channels, 3, padding=1), BatchNorm2d(channels), ReLU(), MaxPool2d(2),
                     Flatten(), Linear(channels * 4 * 4, 3))
    net.config = {"arch": "tiny", "channels": channels}   # what a VGG carries in .config
    return net


def trained(net, steps=2):
    """One Adam + StepLR run, so the optimizer has moments and the schedule has moved."""
    opt = Adam(net, lr=1e-2)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    x = random_stream.get_rng().standard_normal((6, 1, 8, 8)).astype(np.float32)
    for _ in range(steps):
        out = net.forward(x)
        net.backward(np.ones_like(out) / out.size)
        opt.step()
        sched.step()
    return opt, sched


def test_round_trip_restores_weights_optimizer_schedule_rng_and_metadata(tmp_path):
    net = small_net()
    opt, sched = trained(net)
    history = [{"epoch": 1, "train_loss": 1.5}]
    path = save_checkpoint(tmp_path / "last.npz", net, opt, sched, epoch=3, extra={"class_names": ["a", "b", "c"]},
                           global_step=17, best_metric=0.75, history=history)
    after_save = random_stream.get_rng().random(4)              # the draws a resumed run must repeat

    other = small_net(seed=99)
    opt2 = Adam(other, lr=1.0)
    sched2 = StepLR(opt2, step_size=1, gamma=0.5)
    random_stream.seed(12345)
    ckpt = load_checkpoint(path, other, opt2, sched2, restore_rng=True)

    for name, a in net.state_dict().items():
        assert np.array_equal(a, other.state_dict()[name]), name
    assert opt2.lr == opt.lr and sched2.last_epoch == sched.last_epoch == 2
    for key, a in opt.state_dict().items():
        assert np.array_equal(a, opt2.state_dict()[key]), key
    assert np.array_equal(random_stream.get_rng().random(4), after_save)
    assert ckpt["config"] == net.config
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 17 and ckpt["best_metric"] == 0.75
    assert ckpt["history"] == history and ckpt["extra"]["class_names"] == ["a", "b", "c"]
    assert int(other.state_dict()["1.num_batches_tracked"]) == 2   # buffers travel too
    load_checkpoint(path, net)                            # into a model that has trained, too


def test_every_value_is_a_plain_array_readable_without_pickle(tmp_path):
    net = small_net()
    opt, sched = trained(net, steps=1)
    path = save_checkpoint(tmp_path / "c.npz", net, opt, sched)
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        assert json.loads(str(z["rng"][()])) == json.loads(json.dumps(random_stream.rng_state()))


def test_a_crash_while_writing_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    net = small_net()
    path = save_checkpoint(tmp_path / "last.npz", net, epoch=1)
    before = path.read_bytes()
    real_savez = np.savez

    def crash_midway(f, **arrays):                       # write part of an archive, then die
        real_savez(f, **dict(list(arrays.items())[:2]))
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_net(seed=5), epoch=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]
    assert load_checkpoint(path)["epoch"] == 1

    monkeypatch.setattr(np, "savez", real_savez)
    def no_rename(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small_net(seed=5), epoch=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]


@pytest.fixture
def saved(tmp_path):
    net = small_net()
    opt, sched = trained(net, steps=1)
    return save_checkpoint(tmp_path / "good.npz", net, opt, sched, epoch=1)


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    bad = tmp_path / "truncated.npz"
    data = saved.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.npz.*truncated, corrupt"):
        load_checkpoint(bad)


def test_corrupt_bytes_are_a_clear_error(saved, tmp_path):
    bad = tmp_path / "corrupt.npz"
    data = bytearray(saved.read_bytes())
    with np.load(saved) as z:   # find the biggest member's bytes and flip some of them
        key = max(z.files, key=lambda k: z[k].nbytes)
        payload = z[key].tobytes()
    at = bytes(data).find(payload) + len(payload) // 2
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt\.npz.*(CRC|corrupt)"):
        load_checkpoint(bad)


def test_files_that_are_not_checkpoints_are_rejected(tmp_path):
    other = tmp_path / "weights.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(CheckpointError, match="not a minivgg checkpoint"):
        load_checkpoint(other)
    text = tmp_path / "notes.npz"
    text.write_text("hello, not a zip")
    with pytest.raises(CheckpointError, match="notes.npz"):
        load_checkpoint(text)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array("minivgg-checkpoint"), payload=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled.npz"):   # allow_pickle=False: never unpickled
        load_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_checkpoint(tmp_path / "missing.npz")


def test_missing_key_is_named(tmp_path):
    arrays = checkpoint_arrays(small_net())
    del arrays["rng"]
    path = atomic_savez(tmp_path / "partial.npz", arrays)
    with pytest.raises(CheckpointError, match=r"partial\.npz.*missing key.*'rng'"):
        load_checkpoint(path)


def test_a_different_architecture_is_refused_with_expected_and_got(saved):
    wider = small_net(channels=8)
    before = wider.state_dict()["0.weight"].copy()
    with pytest.raises(CheckpointError, match=r"good\.npz.*config differs.*channels: checkpoint 4 vs model 8"):
        load_checkpoint(saved, wider)
    wider.config = {"arch": "tiny", "channels": 4}       # same config, different shapes
    with pytest.raises(CheckpointError, match=r"'0\.weight' has shape \(4, 1, 3, 3\).*expects \(8, 1, 3, 3\)"):
        load_checkpoint(saved, wider)
    assert np.array_equal(wider.state_dict()["0.weight"], before)   # nothing was half-loaded


def test_optimizer_of_another_kind_is_refused(saved):
    from minivgg.optim import SGD
    net = small_net()
    with pytest.raises(CheckpointError, match="optimizer state does not fit SGD"):
        load_checkpoint(saved, net, SGD(net, lr=0.1))


@pytest.mark.parametrize("key, value", [
    ("epoch", np.array("three")), ("global_step", np.arange(2)), ("best_metric", np.array("best")),
    ("format_version", np.array("1")), ("model/0.weight", np.array("weights")),
])
def test_an_entry_of_the_wrong_kind_is_refused_with_its_key(tmp_path, key, value):
    arrays = checkpoint_arrays(small_net())
    assert key in arrays
    arrays[key] = value
    path = atomic_savez(tmp_path / "odd.npz", arrays)
    with pytest.raises(CheckpointError, match=rf"odd\.npz: key '{key}' should hold"):
        load_checkpoint(path)


def test_a_directory_is_named_as_one(tmp_path, saved):
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "run").mkdir()
    saved.rename(tmp_path / "run" / "last.npz")
    with pytest.raises(CheckpointError, match=r"run is a directory.*did you mean .*run/last\.npz"):
        load_checkpoint(tmp_path / "run")


def with_raw_member(path, name="notes.txt", data=b"written by another tool"):
    """Append a zip member that is not an .npy array (as zip or another archiver would) to an .npz."""
    import zipfile
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name, data)
    return path


def test_a_member_that_is_not_an_array_is_named(saved):
    with pytest.raises(CheckpointError, match=r"good\.npz: member 'notes\.txt' is not a NumPy array"):
        load_checkpoint(with_raw_member(saved))


def test_resume_and_predict_name_a_raw_member_in_one_line(tmp_path, saved):
    from test_cli import PREDICT, TRAIN, cli
    with_raw_member(saved, "model/extra")
    for r in (cli(TRAIN, "--resume", saved, cwd=tmp_path),
              cli(PREDICT, "--checkpoint", saved, tmp_path / "x.png", cwd=tmp_path)):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "member 'model/extra' is not a NumPy array" in r.stderr.strip().splitlines()[-1], r.stderr
