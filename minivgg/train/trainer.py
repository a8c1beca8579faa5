"""The training loop: micro-batches, gradient accumulation, evaluation, checkpoints, plots, resume.

One optimizer step = forward + backward on `accum_steps` micro-batches, their gradients
summed and divided by the number of micro-batches summed: accum_steps, or fewer for the
last, partial group of an epoch (layers' backward overwrites grads, so the sum is kept
here), optional clipping, then optimizer.step(). Each epoch ends with an evaluation, the
history (JSON and CSV), the plots, last.npz and, when validation accuracy improves, best.npz.

Resuming is exact on the CPU: a checkpoint stores the weights, optimizer and schedule state,
the random generator, the epoch and the micro-batches already done in it; the loader's order
is a function of (seed, epoch) through loader.set_epoch, so the resumed run draws the same
batches, the same augmentation and the same dropout masks as one that never stopped.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .. import backend
from ..amp import LossScaler, MixedPrecision
from ..losses import SoftmaxCrossEntropy
from . import records
from .checkpoint import CheckpointError, atomic_savez, checkpoint_arrays, load_checkpoint, restore
from .files import remove_stale_temps
from .hooks import DataParallel, Float32, Mixed, OneProcess
from .metrics import evaluate


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN or infinite loss (or gradient norm, or validation score), or a training loss
    that exploded past Trainer's explode_factor bound; nothing was saved after it.

    `kept` says what is on disk (the Trainer knows which checkpoint it wrote or resumed from), `advice`
    what to change; batch None means the value came from the validation after `epoch`.
    """

    def __init__(self, what, value, epoch, step, batch, checkpoint, kept=None, kind="non-finite", why="",
                 lr=None, clipped=None, has_bn=None):
        self.what, self.value, self.epoch, self.step, self.batch = what, value, epoch, step, batch
        self.checkpoint = checkpoint
        # the facts a caller turns into advice (the command line names its flags): None = not known
        self.lr, self.clipped, self.has_bn = lr, clipped, has_bn
        facts = ([f"the step's lr was {lr:.3g}"] if lr is not None else []) + (
            [f"gradients were {'' if clipped else 'not '}clipped"] if clipped is not None else []) + (
            [f"the model {'has' if has_bn else 'has no'} BatchNorm"] if has_bn is not None else [])
        if kept is None:
            kept = (f"the last good checkpoint {checkpoint} is untouched" if checkpoint and Path(checkpoint).exists()
                    else "no checkpoint had been written yet")
        where = (f"at epoch {epoch}, step {step} (batch {batch} of the epoch)" if batch is not None
                 else f"in the validation after epoch {epoch} (step {step})")
        super().__init__(f"{kind} {what} ({value}){why} {where}: training stopped; {kept}"
                         + (f" ({'; '.join(facts)})" if facts else ""))


def freeze_features(model, frozen: bool = True):
    """Fix (or release) the convolutional trunk for fine-tuning: only the head trains.

    Frozen layers are skipped by named_parameters(), so the optimizer leaves them alone.
    Returns the number of trainable parameters left.
    """
    model.features.freeze(frozen)
    return sum(int(p.size) for _, p, _ in model.named_parameters())


def skip_input_grad(model) -> bool:
    """Let the network's first layer skip dL/dx: the images need no gradient.

    PyTorch skips it too (the input does not require grad). Only done when the
    first layer in forward order is one that can skip it (Conv2d); returns
    whether it was.
    """
    first = model
    while first.children():
        first = first.children()[0][1]
    if hasattr(first, "needs_input_grad"):
        first.needs_input_grad = False
        return True
    return False


_skip_first_input_grad = skip_input_grad   # the Trainer argument of that name shadows it


def _trainable(model):
    """(layer, key) for every trainable parameter, in named_parameters order."""
    return [(m, k) for _, m in model.modules() if not m.frozen for k in m.params]


class Trainer:
    """Fit a model and keep everything a run leaves behind in `out_dir`.

    out_dir receives last.npz (every epoch), best.npz (best validation top-1),
    history.json / history.csv, eval.json (last confusion matrix and per-class accuracy)
    and history.png, confusion.png, predictions.png, mistakes.png.

    accum_steps   micro-batches per optimizer step (gradients averaged over them; an epoch's
                  last group may be shorter and is averaged over its own count)
    skip_input_grad  opt-in (default False): set the first layer's needs_input_grad = False
                  so it skips dL/dx of the images, as PyTorch does; model.backward then
                  returns None (no saliency maps from that model until you set it back)
    clip_norm     clip the global gradient norm to this value before each step
    patience      stop after this many epochs without a better validation top-1
    explode_factor  stop (NonFiniteLossError) when a training loss exceeds explode_factor x
                  max(the run's first loss, 1): a loss that grows 10,000-fold has diverged even while
                  finite (None: only NaN / inf stop the run). A non-finite validation loss stops it too.
    max_steps     stop after this many optimizer steps in total (checkpoint written)
    extra         JSON-able dict stored in checkpoints (normalisation, image size ...)
    plots         draw the PNGs after every epoch (keep_examples images per grid)
    progress      show tqdm progress bars (loss, accuracy, lr, images/s)
    checkpoints   write last.npz / best.npz (off for quick experiments)
    device        'cpu' or 'gpu[:N]': the model is moved there; the loaders must yield
                  arrays on the same device (DataLoader(device=...))
    scheduler     a minivgg.optim schedule: step_batch() after every optimizer step
                  (warmup), step() at the end of every epoch
    loss_fn       the training loss (default SoftmaxCrossEntropy()); validation always
                  reports plain cross-entropy, without label smoothing
    distributed   a minivgg.distributed.Distributed for data-parallel training: gradients are
                  all-reduced right before optimizer.step(), epoch metrics are summed over the
                  ranks, and only rank 0 writes files (the loaders must be the rank's shards)
    amp           mixed precision (minivgg.amp): True, or a LossScaler with its own settings;
                  forward and backward run in float16, the model, optimizer and loss stay
                  float32, a step whose gradients overflow is skipped (it still counts)
    unfreeze      a minivgg.train.transfer.Unfreeze: the second phase of fine-tuning (top blocks
                  unfrozen, optimizer restarted at the fine-tuning lr) from its epoch on; resuming
                  in either phase, or across the change, is exact
    on_epoch      called as on_epoch(row, plots) after each epoch's files are written, on the rank
                  that writes (row: the history row; plots: the PNG paths drawn, [] without plots),
                  e.g. TensorBoardWriter.epoch for --tensorboard

    Precision (float32 or amp) and layout (one process or data parallel) are the two hooks of
    hooks.py, .precision and .layout: train_epoch calls them and nothing else of either.

    Without a val_loader, best.npz follows the training accuracy.
    """

    def __init__(self, model, optimizer, train_loader, val_loader=None, loss_fn=None, scheduler=None,
                 out_dir="runs/x", accum_steps=1, clip_norm=None, patience=None, class_names=None,
                 device="cpu", max_steps=None, extra=None, plots=True, progress=True,
                 keep_examples=32, checkpoints=True, skip_input_grad=False, distributed=None,
                 explode_factor=1e4, amp=False, unfreeze=None, on_epoch=None):
        if int(accum_steps) < 1:
            raise ValueError(f"Trainer: accum_steps must be >= 1, got {accum_steps}")
        if patience is not None and int(patience) < 1:
            raise ValueError(f"Trainer: patience must be >= 1 or None, got {patience}")
        self.model = model.to(device) if device != "cpu" else model
        if skip_input_grad:   # opt-in: it changes what model.backward returns
            _skip_first_input_grad(self.model)
        if amp not in (False, None) and distributed is not None:
            raise ValueError("Trainer: amp with distributed is not supported yet (the overflow flag "
                             "would need an all-reduce over the ranks)")
        self.amp = None if amp in (False, None) else \
            MixedPrecision(self.model, amp if isinstance(amp, LossScaler) else LossScaler())
        # the two hooks a step goes through (hooks.py): float32 or mixed precision; one process or K ranks
        self.precision = Float32(self.model) if self.amp is None else Mixed(self.amp)
        self.layout = OneProcess() if distributed is None else DataParallel(distributed)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.loss_fn = loss_fn or SoftmaxCrossEntropy()
        self.eval_loss_fn = SoftmaxCrossEntropy()   # validation loss without label smoothing
        self.out_dir = Path(out_dir)
        self.accum_steps, self.clip_norm = int(accum_steps), clip_norm
        self.patience, self.max_steps = patience, max_steps
        self.class_names = list(class_names) if class_names is not None else None
        self.device, self.extra = device, dict(extra or {})
        self.plots, self.progress, self.keep_examples = plots, progress, keep_examples
        self.checkpoints = checkpoints
        self.distributed = distributed
        self.writes = self.layout.writes   # data parallel: rank 0 alone writes files
        self.explode_factor = explode_factor
        self.first_loss = None         # the run's first training loss: the explosion bound's scale
        self.good = None               # (path, epoch) of the last checkpoint this run wrote or resumed from
        # where the run stands; all of it goes into checkpoints
        self.epoch = 0                 # completed epochs
        self.global_step = 0           # optimizer steps taken
        self.batch_in_epoch = 0        # micro-batches done in the epoch under way
        self.partial = self._fresh_partial()
        self._group = self._fresh_group()   # the accumulation group under way
        self.history: list[dict] = []
        self.best_metric = None
        self.bad_epochs = 0
        self.stop_reason = None
        self.last_eval = None
        self.unfreeze, self.second_phase = unfreeze, False
        self.on_epoch = on_epoch
        self.epochs = None             # the run's total, set by fit (the second phase's schedule needs it)

    # -- paths -------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.npz"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.npz"

    @staticmethod
    def _fresh_partial():
        return {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}

    @staticmethod
    def _fresh_group():
        """The micro-batches of the optimizer step under way: gradient sums, how many, their images."""
        return {"sums": {}, "count": 0, "samples": 0}

    # -- checkpoints -----------------------------------------------------------------------
    def _arrays(self):
        extra = dict(self.extra)
        extra["class_names"] = self.class_names
        partial = self.layout.sum_epoch(self.partial)
        extra["trainer"] = {"batch_in_epoch": self.batch_in_epoch, "partial": partial,
                            "bad_epochs": self.bad_epochs, "accum_steps": self.accum_steps,
                            "first_loss": self.first_loss, "second_phase": self.second_phase}
        if self.amp is not None:
            extra["trainer"]["loss_scaler"] = self.amp.scaler.state_dict()
        return checkpoint_arrays(self.model, self.optimizer, self.scheduler, epoch=self.epoch,
                                 global_step=self.global_step, best_metric=self.best_metric,
                                 history=self.history, extra=extra)

    def save(self, path=None, best: bool = False) -> Path:
        """Write the whole run state (atomically) to `path`, default out_dir/last.npz, and with best=True
        the same arrays to best.npz. The one place checkpoints are written. Data parallel: every rank
        calls it (the epoch sums are reduced over the ranks), rank 0 alone writes."""
        arrays = self._arrays()
        path = Path(path or self.last_path)
        if self.writes:
            atomic_savez(path, arrays)
            if best:
                atomic_savez(self.best_path, arrays)
        self.good = (path, self.epoch)
        return path

    def resume(self, path) -> dict:
        """Restore model, optimizer, schedule, RNG and progress from a checkpoint."""
        ckpt = load_checkpoint(path)
        if self.unfreeze is not None and ckpt["extra"].get("trainer", {}).get("second_phase"):
            self._enter_second_phase()   # saved in it: its optimizer state and schedule are the second's
        restore(ckpt, self.model, self.optimizer, self.scheduler, restore_rng=True)
        state = ckpt["extra"].get("trainer", {})
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.history, self.best_metric = ckpt["history"], ckpt["best_metric"]
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.partial = self.layout.resumed_partial(dict(state.get("partial") or self._fresh_partial()))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.first_loss = state.get("first_loss")
        self.good = (Path(path), self.epoch)
        if self.amp is not None and "loss_scaler" in state:   # a float32 run's checkpoint starts a fresh scale
            self.amp.scaler.load_state_dict(state["loss_scaler"])
        if self.class_names is None and ckpt["extra"].get("class_names"):
            self.class_names = ckpt["extra"]["class_names"]
        if self.batch_in_epoch % self.accum_steps:
            raise CheckpointError(f"{path}: saved after {self.batch_in_epoch} micro-batches of an epoch, "
                             f"not a multiple of accum_steps={self.accum_steps}; resume with the "
                             "accumulation the run was saved with")
        return ckpt

    def _enter_second_phase(self):
        """Unfreeze the top blocks, restart the optimizer at the fine-tuning lr (Unfreeze.apply)."""
        if self.epochs is None and self.unfreeze.schedule is not None:
            raise ValueError("Trainer: the second phase's schedule needs the run's epochs: call fit(epochs)")
        self.scheduler = self.unfreeze.apply(self.model, self.optimizer, self.epochs or 0)
        self.second_phase = True
        if self.progress:
            tqdm.write(f"second phase from epoch {self.unfreeze.at + 1}: {self.unfreeze.frozen} block(s) stay "
                       f"frozen, {sum(int(p.size) for _, p, _ in self.model.named_parameters()):,} trainable "
                       f"parameters, lr {self._lr():.2e}", file=sys.stderr)

    # -- one optimizer step ------------------------------------------------------------------
    def _stop(self, what, value, batch, kind="non-finite", why=""):
        """The NonFiniteLossError for this run: what is really on disk, advice that fits it."""
        if not self.checkpoints:
            kept = "checkpoints are off, so nothing was saved"
        elif self.good is not None:
            kept = f"the last good checkpoint {self.good[0]} is untouched (epoch {self.good[1]})"
        else:
            kept = "no checkpoint of this run had been written yet" + (
                f" ({self.last_path} is from an earlier run)" if self.last_path.exists() else "")
        has_bn = any("BatchNorm" in type(m).__name__ for _, m in self.model.modules())
        step = self.global_step + 1 if batch is not None else self.global_step   # validation: after the step
        return NonFiniteLossError(what, value, epoch=self.epoch + 1, step=step, batch=batch,
                                  checkpoint=self.good[0] if self.good else None, kept=kept,
                                  kind=kind, why=why, lr=self._lr(), clipped=self.clip_norm is not None,
                                  has_bn=has_bn)

    def _check_finite(self, what, value, batch):
        if not math.isfinite(value):
            raise self._stop(what, value, batch)

    def _check_loss(self, loss, batch):
        """Non-finite, or past explode_factor x the run's first loss: the run has diverged."""
        self._check_finite("loss", loss, batch)
        if self.first_loss is None:
            self.first_loss = loss
        elif self.explode_factor is not None and loss > self.explode_factor * max(self.first_loss, 1.0):
            raise self._stop("loss", loss, batch, kind="exploding",
                             why=f", over {self.explode_factor:g} x the run's first loss {self.first_loss:.4g},")

    def _read_step(self, y, batch, loss, correct, norm=None):
        """The step's one device-to-host copy: loss, correct count (and gradient norm), checked.

        Runs after backward and before the optimizer step, so a non-finite value stops the
        run with the weights untouched. A NaN loss on the GPU may mean a bad label (the loss
        checks labels on the device): then the labels are read back and named. With mixed
        precision the overflow flag rides along; a step that overflowed is skipped, its norm unchecked.
        """
        xp = backend.get_array_module(loss)
        parts = {"loss": loss, "correct": correct}
        if norm is not None:
            parts["norm"] = norm
        flag = self.precision.flag()
        if flag is not None:
            parts["overflow"] = flag
        stacked = xp.stack([xp.asarray(v, dtype=xp.float64) for v in parts.values()])
        values = dict(zip(parts, backend.to_numpy(stacked).tolist()))  # one copy to the host
        if flag is not None:
            self.precision.overflow = bool(values["overflow"])
            if self.precision.overflow:
                values.pop("norm", None)
        if not math.isfinite(values["loss"]) and hasattr(self.loss_fn, "check_labels"):
            self.loss_fn.check_labels(y, self.loss_fn.cache[0].shape[1])
        self._check_loss(values["loss"], batch)
        if "norm" in values:
            self._check_finite("gradient norm", values["norm"], batch)
        return values["loss"], int(values["correct"])

    def _add_gradients(self, n: int, step_now: bool):
        """Add this micro-batch's gradients (of `n` images) to the step's; at the step's last micro-batch,
        return _step_gradients(). Layers' backward overwrites grads, so with accum_steps > 1 the sum is
        kept here."""
        g = self._group
        if self.accum_steps > 1:
            for i, (m, k) in enumerate(_trainable(self.model)):
                grad = m.grads.get(k)
                if grad is None:
                    continue
                if i in g["sums"]:
                    g["sums"][i] += grad
                else:
                    g["sums"][i] = grad.copy()
        g["count"] += 1
        g["samples"] += n
        return self._step_gradients() if step_now else None

    def _step_gradients(self):
        """The step's gradients: averaged over its micro-batches (accum_steps, or fewer for an epoch's
        last group), then over the ranks, then clipped. Returns the gradient norm (0-d, on the device)
        when clipping, else None."""
        g = self._group
        if g["count"] > 1:
            for i, (m, k) in enumerate(_trainable(self.model)):
                if i in g["sums"]:
                    m.grads[k] = g["sums"][i] * g["sums"][i].dtype.type(1.0 / g["count"])
        self.layout.average_gradients(self.model, g["samples"])
        if self.clip_norm is None:
            return None
        from ..optim import clip_grad_norm
        return clip_grad_norm(self.model, self.clip_norm, sync=False)

    def _step(self, batch_in_epoch=None) -> None:
        """The optimizer step (unless mixed precision skips it: it still counts), then the warmup."""
        if self.precision.take_step():
            self.optimizer.step()
        self.global_step += 1
        if self.scheduler is not None and hasattr(self.scheduler, "step_batch"):
            self.scheduler.step_batch()   # only a warmup moves per step
        self._group = self._fresh_group()
        if batch_in_epoch is not None:
            self.batch_in_epoch = batch_in_epoch

    # -- an epoch ----------------------------------------------------------------------------
    def _lr(self):
        return float(getattr(self.optimizer, "lr", float("nan")))

    def _micro_batches(self, loader, total):
        """(i, x, y, step_now) for the epoch's micro-batches still to do: a resumed run skips the ones
        trained before its checkpoint; step_now marks the last of each accumulation group."""
        skip = self.batch_in_epoch   # a multiple of accum_steps (resume() checks it)
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            yield i, x, y, (i + 1 - skip) % self.accum_steps == 0 or i + 1 == total

    def _micro_batch(self, x, y):
        """Forward, loss and backward on one micro-batch: (loss, correct count), both 0-d on x's device.
        Nothing is read back here: the caller reads both (and the gradient norm) in one copy. A
        subclass with another loss (CompressTrainer: a teacher, a sparsity term) overrides this."""
        logits = self.precision.forward(x)                              # (B, K)
        loss = self.loss_fn(logits, y)                                  # ()
        self.precision.backward(self.loss_fn.backward())                # the model's grads
        correct = (logits.argmax(axis=1) == y).sum()                    # ()
        return loss, correct

    def train_epoch(self, epoch_index: int, total_epochs: int) -> bool:
        """Train one epoch (or what is left of it). Returns False if max_steps cut it short."""
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch_index)
        self.model.train()
        try:
            total = len(loader)
        except TypeError:
            total = None
        bar = tqdm(total=total, initial=self.batch_in_epoch, desc=f"epoch {epoch_index + 1}/{total_epochs}",
                   disable=not self.progress, dynamic_ncols=True, leave=True, file=sys.stderr, unit="batch")
        t0 = time.perf_counter()
        try:
            for i, x, y, step_now in self._micro_batches(loader, total):
                if self.max_steps is not None and self.global_step >= self.max_steps:
                    return False
                loss, correct = self._micro_batch(x, y)                 # forward, loss, backward
                norm = self._add_gradients(int(y.shape[0]), step_now)
                loss, correct = self._read_step(y, i + 1, loss, correct, norm)
                if step_now:
                    self._step(batch_in_epoch=i + 1)
                self._tally(bar, t0, int(y.shape[0]), loss, correct)
            if self._group["count"]:   # a loader without len(): the last, partial accumulation
                norm = self._step_gradients()
                if norm is not None:
                    self._check_finite("gradient norm", float(norm), self.batch_in_epoch + self._group["count"])
                self._step()
        finally:
            bar.close()
            self.partial["time"] += time.perf_counter() - t0
        return True

    def _tally(self, bar, t0, n, loss, correct) -> None:
        """The epoch's running sums (they go into checkpoints) and the progress bar."""
        p = self.partial
        p["loss_sum"] += loss * n
        p["correct"] += correct
        p["seen"] += n
        elapsed = p["time"] + time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.4f}", acc=f"{p['correct'] / p['seen']:.3f}",
                        lr=f"{self._lr():.2e}", img_s=f"{p['seen'] / max(elapsed, 1e-9):.0f}", refresh=False)

    def evaluate(self, loader, desc=None, keep_examples: int = 0) -> dict:
        """minivgg.train.evaluate of the model on `loader`, with plain cross-entropy; a tqdm bar when `desc`
        is given. Data parallel: each rank scores its shard with rank 0's BatchNorm running statistics
        and the figures are summed over the ranks (hooks.DataParallel)."""
        if desc is not None:
            loader = tqdm(loader, desc=desc, disable=not self.progress, leave=False, file=sys.stderr,
                          dynamic_ncols=True, unit="batch")
        return self.layout.evaluation(
            self.model, lambda: evaluate(self.model, loader, self.eval_loss_fn, keep_examples=keep_examples))

    def _end_epoch(self, epoch_index: int) -> dict:
        p = self.layout.sum_epoch(self.partial)
        row = {"epoch": epoch_index + 1, "steps": self.global_step, "lr": self._lr(),
               "train_loss": p["loss_sum"] / max(p["seen"], 1), "train_acc": p["correct"] / max(p["seen"], 1),
               "time_s": p["time"], "images_per_s": p["seen"] / max(p["time"], 1e-9)}
        if self.unfreeze is not None:
            row["phase"] = 2 if self.second_phase else 1
        if self.amp is not None:
            row.update(loss_scale=self.amp.scaler.scale, skipped_steps=self.amp.scaler.skipped_steps)
        if self.val_loader is not None:
            ev = self.evaluate(self.val_loader, f"eval {epoch_index + 1}",
                               keep_examples=self.keep_examples if self.plots else 0)
            self.last_eval = ev
            row.update(val_loss=ev["loss"], val_top1=ev["top1"], val_top5=ev["top5"],
                       val_per_class=[None if math.isnan(a) else float(a) for a in ev["per_class"]])
        return row

    # -- the run -----------------------------------------------------------------------------
    def fit(self, epochs: int, resume=None) -> list[dict]:
        """Train until `epochs` epochs are complete in total (a resumed run counts the old ones).

        Returns the history. Sets .stop_reason to 'completed', 'early_stopping' or 'max_steps'.
        Raises NonFiniteLossError on a NaN/inf loss or validation score, or an exploding loss
        (see explode_factor), leaving the last checkpoint as it was.
        """
        self.epochs = epochs
        if resume is not None:
            self.resume(resume)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.writes:
            remove_stale_temps(self.out_dir)   # what a kill during a write left behind
        self.stop_reason = "completed"
        while self.epoch < epochs:
            e = self.epoch
            if self.unfreeze is not None and not self.second_phase and self.unfreeze.due(e):
                self._enter_second_phase()
            if not self.train_epoch(e, epochs):
                self.stop_reason = "max_steps"
                if self.checkpoints:
                    self.save()   # mid-epoch: last.npz alone
                break
            row = self._end_epoch(e)
            for key in ("val_loss", "val_top1"):   # diverged weights must not become last.npz / best.npz
                if key in row and not math.isfinite(row[key]):
                    raise self._stop(f"validation {key[4:]}", row[key], None)
            if self.scheduler is not None:
                self.scheduler.step()
            self.history.append(row)
            self.epoch, self.batch_in_epoch, self.partial = e + 1, 0, self._fresh_partial()
            metric = row.get("val_top1", row["train_acc"])
            improved = self.best_metric is None or metric > self.best_metric
            if improved:
                self.best_metric, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
            if self.checkpoints:
                self.save(best=improved)
            if self.writes:
                self.write_history()
            drawn = self.draw() if self.plots and self.writes else []
            if self.on_epoch is not None and self.writes:
                self.on_epoch(row, drawn)
            if self.progress:
                tqdm.write(self.describe(row) + (" (best)" if improved else ""), file=sys.stderr)
            if self.patience is not None and self.bad_epochs >= self.patience:
                self.stop_reason = "early_stopping"
                if self.progress:
                    tqdm.write(f"early stopping: no better validation accuracy for {self.bad_epochs} "
                               f"epochs (best {self.best_metric:.4f})", file=sys.stderr)
                break
            if self.max_steps is not None and self.global_step >= self.max_steps:
                self.stop_reason = "max_steps"
                break
        return self.history

    @staticmethod
    def describe(row: dict) -> str:
        s = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}")
        if "val_top1" in row:
            s += f" | val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.4f} top-5 {row['val_top5']:.4f}"
        return s + f" | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s"

    # -- files ------------------------------------------------------------------------------
    def write_history(self) -> None:
        """history.json, history.csv and eval.json, atomically (minivgg/train/records.py)."""
        records.write_history(self.out_dir, self.history, self.last_eval, self.epoch, self.class_names)

    def _display_norm(self):
        norm = self.extra.get("normalize")
        if norm:
            return norm.get("mean"), norm.get("std")
        norm = getattr(self.val_loader, "normalizer", None)   # a minivgg.data.Normalize
        return (norm.mean, norm.std) if norm is not None else (None, None)

    def draw(self) -> list[Path]:
        """history.png, and from the last evaluation confusion.png, predictions.png, mistakes.png."""
        mean, std = self._display_norm()
        return records.draw_run(self.out_dir, self.history, self.last_eval, self.epoch, self.class_names,
                                mean=mean, std=std)
