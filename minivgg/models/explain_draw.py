"""Grad-CAM, saliency and block feature maps (minivgg/models/explain.py) drawn as PNG files.

write_explanations(model, x, pixels, out_dir, stem) writes, for one image:
    <stem>_gradcam.png    the image, and the Grad-CAM heatmap laid over it
    <stem>_saliency.png   the image, and max over channels of |dy_c/dx|
    <stem>_blocks.png     the first maps of each block: wide to narrow, thin to thick
Each file is written atomically (temp + rename).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .explain import block_feature_maps, grad_cam, saliency

MAPS_PER_BLOCK = 8


def _save(fig, path: Path) -> Path:
    from ..train.files import atomic_write
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path


def _show(ax, pixels: np.ndarray, title: str) -> None:
    """pixels: uint8 (C, H, W), gray or RGB."""
    img = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    ax.imshow(img, cmap="gray" if pixels.shape[0] == 1 else None, vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def write_explanations(model, x, pixels, out_dir, stem: str, classes=None, target=None) -> list[Path]:
    """The three PNGs for one image: x (1, C, H, W) as the model takes it, pixels uint8 (C, H, W) the
    same image for display. target: the class explained (default: the predicted one)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pixels.shape[1:] != tuple(x.shape[2:]):
        raise ValueError(f"write_explanations: pixels {tuple(pixels.shape)} and x {tuple(x.shape)} differ in size")
    cam = grad_cam(model, x, target)
    name = classes[cam["class"]] if classes is not None else str(cam["class"])
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    _show(axes[0], pixels, "image")
    _show(axes[1], pixels, f"Grad-CAM: {name}")
    axes[1].imshow(cam["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    paths.append(_save(fig, out_dir / f"{stem}_gradcam.png"))

    sal = saliency(model, x, cam["class"])
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    _show(axes[0], pixels, "image")
    axes[1].imshow(sal["map"], cmap="hot")
    axes[1].set_title(f"saliency |dy/dx|: {name}", fontsize=9)
    axes[1].axis("off")
    paths.append(_save(fig, out_dir / f"{stem}_saliency.png"))

    blocks = block_feature_maps(model, x)
    fig, axes = plt.subplots(len(blocks), MAPS_PER_BLOCK, figsize=(MAPS_PER_BLOCK * 1.1, len(blocks) * 1.25),
                             squeeze=False)
    for row, (block, maps) in zip(axes, blocks):
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(maps):
                ax.imshow(maps[j], cmap="viridis")
        row[0].set_title(f"{block}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}", fontsize=8,
                         loc="left")
    paths.append(_save(fig, out_dir / f"{stem}_blocks.png"))
    return paths
