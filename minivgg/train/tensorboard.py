"""A run's scalars and pictures as TensorBoard event files, so `tensorboard --logdir DIR` shows it.

The files are written by tensorboardX (an optional extra: pip install 'minivgg[tensorboard]'),
a maintained writer of TensorBoard's event format that needs neither TensorFlow nor PyTorch.
After each epoch the Trainer's history row gives the scalars (every number in it: losses,
accuracies, the learning rate, images/s), each under its own tag with the epoch as the step;
the run's plots (history, confusion matrix, predictions) go in as images at the same step.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


class TensorBoardWriter:
    """TensorBoardWriter(logdir).epoch(row, epoch, images=[png paths]); .close() at the end."""

    def __init__(self, logdir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("writing TensorBoard files needs tensorboardX "
                              "(pip install 'minivgg[tensorboard]' or pip install tensorboardX)") from None
        self.logdir = Path(logdir)
        self._writer = SummaryWriter(logdir=str(self.logdir))

    def epoch(self, row: dict, epoch: int, images=()) -> list[str]:
        """Every finite number of `row` as a scalar, and each PNG of `images`; returns the tags."""
        tags = []
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            if key == "epoch" or not math.isfinite(float(value)):
                continue
            self._writer.add_scalar(key, float(value), int(epoch))
            tags.append(key)
        for path in images:
            from PIL import Image
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))                 # (H, W, 3) uint8
            tag = f"plots/{Path(path).stem}"
            self._writer.add_image(tag, pixels, int(epoch), dataformats="HWC")
            tags.append(tag)
        self._writer.flush()
        return tags

    def close(self) -> None:
        self._writer.close()
