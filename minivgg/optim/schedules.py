"""Learning-rate schedules: set `optimizer.lr` from the epoch (and, in warmup, the step).

Each schedule reads the optimizer's lr once, at construction, as its base lr,
and writes optimizer.lr from a closed form; the values equal those of
torch.optim.lr_scheduler (tests/test_schedules.py checks 20 epochs of each).

How a training loop drives them, the same for every schedule:
    after each optimizer.step():   scheduler.step_batch()   (only warmup moves)
    at the end of each epoch:      scheduler.step()
"""
from __future__ import annotations

import math

import numpy as np


class Schedule:
    """An epoch schedule: lr = lr_at(last_epoch), last_epoch counting step() calls."""

    def __init__(self, optimizer):
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"{type(self).__name__}: expected an optimizer with an lr, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_epoch = 0
        optimizer.lr = self.get_lr()

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> float:
        """The lr this schedule sets for the current epoch."""
        return self.lr_at(self.last_epoch)

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def step(self) -> None:
        """End of an epoch: move to the next one."""
        self.last_epoch += 1
        self.optimizer.lr = self.get_lr()

    def step_batch(self) -> None:
        """After an optimizer step: nothing, for an epoch schedule."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Progress as 0-d arrays (np.savez-safe); hyperparameters come from the constructor."""
        return {"type": np.array(type(self).__name__),
                "last_epoch": np.array(self.last_epoch, dtype=np.int64),
                "base_lr": np.array(self.base_lr, dtype=np.float64)}

    def load_state_dict(self, d: dict) -> None:
        d = _checked(self, d, ("last_epoch", "base_lr"))
        self.last_epoch, self.base_lr = int(d["last_epoch"]), float(d["base_lr"])
        self.optimizer.lr = self.get_lr()


def _checked(schedule, d: dict, keys: tuple[str, ...]) -> dict:
    """d with its type and keys checked against what `schedule` saves."""
    d = dict(d)
    name = type(schedule).__name__
    kind = str(np.asarray(d.get("type", "")))
    if kind != name:
        raise ValueError(f"{name}.load_state_dict: the state was saved by schedule {kind!r}")
    missing = sorted(set(keys) - set(d))
    unexpected = sorted(set(d) - set(keys) - {"type"})
    if missing or unexpected:
        raise KeyError(f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    return {k: np.asarray(v) for k, v in d.items()}


def _positive_int(value, what: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class StepLR(Schedule):
    """lr = base_lr * gamma ** (epoch // step_size): drop by gamma every step_size epochs."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size = _positive_int(step_size, "StepLR step_size")
        if not gamma > 0:
            raise ValueError(f"StepLR gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """lr = base_lr * gamma ** epoch: multiply by gamma (e.g. 0.92) every epoch."""

    def __init__(self, optimizer, gamma):
        if not gamma > 0:
            raise ValueError(f"ExponentialLR gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(Schedule):
    """Half a cosine from base_lr down to eta_min over T_max epochs (SGDR, no restarts):

        lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2

    Past T_max it climbs back up along the same cosine, as PyTorch's does.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.T_max = _positive_int(T_max, "CosineAnnealingLR T_max")
        if not eta_min >= 0:
            raise ValueError(f"CosineAnnealingLR eta_min must be >= 0, got {eta_min!r}")
        self.eta_min = float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearWarmup:
    """Ramp the lr up linearly over the first `warmup_steps` optimizer steps.

    With k the number of step_batch() calls so far (optimizer steps taken) and
    W = warmup_steps, the lr used by the next optimizer step is

        lr = min(1, (k + 1) / W) * after_lr

    so the steps use after_lr/W, 2 after_lr/W, ..., after_lr, and after_lr from
    then on. after_lr is the epoch schedule `after`'s lr at its current epoch
    (step() moves it on, one epoch at a time, during the warmup too), or the
    optimizer's lr at construction when there is none. Build `after` first, on
    the same optimizer: LinearWarmup(opt, 500, after=CosineAnnealingLR(opt, 30)).

    In PyTorch terms: LinearLR(opt, start_factor=1/W, end_factor=1,
    total_iters=W-1) stepped every batch, chained with `after` stepped every
    epoch on the same optimizer (chained schedules multiply).
    """

    def __init__(self, optimizer, warmup_steps, after: Schedule | None = None):
        self.warmup_steps = _positive_int(warmup_steps, "LinearWarmup warmup_steps")
        if after is not None and after.optimizer is not optimizer:
            raise ValueError("LinearWarmup: `after` must schedule the same optimizer")
        self.optimizer, self.after = optimizer, after
        self.base_lr = float(optimizer.lr) if after is None else after.base_lr
        self.batch_step = 0
        self._apply()

    def factor(self) -> float:
        return min(1.0, (self.batch_step + 1) / self.warmup_steps)

    def get_lr(self) -> float:
        return self.factor() * (self.base_lr if self.after is None else self.after.get_lr())

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @property
    def last_epoch(self) -> int:
        return 0 if self.after is None else self.after.last_epoch

    def _apply(self) -> None:
        self.optimizer.lr = self.get_lr()

    def step_batch(self) -> None:
        """After each optimizer step: one step further up the ramp."""
        self.batch_step += 1
        self._apply()

    def step(self) -> None:
        """End of an epoch: the `after` schedule moves on."""
        if self.after is not None:
            self.after.step()
        self._apply()

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {"type": np.array(type(self).__name__),
             "batch_step": np.array(self.batch_step, dtype=np.int64),
             "base_lr": np.array(self.base_lr, dtype=np.float64)}
        if self.after is not None:
            d.update({f"after.{k}": v for k, v in self.after.state_dict().items()})
        return d

    def load_state_dict(self, d: dict) -> None:
        after_keys = () if self.after is None else tuple(f"after.{k}" for k in self.after.state_dict())
        d = _checked(self, d, ("batch_step", "base_lr") + after_keys)
        if self.after is not None:
            self.after.load_state_dict({k[len("after."):]: v for k, v in d.items() if k.startswith("after.")})
        self.batch_step, self.base_lr = int(d["batch_step"]), float(d["base_lr"])
        self._apply()


SCHEDULES = ("none", "step", "exp", "cosine")


def make_scheduler(name, optimizer, epochs, steps_per_epoch=1, *, warmup_epochs=0.0, warmup_steps=None,
                   step_size=None, gamma=None, eta_min=None):
    """The schedule the CLI names, or None for a constant lr.

    name: "none" (constant), "step" (StepLR, step_size default epochs // 3,
    gamma default 0.1), "exp" (ExponentialLR, gamma default 0.92) or "cosine"
    (CosineAnnealingLR over all `epochs`, eta_min default 0). A warmup of
    `warmup_steps` optimizer steps (or round(warmup_epochs * steps_per_epoch))
    wraps it in LinearWarmup. An option that does not apply to `name` is an error.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    epochs = _positive_int(epochs, "epochs")
    given = {k for k, v in dict(step_size=step_size, gamma=gamma, eta_min=eta_min).items() if v is not None}
    allowed = {"none": set(), "step": {"step_size", "gamma"}, "exp": {"gamma"}, "cosine": {"eta_min"}}[name]
    if given - allowed:
        raise ValueError(f"schedule {name!r} takes no {', '.join(sorted(given - allowed))}")
    if name == "step":
        schedule = StepLR(optimizer, max(1, epochs // 3) if step_size is None else step_size, 0.1 if gamma is None else gamma)
    elif name == "exp":
        schedule = ExponentialLR(optimizer, 0.92 if gamma is None else gamma)
    elif name == "cosine":
        schedule = CosineAnnealingLR(optimizer, epochs, eta_min or 0.0)
    else:
        schedule = None
    if warmup_steps is None:
        warmup_steps = round(warmup_epochs * _positive_int(steps_per_epoch, "steps_per_epoch"))
    if warmup_steps < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup_steps}")
    return LinearWarmup(optimizer, warmup_steps, after=schedule) if warmup_steps > 0 else schedule
