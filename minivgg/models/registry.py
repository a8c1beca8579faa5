"""The one place that knows each layer type: its output shape, multiply-adds, drawing and torch twin.

summary(), draw_architecture() and to_torch() all read this table, so a new layer
type is described once (CONTRIBUTING.md has the checklist) and a layer missing
from it is refused by all three with the same message.

Notation: C in-channels, F out-channels, H W input size, KH KW kernel, OH OW
output size, I O in/out features; shapes here leave out the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels import out_size
from ..layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Layer, Linear,
                      MaxPool2d, ReLU, Sequential)


@dataclass(frozen=True)
class LayerInfo:
    """What the model tools need to know about one layer type.

    output_shape(layer, in_shape) -> out_shape, both without the batch
    torch(layer, nn) -> the torch.nn module computing the same function
    draw: "conv", "fc", "pool", "avgpool", "flatten" (a box of its own), "tag" (a
          note on the conv/fc box before it), or "container"
    tag(layer) -> the note's text ("" for none), for draw == "tag"
    macs(layer, in_shape, out_shape) -> multiply-adds per sample
    view: the output aliases the input (no activation memory)
    """
    output_shape: Callable
    torch: Callable
    draw: str
    tag: Callable = lambda layer: ""
    macs: Callable = lambda layer, in_shape, out_shape: 0
    view: bool = False


def _window_shape(layer, shape):
    """Conv2d and MaxPool2d: OH = floor((H + 2*ph - KH) / sh) + 1, OW likewise."""
    C, H, W = shape
    (KH, KW), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    F = layer.out_channels if isinstance(layer, Conv2d) else C
    return (F, out_size(H, KH, sh, ph), out_size(W, KW, sw, pw))


def _conv_macs(layer, in_shape, out_shape):
    F, OH, OW = out_shape
    KH, KW = layer.kernel_size
    return OH * OW * F * layer.in_channels * KH * KW


def _sequential_shape(layer, shape):
    for child in layer:
        shape = describe(child).output_shape(child, shape)
    return tuple(shape)


def _same_shape(layer, shape):
    return tuple(shape)


LAYERS: dict[type, LayerInfo] = {
    Conv2d: LayerInfo(
        output_shape=_window_shape, draw="conv", macs=_conv_macs,
        torch=lambda m, nn: nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                      padding=m.padding, bias="bias" in m.params)),
    BatchNorm2d: LayerInfo(
        output_shape=_same_shape, draw="tag", tag=lambda m: "BN",
        torch=lambda m, nn: nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum)),
    ReLU: LayerInfo(output_shape=_same_shape, draw="tag", tag=lambda m: "ReLU", torch=lambda m, nn: nn.ReLU()),
    Dropout: LayerInfo(
        output_shape=_same_shape, draw="tag", tag=lambda m: f"Dropout {m.p:g}" if m.p else "",
        torch=lambda m, nn: nn.Dropout(m.p)),
    MaxPool2d: LayerInfo(
        output_shape=_window_shape, draw="pool",
        torch=lambda m, nn: nn.MaxPool2d(m.kernel_size, stride=m.stride, padding=m.padding)),
    AdaptiveAvgPool2d: LayerInfo(
        output_shape=lambda m, shape: (shape[0], *m.output_size), draw="avgpool",
        torch=lambda m, nn: nn.AdaptiveAvgPool2d(m.output_size)),
    Flatten: LayerInfo(
        output_shape=lambda m, shape: (int(np.prod(shape)),), draw="flatten", view=True,
        torch=lambda m, nn: nn.Flatten()),
    Linear: LayerInfo(
        output_shape=lambda m, shape: (m.out_features,), draw="fc",
        macs=lambda m, in_shape, out_shape: m.in_features * m.out_features,
        torch=lambda m, nn: nn.Linear(m.in_features, m.out_features, bias="bias" in m.params)),
    Sequential: LayerInfo(
        output_shape=_sequential_shape, draw="container",
        torch=lambda m, nn: nn.Sequential(*[torch_module(child, nn) for child in m])),
}


class UnknownLayerError(TypeError):
    """A layer type that has no entry in LAYERS."""


def describe(layer: Layer, who: str = "minivgg.models") -> LayerInfo:
    """The LayerInfo of a layer's type (a subclass uses its parent's entry), or one clear error."""
    for cls in type(layer).__mro__:
        if cls in LAYERS:
            return LAYERS[cls]
    raise UnknownLayerError(
        f"{who}: layer type {type(layer).__name__} is not registered; add a LayerInfo for it to "
        "LAYERS in minivgg/models/registry.py (output shape, torch twin, drawing; see CONTRIBUTING.md)")


def torch_module(layer: Layer, nn, who: str = "to_torch"):
    """The torch.nn module that computes what one minivgg layer computes."""
    return describe(layer, who).torch(layer, nn)
