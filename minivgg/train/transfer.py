"""Transfer learning's two moves: freeze the first K convolutional blocks, then, in a second
phase, unfreeze the top ones and fine-tune them at a lower learning rate (Keras's recipe).

A block is the convolutions of one resolution and the max-pool that ends it: VGG-11 has five
(conv1 | conv2 | conv3-4 | conv5-6 | conv7-8, each with its BatchNorm and ReLU). A frozen block
keeps its weights, computes no weight gradients, and its BatchNorm layers run in eval mode
(their running statistics normalise and stay as they are: Keras's rule);
below the lowest trainable layer, backward does nothing at all (layers/container.py).

The second phase (Unfreeze) starts at the beginning of epoch `at` (after `at` epochs): the
first `frozen` blocks stay frozen, the rest train; the optimizer starts afresh (no moments,
step counts from 0, as after Keras's compile) at the fine-tuning learning rate, with the
schedule, if any, restarted over the epochs that are left. Everything depends on the epoch
alone, so a run resumed in either phase, or across the change, is the run that never stopped.
"""
from __future__ import annotations

from ..layers import MaxPool2d


def conv_blocks(model) -> list[list[int]]:
    """Indices into model.features of each block: the layers up to and including each MaxPool2d."""
    blocks, current = [], []
    for i, m in enumerate(model.features.layers):
        current.append(i)
        if isinstance(m, MaxPool2d):
            blocks.append(current)
            current = []
    if current:   # layers after the last pool belong to the last block
        if blocks:
            blocks[-1] += current
        else:
            blocks.append(current)
    return blocks


def freeze_blocks(model, k) -> int:
    """Freeze the first k convolutional blocks of model.features and release the others;
    k = 'all' (or the number of blocks) freezes the whole base, 0 none. The head is left as it
    is. Returns the number of trainable parameters left."""
    blocks = conv_blocks(model)
    k = len(blocks) if k == "all" else k
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(blocks):
        raise ValueError(f"freeze_blocks: k must be an integer from 0 to {len(blocks)} (the model's "
                         f"convolutional blocks) or 'all', got {k!r}")
    for b, indices in enumerate(blocks):
        for i in indices:
            model.features.layers[i].freeze(b < k)
    return sum(int(p.size) for _, p, _ in model.named_parameters())


def frozen_blocks(model) -> int:
    """How many leading blocks are frozen (all of a block's layers with parameters frozen)."""
    count = 0
    for indices in conv_blocks(model):
        layers = [model.features.layers[i] for i in indices if model.features.layers[i].params]
        if not layers or not all(m.frozen for m in layers):
            break
        count += 1
    return count


class Unfreeze:
    """The second phase: from epoch `at` (0-based: after `at` epochs), only the first `frozen`
    blocks stay frozen; the optimizer restarts (empty state) at `lr`, and `schedule`, if given,
    makes the new schedule: schedule(optimizer, epochs_left) -> a minivgg.optim schedule or None.

    Trainer(unfreeze=Unfreeze(...)) applies it at the start of epoch `at`; a checkpoint records
    the phase it was saved in, and resuming one of the second phase applies it before the saved
    optimizer state and schedule are restored (a checkpoint of the first phase, even one saved
    at the end of epoch `at`, is restored as it is and changes phase at the next epoch).
    """

    def __init__(self, at: int, frozen: int = 0, lr: float | None = None, schedule=None):
        if isinstance(at, bool) or not isinstance(at, int) or at < 1:
            raise ValueError(f"Unfreeze: at must be an epoch >= 1 (the first phase needs one), got {at!r}")
        if isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0:
            raise ValueError(f"Unfreeze: frozen must be a number of blocks >= 0, got {frozen!r}")
        if lr is not None and not float(lr) > 0:
            raise ValueError(f"Unfreeze: lr must be > 0, got {lr!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"Unfreeze: schedule must be callable as schedule(optimizer, epochs), got {schedule!r}")
        self.at, self.frozen, self.lr, self.schedule = at, frozen, lr, schedule

    def due(self, epoch: int) -> bool:
        """Whether the second phase is on at the start of epoch `epoch` (completed epochs)."""
        return epoch >= self.at

    def apply(self, model, optimizer, epochs: int):
        """Unfreeze, restart the optimizer; returns the new schedule (or None)."""
        if frozen_blocks(model) < self.frozen:
            raise ValueError(f"Unfreeze: the first phase froze {frozen_blocks(model)} block(s), fewer "
                             f"than the {self.frozen} the second keeps frozen")
        freeze_blocks(model, self.frozen)
        optimizer.state = {}                     # fresh moments and step counts for every parameter
        if self.lr is not None:
            optimizer.lr = self.lr
        return self.schedule(optimizer, max(epochs - self.at, 1)) if self.schedule is not None else None

    def __repr__(self):
        return f"Unfreeze(at={self.at}, frozen={self.frozen}, lr={self.lr})"
