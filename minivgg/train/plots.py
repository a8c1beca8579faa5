"""Pictures of a run: loss and accuracy curves, the confusion matrix, grids of predictions, gradient flow.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no window,
no global backend switch), so plotting works on a headless server and inside tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_write


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=100,
                                                    bbox_inches="tight"))


def _series(history, key):
    xs = [h["epoch"] for h in history if h.get(key) is not None]
    ys = [h[key] for h in history if h.get(key) is not None]
    return xs, ys


def plot_history(history: list[dict], path) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and validation."""
    from matplotlib.ticker import MaxNLocator
    fig = _figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, keys, title in ((ax_loss, (("train_loss", "train"), ("val_loss", "validation")), "loss"),
                            (ax_acc, (("train_acc", "train"), ("val_top1", "validation top-1"),
                                      ("val_top5", "validation top-5")), "accuracy")):
        for key, label in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=4, label=label,
                        linestyle=":" if key == "val_top5" else "-")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_acc.set_ylim(0, 1.02)
    if history:
        epochs = [h["epoch"] for h in history]
        ax_loss.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax_acc.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, class_names, path, title="confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts written in each cell."""
    confusion = np.asarray(confusion)
    K = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(K)]
    totals = confusion.sum(axis=1, keepdims=True)
    frac = confusion / np.maximum(totals, 1)                            # (K, K)
    side = max(4.5, 0.6 * K + 2)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(K))
    ax.set_yticks(range(K))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"{title} (accuracy {acc:.1%})")
    if K <= 20:
        for i in range(K):
            for j in range(K):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    return _save(fig, path)


def to_display(images: np.ndarray, mean=None, std=None) -> np.ndarray:
    """Normalised (M, C, H, W) -> displayable (M, H, W, C) in [0, 1], undoing Normalize."""
    x = np.asarray(images, dtype=np.float64)
    C = x.shape[1]
    if mean is not None and std is not None:
        m = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
        s = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
        x = x * s + m
    elif x.max() > 1.5:  # raw uint8-scale pixels
        x = x / 255.0
    x = np.clip(x, 0.0, 1.0).transpose(0, 2, 3, 1)                      # (M, H, W, C)
    return x[..., 0] if C == 1 else x


def plot_image_grid(images, labels, preds, probs, class_names, path, title="predictions",
                    mean=None, std=None, ncols=8, max_images=32) -> Path:
    """A grid of images, each captioned 'true / predicted (confidence)'; green right, red wrong."""
    M = min(len(labels), max_images)
    ncols = max(1, min(ncols, M))
    nrows = max(1, -(-M // ncols))
    fig = _figure(1.7 * ncols, 2.0 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    shown = to_display(images[:M], mean, std) if M else None
    names = list(class_names) if class_names is not None else None
    name = (lambda k: names[k] if names and k < len(names) else str(k))
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= M:
            continue
        ax.imshow(shown[i], cmap="gray" if shown.ndim == 3 else None, vmin=0, vmax=1)
        ok = labels[i] == preds[i]
        ax.set_title(f"true: {name(int(labels[i]))}\npred: {name(int(preds[i]))} ({probs[i]:.0%})",
                     fontsize=8, color="tab:green" if ok else "tab:red")
    if M == 0:
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(title)
    return _save(fig, path)


def gradient_norms(model) -> dict[str, float]:
    """||dL/dW|| of every trainable conv and linear weight that has a gradient, by name, in forward order.

    Only weight matrices and kernels (2 or more dimensions) are kept: biases and
    BatchNorm scales have few entries and say little about whether a layer's
    signal is vanishing or exploding.
    """
    from ..backend import to_numpy
    return {name: float(np.linalg.norm(to_numpy(g))) for name, p, g in model.named_parameters()
            if g is not None and p.ndim >= 2}


def plot_grad_flow(norms: list[dict], path, title="gradient flow") -> Path:
    """Per-layer gradient norms: over the recorded steps (left) and their median by depth (right).

    norms: one gradient_norms(model) dict per optimizer step. Lines that sink by many
    orders of magnitude below the others mark layers that barely learn (vanishing
    gradients); lines that climb warn of divergence.
    """
    names = list(norms[0]) if norms else []
    fig = _figure(12, 4.2)
    ax_steps, ax_depth = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    from matplotlib import colormaps
    cmap = colormaps["viridis"]                       # input layers dark, output layers light
    for i, name in enumerate(names):
        ys = [n.get(name, np.nan) for n in norms]
        ax_steps.plot(range(1, len(ys) + 1), ys, color=cmap(i / max(len(names) - 1, 1)), lw=1.2, label=name)
    medians = [float(np.nanmedian([n.get(name, np.nan) for n in norms])) for name in names]
    ax_depth.bar(range(len(names)), medians, color=[cmap(i / max(len(names) - 1, 1)) for i in range(len(names))])
    ax_depth.set_xticks(range(len(names)), [n.removesuffix(".weight") for n in names], rotation=70, fontsize=8)
    for ax in (ax_steps, ax_depth):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylabel("||dL/dW||")
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_title(f"{title}: each layer's weight-gradient norm per step")
    ax_depth.set_title(f"median over {len(norms)} steps, input to output")
    if 0 < len(names) <= 20:
        ax_steps.legend(fontsize=7, ncol=2)
    return _save(fig, path)


class GradFlowRecorder:
    """Record gradient_norms(model) before each of an optimizer's first `steps` steps.

    It wraps optimizer.step (the gradients then are the ones the step uses, after
    accumulation and clipping) and writes plot_grad_flow to `path` after the last
    recorded step, or when write() is called (a run shorter than `steps`).
    """

    def __init__(self, optimizer, steps: int, path):
        if int(steps) < 1:
            raise ValueError(f"GradFlowRecorder: steps must be >= 1, got {steps}")
        self.optimizer, self.steps, self.path = optimizer, int(steps), Path(path)
        self.norms: list[dict] = []
        self.written = False
        step = optimizer.step

        def recording_step():
            if len(self.norms) < self.steps:
                self.norms.append(gradient_norms(optimizer.model))
                if len(self.norms) == self.steps:
                    self.write()
            step()
        optimizer.step = recording_step

    def write(self) -> Path | None:
        """Write the plot (once) if any step was recorded; returns its path or None."""
        if self.norms and not self.written:
            plot_grad_flow(self.norms, self.path)
            self.written = True
        return self.path if self.written else None
