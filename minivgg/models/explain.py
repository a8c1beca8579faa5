"""What a VGG looks at: Grad-CAM, a gradient saliency map and each block's feature maps.

All three are made with minivgg's own forward and backward passes; nothing new is derived.
With y_c the logit of class c (before softmax), for one image:

Grad-CAM (Selvaraju et al. 2017, shown on VGG-16). A = the feature maps of a convolutional
layer, (K, h, w); by backpropagating y_c down to that layer,
    alpha_k = (1 / (h*w)) * sum_ij dy_c/dA_kij          (K,)   how much map k matters for c
    cam     = ReLU(sum_k alpha_k * A_k)                  (h, w) where the evidence for c is
and the map is upsampled to the image (bilinear, as torch's interpolate with
align_corners=False) and scaled to [0, 1] for display. The default layer is the last
ReLU of `features` (conv5's output before the last max-pool: 14x14 at 224x224).

Saliency (Simonyan et al. 2014, the VGG authors): backpropagate y_c all the way to the image,
    S_ij = max_c' |dy_c / dx_c'ij|                       (H, W)

Feature maps: the output of every block (each max-pool), the tutorials' "wide to narrow,
thin to thick": the maps halve in size and multiply in number, block after block.

Running these calls backward, so it overwrites the layers' grads; the model is put in eval
mode (dropout off, BatchNorm with its running statistics) and left there.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..layers import MaxPool2d, ReLU
from .vgg import VGG


def _check(model, x) -> None:
    if not isinstance(model, VGG):
        raise TypeError(f"explain: expected a minivgg VGG, got {type(model).__name__}")
    if getattr(x, "ndim", None) != 4 or x.shape[0] != 1:
        raise ValueError(f"explain: expected one image as a batch of shape (1, C, H, W), got "
                         f"shape {getattr(x, 'shape', None)}")


def _last_relu(model) -> int:
    return max(i for i, m in enumerate(model.features.layers) if isinstance(m, ReLU))


def _forward_split(model, x, split: int):
    """Forward through features[:split+1] (kept as A), then the rest; returns (A, logits)."""
    for m in model.features.layers[:split + 1]:
        x = m.forward(x)
    a = x
    for m in model.features.layers[split + 1:]:
        x = m.forward(x)
    for m in (model.avgpool, model.flatten, model.classifier):
        x = m.forward(x)
    return a, x


def _backward_to(model, dlogits, split: int):
    """dL/dA at the output of features[split], from dL/dlogits."""
    d = dlogits
    for m in (model.classifier, model.flatten, model.avgpool):
        d = m.backward(d)
    for m in reversed(model.features.layers[split + 1:]):
        d = m.backward(d)
    return d


def _one_hot(logits, target):
    xp = backend.get_array_module(logits)
    c = int(backend.to_numpy(logits[0]).argmax()) if target is None else int(target)
    if not 0 <= c < logits.shape[1]:
        raise ValueError(f"explain: class {c} is outside the model's {logits.shape[1]} classes")
    d = xp.zeros_like(logits)                                       # (1, K)
    d[0, c] = 1
    return c, d


def upsample_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) bilinear, half-pixel centres (torch interpolate, align_corners=False)."""
    h, w = m.shape
    H, W = size

    def axis(n_in, n_out):
        s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        s = np.clip(s, 0, n_in - 1)
        lo = np.floor(s).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (s - lo)

    r0, r1, fr = axis(h, H)
    c0, c1, fc = axis(w, W)
    top = m[r0][:, c0] * (1 - fc) + m[r0][:, c1] * fc              # (H, W)
    bottom = m[r1][:, c0] * (1 - fc) + m[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def grad_cam(model, x, target: int | None = None, layer: int | None = None) -> dict:
    """Grad-CAM of class `target` (default: the predicted class) for one image x (1, C, H, W).

    layer: index into model.features whose output is A (default: the last ReLU).
    Returns {'class', 'logits', 'alpha' (K,), 'cam' (h, w) before upsampling,
    'heatmap' (H, W) upsampled and scaled to [0, 1]}; NumPy arrays.
    """
    _check(model, x)
    model.eval()
    split = _last_relu(model) if layer is None else int(layer)
    a, logits = _forward_split(model, x, split)                    # A (1, K, h, w)
    c, dlogits = _one_hot(logits, target)
    da = _backward_to(model, dlogits, split)                       # dy_c/dA (1, K, h, w)
    a, da = backend.to_numpy(a)[0], backend.to_numpy(da)[0]
    alpha = da.mean(axis=(1, 2))                                   # (K,)
    cam = np.maximum(np.tensordot(alpha, a, axes=1), 0)            # (h, w)
    heat = upsample_bilinear(cam, x.shape[2:])
    heat = heat / heat.max() if heat.max() > 0 else heat
    return {"class": c, "logits": backend.to_numpy(logits)[0], "alpha": alpha, "cam": cam,
            "heatmap": heat}


def saliency(model, x, target: int | None = None) -> dict:
    """|dy_c/dx| maxed over the image's channels: {'class', 'gradient' (C, H, W), 'map' (H, W)}."""
    _check(model, x)
    model.eval()
    first = model.features.layers[0]
    keep = getattr(first, "needs_input_grad", True)
    first.needs_input_grad = True                                  # the image's gradient is the point
    try:
        logits = model.forward(x)
        c, dlogits = _one_hot(logits, target)
        dx = backend.to_numpy(model.backward(dlogits))[0]          # (C, H, W)
    finally:
        first.needs_input_grad = keep
    return {"class": c, "gradient": dx, "map": np.abs(dx).max(axis=0)}


def block_feature_maps(model, x) -> list[tuple[str, np.ndarray]]:
    """[(name, maps (K, h, w)), ...]: the output of each block, i.e. of each max-pool."""
    _check(model, x)
    model.eval()
    out, block = [], 1
    for m in model.features.layers:
        x = m.forward(x)
        if isinstance(m, MaxPool2d):
            out.append((f"block{block}", backend.to_numpy(x)[0]))
            block += 1
    return out
