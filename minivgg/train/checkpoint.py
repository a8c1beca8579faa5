"""Checkpoints: one .npz that can resume a run exactly, written atomically and read without pickle.

Layout of the archive (every value a NumPy array, so np.load(allow_pickle=False) reads it
and nothing in the file can run code):

    format            0-d str   "minivgg-checkpoint"         (tells a checkpoint from any .npz)
    format_version    0-d int64 FORMAT_VERSION
    model/<name>      the model's state_dict: weights and buffers, torch-style dotted names
    optim/<name>      optimizer.state_dict(): flat {str: ndarray}
    sched/<name>      scheduler.state_dict(): flat {str: ndarray} (absent without a schedule)
    rng               0-d str, JSON of random_stream.rng_state() (the shared CPU generator)
    layer_rngs        0-d str, JSON {module name: state} for layers with their own generator
    config            0-d str, JSON of model.config (how to rebuild the model; "null" if none)
    history           0-d str, JSON list of per-epoch dicts
    epoch             0-d int64 completed epochs
    global_step       0-d int64 optimizer steps taken
    best_metric       0-d float64 best validation accuracy so far (NaN before the first)
    extra             0-d str, JSON of anything else (class names, normalisation, data options)

Writing: the archive goes to a temporary file in the target's directory, is flushed and
fsync'ed, then os.replace'd over the target. A crash at any moment leaves either the old
checkpoint or the new one, never half of one; a temporary file a kill leaves is removed at the
next start in that folder (files.remove_stale_temps).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import backend, random_stream
from ..layers.base import state_dict_mismatch
from .files import atomic_write

FORMAT = "minivgg-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "rng", "layer_rngs", "config", "history",
             "epoch", "global_step", "best_metric", "extra")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# -- JSON that survives NumPy scalars -------------------------------------------------
def _plain(obj):
    """NumPy scalars and arrays -> Python numbers and lists, recursively, for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):   # numpy or cupy array
        return backend.to_numpy(obj).tolist()
    return obj


def _json_array(obj) -> np.ndarray:
    return np.array(json.dumps(_plain(obj), allow_nan=True))


# -- saving ---------------------------------------------------------------------------
def _layer_rngs(model) -> dict:
    """States of generators that layers own (Dropout(seed=...)), so they resume too."""
    states = {}
    for name, m in model.modules():
        rng = getattr(m, "_rng", None)
        if isinstance(rng, np.random.Generator):
            states[name] = rng.bit_generator.state
    return states


def checkpoint_arrays(model, optimizer=None, scheduler=None, epoch=0, global_step=0,
                      best_metric=None, history=None, extra=None) -> dict:
    """Everything a checkpoint holds, as {key: np.ndarray} ready for np.savez."""
    arrays = {"format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION, dtype=np.int64)}
    for name, a in model.state_dict().items():
        arrays[f"model/{name}"] = np.asarray(backend.to_numpy(a))
    if optimizer is not None:
        for name, a in optimizer.state_dict().items():
            arrays[f"optim/{name}"] = np.asarray(backend.to_numpy(a))
    if scheduler is not None:
        for name, a in scheduler.state_dict().items():
            arrays[f"sched/{name}"] = np.asarray(backend.to_numpy(a))
    arrays["rng"] = _json_array(random_stream.rng_state())
    arrays["layer_rngs"] = _json_array(_layer_rngs(model))
    arrays["config"] = _json_array(getattr(model, "config", None))
    arrays["history"] = _json_array(history or [])
    arrays["epoch"] = np.array(int(epoch), dtype=np.int64)
    arrays["global_step"] = np.array(int(global_step), dtype=np.int64)
    arrays["best_metric"] = np.array(math.nan if best_metric is None else float(best_metric), dtype=np.float64)
    arrays["extra"] = _json_array(extra or {})
    for key, a in arrays.items():
        if a.dtype == object:
            raise TypeError(f"save_checkpoint: '{key}' would need pickle (dtype object); "
                            "store numbers, strings or arrays only")
    return arrays


def atomic_savez(path, arrays: dict) -> Path:
    """np.savez into a temp file beside `path`, fsync, then rename over `path` (see files.atomic_write)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_checkpoint(path, model, optimizer=None, scheduler=None, epoch=0, extra=None, *,
                    global_step=0, best_metric=None, history=None) -> Path:
    """Write a checkpoint atomically (see the module docstring for what it holds)."""
    arrays = checkpoint_arrays(model, optimizer, scheduler, epoch=epoch, global_step=global_step,
                               best_metric=best_metric, history=history, extra=extra)
    return atomic_savez(path, arrays)


# -- loading --------------------------------------------------------------------------
def _read_json(path, key, a):
    try:
        return json.loads(str(a[()]))
    except (ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: key '{key}' should hold a JSON string, got "
                              f"dtype {a.dtype} shape {a.shape} ({e})") from e


def _scalar(path, key, a, kinds):
    """A 0-d number of one of the dtype kinds ('i' int, 'u' unsigned, 'f' float) as a Python number."""
    if a.shape != () or a.dtype.kind not in kinds:
        raise CheckpointError(f"{path}: key '{key}' should hold one number ({'an integer' if kinds == 'iu' else 'a float'}), "
                              f"got dtype {a.dtype} shape {a.shape}")
    return int(a) if kinds == "iu" else float(a)


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, restore_rng=False) -> dict:
    """Read a checkpoint; with `model` (and optimizer, scheduler) given, restore them too.

    Returns a dict: model, optimizer and scheduler (flat {name: array}), rng, layer_rngs,
    config, history, epoch, global_step, best_metric (None if never set), extra,
    format_version, path. Raises FileNotFoundError for a missing file and CheckpointError
    (a ValueError) naming the path and the problem for anything unreadable or unfitting.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file"
                              + (f" (did you mean {path / 'last.npz'}?)" if (path / "last.npz").is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}      # reads (and CRC-checks) every member now
    except AttributeError:  # np.load returned a bare array (a .npy file): no context manager
        raise CheckpointError(f"{path}: is a single .npy array, not a minivgg checkpoint (.npz)") from None
    except Exception as e:  # BadZipFile, EOFError, CRC errors, bad .npy headers, ...
        raise CheckpointError(f"{path}: cannot read the checkpoint, the file is truncated, corrupt "
                              f"or not an .npz archive ({type(e).__name__}: {e})") from e
    for k, a in raw.items():   # a member another tool wrote without the .npy header reads as bytes
        if not isinstance(a, np.ndarray):
            raise CheckpointError(f"{path}: member '{k}' is not a NumPy array (raw {type(a).__name__} "
                                  f"of {len(a):,} bytes, written without np.savez?); a checkpoint holds only arrays")
    if raw.get("format") is None or raw["format"].shape != () or str(raw["format"][()]) != FORMAT:
        raise CheckpointError(f"{path}: is an .npz file but not a minivgg checkpoint (no '{FORMAT}' "
                              f"marker under key 'format'); keys found: {sorted(raw)[:8]}")
    version = _scalar(path, "format_version", raw["format_version"], "iu") if "format_version" in raw else None
    if version is None or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this minivgg reads "
                              f"versions up to {FORMAT_VERSION}; upgrade minivgg")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing key(s) {missing}")
    weights = {k[len("model/"):]: a for k, a in raw.items() if k.startswith("model/")}
    for k, a in raw.items():   # weights, buffers and optimizer state are numbers, never strings
        if k.startswith(("model/", "optim/state.")) and a.dtype.kind not in "fiub":
            raise CheckpointError(f"{path}: key '{k}' should hold a numeric array, got dtype {a.dtype}")
    if not weights:
        raise CheckpointError(f"{path}: checkpoint holds no model weights (no 'model/...' keys)")
    best = _scalar(path, "best_metric", raw["best_metric"], "fiu")
    ckpt = {
        "path": str(path),
        "format_version": version,
        "model": weights,
        "optimizer": {k[len("optim/"):]: a for k, a in raw.items() if k.startswith("optim/")},
        "scheduler": {k[len("sched/"):]: a for k, a in raw.items() if k.startswith("sched/")},
        "rng": _read_json(path, "rng", raw["rng"]),
        "layer_rngs": _read_json(path, "layer_rngs", raw["layer_rngs"]),
        "config": _read_json(path, "config", raw["config"]),
        "history": _read_json(path, "history", raw["history"]),
        "epoch": _scalar(path, "epoch", raw["epoch"], "iu"),
        "global_step": _scalar(path, "global_step", raw["global_step"], "iu"),
        "best_metric": None if math.isnan(best) else best,
        "extra": _read_json(path, "extra", raw["extra"]),
    }
    if model is not None:
        restore(ckpt, model, optimizer, scheduler, restore_rng=restore_rng)
    return ckpt


def _config_diff(saved: dict, own: dict) -> str:
    keys = sorted(set(saved) | set(own))
    return ", ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs model {own.get(k, '<absent>')!r}"
                     for k in keys if saved.get(k, "<absent>") != own.get(k, "<absent>"))


def check_compatible(ckpt: dict, model) -> None:
    """Raise CheckpointError unless the checkpoint's architecture is the model's."""
    path = ckpt.get("path", "checkpoint")
    own_config = _plain(getattr(model, "config", None))
    saved_config = ckpt.get("config")
    if saved_config is not None and own_config is not None and saved_config != own_config:
        diff = (_config_diff(saved_config, own_config)
                if isinstance(saved_config, dict) and isinstance(own_config, dict) else
                f"checkpoint {saved_config!r} vs model {own_config!r}")
        raise CheckpointError(f"{path}: saved from a different architecture; config differs ({diff})")
    problem = state_dict_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        raise CheckpointError(f"{path}: weights do not fit the model: {problem} (a different architecture?)")


def restore(ckpt: dict, model, optimizer=None, scheduler=None, restore_rng=False) -> None:
    """Load a checkpoint dict (from load_checkpoint) into model, optimizer and scheduler."""
    path = ckpt.get("path", "checkpoint")
    check_compatible(ckpt, model)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        if not ckpt["optimizer"]:
            raise CheckpointError(f"{path}: holds no optimizer state (saved without an optimizer)")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit {type(optimizer).__name__} "
                                  f"({type(e).__name__}: {e})") from e
    if scheduler is not None:
        if not ckpt["scheduler"]:
            raise CheckpointError(f"{path}: holds no LR schedule state, but a scheduler "
                                  f"({type(scheduler).__name__}) was given")
        try:
            scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: LR schedule state does not fit {type(scheduler).__name__} "
                                  f"({type(e).__name__}: {e})") from e
    if restore_rng:
        restore_rng_state(ckpt, model)


def restore_rng_state(ckpt: dict, model=None) -> None:
    """Put the shared generator (and layers' own ones) back where the checkpoint left them."""
    random_stream.set_rng_state(ckpt["rng"])
    if model is not None:
        for name, m in model.modules():
            state = ckpt["layer_rngs"].get(name)
            rng = getattr(m, "_rng", None)
            if state is not None and isinstance(rng, np.random.Generator):
                rng.bit_generator.state = state
