"""draw_architecture(model, input_shape, path): a PNG of a VGG drawn from the model itself (matplotlib, Agg).

Every box comes from walking the model's layers with summary.trace (shape
propagation, no forward pass), each drawn as registry.py says: a conv box's height follows its feature map's
side and its width the channel count, so the pyramid of a VGG is visible.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..layers import Layer
from .registry import describe
from .summary import trace

# One colour per kind of layer (colour-blind-safe Okabe-Ito palette).
COLORS = {"input": "#BBBBBB", "conv": "#56B4E9", "pool": "#D55E00", "avgpool": "#009E73",
          "flatten": "#F0E442", "fc": "#CC79A7", "block": "#EEF4FA"}


def _stages(model: Layer, input_shape) -> tuple[list, tuple]:
    """Group the leaf layers into drawable items: conv (with its BN/ReLU), pool, avgpool, flatten, fc."""
    rows = trace(model, input_shape, "draw_architecture")
    layers = dict((name, m) for name, m in model.modules())
    items = []
    for r in rows:
        layer = layers[r["name"]]
        kind = describe(layer, "draw_architecture").draw
        if kind == "tag":    # BN, ReLU, Dropout: a note on the conv or fc box before them
            tag = describe(layer).tag(layer)
            if tag and items and items[-1]["kind"] in ("conv", "fc"):
                items[-1]["extras"].append(tag)
        else:
            items.append({"kind": kind, "layer": layer, "out": r["out_shape"], "extras": []})
    return items, rows[0]["in_shape"]


def format_macs(macs: int) -> str:
    """A count with the unit that fits: 15.47 G, 35.3 M, 920 K; small models no longer read '0.00 G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:,.2f} {unit}" if unit == "G" else f"{macs / scale:,.1f} {unit}"
    return f"{macs:,}"


def draw_architecture(model: Layer, input_shape, path, title: str | None = None, dpi: int = 150) -> str:
    """Render the model as boxes (input, conv blocks, max-pools, head) and save a PNG at `path`.

    input_shape is (C, H, W) or (N, C, H, W). Returns the path written.
    """
    items, (C0, H0, W0) = _stages(model, input_shape)   # checks the input first
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (Jupyter too).
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Rectangle

    def height(side):      # feature-map side -> box height: sqrt keeps 14x14 visible beside 224x224
        return 1.2 + 4.3 * math.sqrt(side / H0)

    def width(channels):   # channel count -> box width, log scale
        return 0.20 + 0.04 * math.log2(max(channels, 1))

    # Lay the items out left to right; each entry: (x, w, h, colour, label, kind).
    boxes, blocks, x, head_x0 = [], [], 0.0, None
    boxes.append((x, 0.40, height(H0), COLORS["input"], f"input  {C0}×{H0}×{W0}", "input"))
    x += 0.40 + 0.45
    block = None
    for it in items:
        kind = it["kind"]
        if kind == "conv":
            F, H, W = it["out"]
            KH, KW = it["layer"].kernel_size
            if block is None:
                block = {"x0": x, "convs": [], "H": H, "W": W}
                x += 0.12
            w = width(F)
            extra = " + BN" if "BN" in it["extras"] else ""
            boxes.append((x, w, height(H), COLORS["conv"], f"conv{KH}×{KW}, {F}{extra}", "conv"))
            block["convs"].append(F)
            x += w + 0.07
        else:
            if block is not None:      # a pool (or the head) closes the block
                block["x1"] = x + 0.02
                blocks.append(block)
                block = None
                x += 0.18
            if kind == "pool":
                C, H, W = it["out"]
                boxes.append((x, 0.26, height(H), COLORS["pool"], f"maxpool → {H}×{W}", "pool"))
                x += 0.26 + 0.28
            elif kind == "avgpool":
                C, H, W = it["out"]
                head_x0 = x
                boxes.append((x, 0.40, height(H), COLORS["avgpool"], f"avgpool → {C}×{H}×{W}", "avgpool"))
                x += 0.40 + 0.28
            elif kind == "flatten":
                (D,) = it["out"]
                boxes.append((x, 0.30, 1.2 + 0.35 * math.log2(D), COLORS["flatten"], f"flatten {D:,}", "flatten"))
                x += 0.30 + 0.28
            elif kind == "fc":
                (D,) = it["out"]
                tags = " · ".join(t for t in it["extras"] if t)
                label = f"FC {D:,}" + (f"\n{tags}" if tags else "")
                boxes.append((x, 0.45, 1.2 + 0.35 * math.log2(max(D, 2)), COLORS["fc"], label, "fc"))
                x += 0.45 + 0.28
    if block is not None:
        block["x1"] = x
        blocks.append(block)
    x_end = x - 0.28
    # Every box tall enough for its vertical label.
    boxes = [(x0, w, max(h, 0.11 * max(len(t) for t in label.split("\n")) + 0.35), c, label, k)
             for (x0, w, h, c, label, k) in boxes]

    top = (max(b[2] for b in boxes) + 0.5) / 2 + 0.9    # above the tallest frame and its label
    fig_w = max(8.0, 0.85 * (x_end + 0.6))
    fig = Figure(figsize=(fig_w, 6.2))
    ax = fig.subplots()
    ax.set_xlim(-0.3, x_end + 0.3)
    ax.set_ylim(-top - 1.1, top + 0.5)
    ax.axis("off")

    # Block backgrounds and their labels.
    for i, b in enumerate(blocks):
        hb = height(b["H"]) + 0.5
        ax.add_patch(FancyBboxPatch((b["x0"], -hb / 2), b["x1"] - b["x0"], hb,
                                    boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=COLORS["block"], ec="#7FA7C9", lw=1.0, zorder=0))
        cx = (b["x0"] + b["x1"]) / 2
        ax.text(cx, hb / 2 + 0.12, f"block {i + 1}", ha="center", va="bottom", fontsize=10, weight="bold")
        ax.text(cx, -hb / 2 - 0.12, f"{len(b['convs'])} × conv\n{b['convs'][-1]} ch\n{b['H']}×{b['W']}",
                ha="center", va="top", fontsize=8.5, linespacing=1.25)

    # The head (avgpool .. last Linear) in a dashed frame.
    if head_x0 is not None:
        hh = max(b[2] for b in boxes if b[0] >= head_x0) + 0.5
        ax.add_patch(FancyBboxPatch((head_x0 - 0.1, -hh / 2), x_end - head_x0 + 0.2, hh,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", fc="#FBF3F8",
                                    ec="#B0789C", lw=1.0, ls="--", zorder=0))
        head = getattr(model, "config", {}).get("head", "")
        ax.text((head_x0 + x_end) / 2, hh / 2 + 0.12, f"{head} head".strip(), ha="center",
                va="bottom", fontsize=10, weight="bold")

    # The boxes, with their labels written vertically inside (each box tall enough for its label).
    prev_right = None
    for (x0, w, h, color, label, kind) in boxes:
        ax.add_patch(Rectangle((x0, -h / 2), w, h, fc=color, ec="#333333", lw=0.8, zorder=2))
        size = 8 if kind in ("conv", "fc") else 7.5
        ax.text(x0 + w / 2, 0, label, rotation=90, ha="center", va="center", fontsize=size,
                zorder=3, linespacing=1.1, color="white" if kind in ("pool", "avgpool") else "black")
        if prev_right is not None and x0 - prev_right > 0.2:
            ax.annotate("", xy=(x0 - 0.03, 0), xytext=(prev_right + 0.03, 0),
                        arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.0), zorder=1)
        prev_right = x0 + w

    n_params = model.num_params()
    macs = sum(r["macs"] for r in trace(model, input_shape))
    arch = getattr(model, "arch", type(model).__name__)
    if arch.startswith("vgg"):                                    # vgg16_bn -> VGG-16-BN
        arch = "VGG-" + arch[3:].upper().replace("_", "-")
    name = title or (f"{arch}   {n_params / 1e6:,.1f}M parameters   "
                     f"{format_macs(macs)} mult-adds per {H0}×{W0} image")
    ax.text(-0.2, top + 0.35, name, ha="left", va="top", fontsize=13, weight="bold")

    has_bn = any("BN" in it.get("extras", []) for it in items)
    legend = [("input", "input"), ("conv", f"3×3 conv{' + BN' if has_bn else ''} + ReLU (stride 1, pad 1)"),
              ("pool", "2×2 max-pool, stride 2"), ("avgpool", "adaptive avg-pool"),
              ("flatten", "flatten"), ("fc", "fully connected")]
    handles = [Rectangle((0, 0), 1, 1, fc=COLORS[k], ec="#333333", lw=0.8) for k, _ in legend]
    ax.legend(handles, [t for _, t in legend], loc="lower center", ncol=len(legend), frameon=False,
              fontsize=9, bbox_to_anchor=(0.5, -0.02), handlelength=1.2)
    fig.tight_layout()
    from ..train.files import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:] or "png", dpi=dpi))
    return str(path)
