"""How well a classifier does: top-k accuracy, the confusion matrix, per-class accuracy, evaluate().

Notation: N samples, K classes. The helpers below work on host (NumPy) arrays. evaluate()
counts on the logits' own device and reads its totals back once at the end, so evaluating
on the GPU costs no copy per batch (only while it still collects example images).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..losses import SoftmaxCrossEntropy


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max so exp() cannot overflow. (N, K) -> (N, K)."""
    z = logits - logits.max(axis=1, keepdims=True)              # (N, K)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: is the true class among the k highest logits?

    k=1 is argmax == label (the first index wins a tie, as np.argmax). For k > 1 a sample
    counts when fewer than k classes score strictly higher than the true class.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if k == 1:
        return logits.argmax(axis=1) == labels
    true_score = logits[np.arange(len(labels)), labels][:, None]  # (N, 1)
    return (logits > true_score).sum(axis=1) < k


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of samples whose label is in the top k (k is capped at K)."""
    k = min(k, np.asarray(logits).shape[1])
    return float(topk_correct(logits, labels, k).mean())


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    K = int(num_classes)
    return np.bincount(labels * K + preds, minlength=K * K).reshape(K, K)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(K,) float: the diagonal over each row's total; NaN for a class with no samples."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


class _Keeper:
    """Collects up to `limit` examples (image, label, prediction, confidence) on the host."""

    def __init__(self, limit):
        self.limit, self.parts = limit, []

    @property
    def count(self):
        return sum(len(p[1]) for p in self.parts)

    def add(self, x, y, pred, conf, mask=None):
        room = self.limit - self.count
        if room <= 0:
            return
        idx = np.flatnonzero(mask) if mask is not None else np.arange(len(y))
        idx = idx[:room]
        if len(idx):   # (a host copy of the batch, only until `limit` examples are kept)
            self.parts.append((backend.to_numpy(x)[idx], y[idx], pred[idx], conf[idx]))

    def result(self):
        if not self.parts:
            return None
        images, labels, preds, conf = (np.concatenate(a) for a in zip(*self.parts))
        return {"images": images, "labels": labels, "preds": preds, "probs": conf}


def evaluate(model, loader, loss_fn=None, num_classes=None, keep_examples: int = 0,
             max_batches: int | None = None) -> dict:
    """Run `model` in eval mode over `loader` and measure it.

    Returns dict(loss, top1, top5, per_class (K,), confusion (K, K), n) and, with
    keep_examples > 0, 'examples' (the first images with labels, predictions and
    confidences) and 'mistakes' (the first misclassified ones), for the plots.
    The model's train/eval mode is restored afterwards.
    """
    loss_fn = loss_fn or SoftmaxCrossEntropy()
    was_training = getattr(model, "training", False)
    model.eval()
    n, K = 0, num_classes
    totals = None   # [loss sum, top-1 count, top-5 count, confusion (K*K)...] as float64, on the device
    examples, mistakes = _Keeper(keep_examples), _Keeper(keep_examples)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = model.forward(x)                                   # (B, K)
            xp = backend.get_array_module(logits)
            if K is None:
                K = logits.shape[1]
            loss = loss_fn(logits, y)                                   # ()
            y = xp.asarray(y).astype(xp.int64)                          # (B,)
            y = xp.where((y >= 0) & (y < K), y, 0)   # a bad label (GPU: NaN loss, named below) indexes nothing out of range
            preds = logits.argmax(axis=1)                               # (B,)
            true_score = logits[xp.arange(len(y)), y][:, None]          # (B, 1)
            top5 = (logits > true_score).sum(axis=1) < min(5, K)        # (B,) fewer than 5 beat the truth
            batch = xp.concatenate([xp.stack([loss.astype(xp.float64) * len(y),
                                              (preds == y).sum().astype(xp.float64),
                                              top5.sum().astype(xp.float64)]),
                                    xp.bincount(y * K + preds, minlength=K * K).astype(xp.float64)])
            totals = batch if totals is None else totals + batch        # (3 + K*K,)
            n += len(y)
            if keep_examples and (examples.count < keep_examples or mistakes.count < keep_examples):
                conf = softmax(backend.to_numpy(logits).astype(np.float64)).max(axis=1)
                y_np, preds_np = backend.to_numpy(y), backend.to_numpy(preds)
                examples.add(x, y_np, preds_np, conf)
                mistakes.add(x, y_np, preds_np, conf, mask=preds_np != y_np)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    totals = backend.to_numpy(totals)                                   # the one copy to the host
    if not np.isfinite(totals[0]) and hasattr(loss_fn, "check_labels"):
        for _, y in loader:   # a NaN loss on the GPU can mean a bad label: name it
            loss_fn.check_labels(y, K)
    confusion = totals[3:].astype(np.int64).reshape(K, K)
    out = {"loss": float(totals[0]) / n, "top1": float(totals[1]) / n, "top5": float(totals[2]) / n,
           "per_class": per_class_accuracy(confusion), "confusion": confusion, "n": n}
    if keep_examples:
        out["examples"], out["mistakes"] = examples.result(), mistakes.result()
    return out
