"""TensorBoard files: read back record by record (TFRecord framing, Event protobufs)."""
import struct

import numpy as np
import pytest

pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

from minivgg.train.tensorboard import TensorBoardWriter  # noqa: E402


def read_events(logdir):
    """Every Event in every events file of logdir: [uint64 length][crc][data][crc] per record."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def test_scalars_and_images_read_back(tmp_path):
    from PIL import Image
    png = tmp_path / "history.png"
    Image.fromarray(np.full((6, 10, 3), 200, np.uint8)).save(png)
    w = TensorBoardWriter(tmp_path / "tb")
    w.epoch({"epoch": 1, "train_loss": 1.5, "val_top1": 0.5, "lr": 0.002, "note": "x",
             "bad": float("nan")}, 1, images=[png])
    w.epoch({"epoch": 2, "train_loss": 0.75, "val_top1": 0.625, "lr": 0.001}, 2)
    w.close()
    scalars, images = {}, {}
    for e in read_events(tmp_path / "tb"):
        for v in e.summary.value:
            if v.HasField("image"):
                images[(v.tag, e.step)] = (v.image.height, v.image.width)
            else:
                scalars[(v.tag, e.step)] = v.simple_value
    assert scalars == {("train_loss", 1): 1.5, ("val_top1", 1): 0.5, ("lr", 1): pytest.approx(0.002),
                       ("train_loss", 2): 0.75, ("val_top1", 2): 0.625, ("lr", 2): pytest.approx(0.001)}
    assert images == {("plots/history", 1): (6, 10)}
