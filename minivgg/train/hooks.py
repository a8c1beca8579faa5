"""The two things a training step does differently by setting, each behind one small hook, so that
Trainer.train_epoch reads as forward, loss, backward, step whatever the setting:

    precision  Float32: the model's own forward and backward, every step taken.
               Mixed (minivgg.amp): a float16 pass, a scaled backward, and a step skipped when a
               gradient overflowed; the overflow flag rides to the host with the loss.
    layout     OneProcess: nothing to combine, this process writes the files.
               DataParallel (minivgg.distributed): gradients averaged over the ranks before each step,
               the epoch's sums and evaluations summed over them, rank 0 alone writes, and every rank
               evaluates with rank 0's BatchNorm running statistics (as PyTorch DDP's default,
               broadcast_buffers=True: a rank's own running statistics are never used).
"""
from __future__ import annotations


class Float32:
    """float32 forward and backward: the model as it is."""

    def __init__(self, model):
        self.model = model
        self.overflow = False

    def forward(self, x):
        return self.model.forward(x)

    def backward(self, dlogits) -> None:
        self.model.backward(dlogits)

    def flag(self):
        """A 0-d device value to read back with the loss (here none)."""
        return None

    def take_step(self) -> bool:
        """Whether the optimizer steps on the gradients just made."""
        return True


class Mixed(Float32):
    """Mixed precision through a minivgg.amp.MixedPrecision: float16 passes, float32 master weights.

    flag() is the overflow flag of the step under way (ORed over its micro-batches); the Trainer reads
    it with the loss into .overflow, and take_step() lets the loss scaler skip that step.
    """

    def __init__(self, mixed):
        super().__init__(mixed.model)
        self.mixed, self.scaler = mixed, mixed.scaler
        self.found_inf = None          # 0-d bool on the device: a gradient of the step under way overflowed

    def forward(self, x):
        return self.mixed.forward(x)   # float32 logits of the float16 network

    def backward(self, dlogits) -> None:
        found = self.mixed.backward(dlogits)   # the model's grads come back float32, unscaled
        self.found_inf = found if self.found_inf is None else self.found_inf | found

    def flag(self):
        return self.found_inf

    def take_step(self) -> bool:
        take = self.scaler.update(self.overflow)   # inf/NaN gradients: skipped, the scale halves
        self.found_inf, self.overflow = None, False
        return take


class OneProcess:
    """One process: nothing to combine, and it writes the run's files."""

    writes = True

    def average_gradients(self, model, samples: int) -> None:
        pass

    def sum_epoch(self, partial: dict) -> dict:
        return partial

    def resumed_partial(self, saved: dict) -> dict:
        return saved

    def evaluation(self, model, run):
        """run() evaluates this process's loader; here that is the whole set."""
        return run()


class DataParallel(OneProcess):
    """K ranks of a minivgg.distributed.Distributed job, each with its shard of every batch."""

    def __init__(self, dist):
        self.dist = dist
        self.writes = dist.is_root   # rank 0 alone writes files

    def average_gradients(self, model, samples: int) -> None:
        self.dist.allreduce_gradients(model, samples)   # the global batch's gradient, on every rank

    def sum_epoch(self, partial: dict) -> dict:
        return self.dist.reduce_partial(partial)

    def resumed_partial(self, saved: dict) -> dict:
        # the saved sums are all ranks' together: rank 0 carries them, the others start from zero
        return saved if self.dist.is_root else {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}

    def evaluation(self, model, run):
        self.dist.broadcast_buffers(model)    # rank 0's running statistics on every rank, as DDP
        return self.dist.reduce_evaluation(run())   # each rank scored its shard
