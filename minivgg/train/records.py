"""What a run leaves besides checkpoints: history.json / .csv, eval.json and the plots, each written atomically.

Kept out of trainer.py so that the training loop reads on its own; the Trainer calls these
after every epoch (write_history, draw_run).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from . import plots
from .files import atomic_write_text


def write_history(out_dir, history: list[dict], last_eval: dict | None, epoch: int, class_names) -> None:
    """history.json (every row), history.csv (the scalar columns), eval.json (the last evaluation)."""
    out = Path(out_dir)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    cols = []
    for row in history:
        cols += [k for k, v in row.items() if not isinstance(v, (list, dict)) and k not in cols]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "history.csv", table.getvalue())
    if last_eval is not None:
        ev = last_eval
        atomic_write_text(out / "eval.json", json.dumps({
            "epoch": epoch, "loss": ev["loss"], "top1": ev["top1"], "top5": ev["top5"],
            "class_names": class_names,
            "per_class": [None if math.isnan(a) else float(a) for a in ev["per_class"]],
            "confusion": ev["confusion"].tolist()}, indent=1))


def draw_run(out_dir, history: list[dict], last_eval: dict | None, epoch: int, class_names,
             mean=None, std=None) -> list[Path]:
    """history.png, and from the last evaluation confusion.png, predictions.png, mistakes.png.

    mean, std: the normalisation to undo so the example images look like images.
    """
    out = Path(out_dir)
    paths = [plots.plot_history(history, out / "history.png")]
    ev = last_eval
    if ev is None:
        return paths
    paths.append(plots.plot_confusion(ev["confusion"], class_names, out / "confusion.png",
                                      title=f"validation, epoch {epoch}"))
    for key, name, title in (("examples", "predictions.png", "validation predictions"),
                             ("mistakes", "mistakes.png", "misclassified validation images")):
        ex = ev.get(key)
        if ex is None:
            ex = {"images": np.zeros((0, 1, 1, 1)), "labels": [], "preds": [], "probs": []}
        paths.append(plots.plot_image_grid(ex["images"], ex["labels"], ex["preds"], ex["probs"],
                                           class_names, out / name,
                                           title=f"{title}, epoch {epoch}", mean=mean, std=std))
    return paths
