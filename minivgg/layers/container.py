"""Sequential: run layers forward in order and backward in reverse, doing only the backward work
someone needs (chain_backward, which every container of minivgg runs)."""
from __future__ import annotations

from .base import Layer


def first_leaf(layer: Layer) -> Layer:
    """The layer that sees a container's input first: its first child's first child ..."""
    while layer.children():
        layer = layer.children()[0][1]
    return layer


def trains(layer: Layer) -> bool:
    """Whether any parameter below `layer` is trainable (not frozen)."""
    return any(m.params and not m.frozen for _, m in layer.modules())


def chain_backward(layers, dout):
    """Backward through `layers` (in forward order), last to first: dL/dx by the chain rule.

    Only the work someone needs is done. A frozen layer computes no weight gradient (its own
    backward checks self.frozen). dL/dx of the chain's input is wanted unless the layer that
    sees it first says needs_input_grad = False (the images of a network need none); then the
    layers below the lowest trainable one are not run backward at all, and that lowest one is
    run with needs_input_grad = False, so it makes its weight gradient and no dL/dx. Nested
    containers run this same rule, so one flag on the first layer and the frozen flags decide
    all. Returns dL/dx, or None when it was not wanted.
    """
    if not layers:
        return dout
    wanted = first_leaf(layers[0]).needs_input_grad
    lowest = 0 if wanted else next((i for i, m in enumerate(layers) if trains(m)), len(layers))
    for i in range(len(layers) - 1, lowest, -1):
        dout = layers[i].backward(dout)
    if lowest == len(layers):   # nothing trains and no dL/dx is wanted: no backward at all
        return None
    if lowest == 0:             # the first layer's own flag decides whether it returns dL/dx
        return layers[0].backward(dout)
    leaf = first_leaf(layers[lowest])
    keep = leaf.needs_input_grad
    leaf.needs_input_grad = False   # nothing below it runs backward: it needs no dL/dx
    try:
        layers[lowest].backward(dout)
    finally:
        leaf.needs_input_grad = keep
    return None


class Sequential(Layer):
    """A chain of layers. forward: x -> l0 -> l1 -> ...; backward: the reverse.

    By the chain rule the gradient of the chain is the product of the layers'
    Jacobians taken last to first, so backward hands each layer's dx to the
    layer before it. Children are named '0', '1', ... as in torch.nn.Sequential,
    so state_dict keys match PyTorch's. backward skips the work nobody needs (frozen
    layers' weight gradients; everything below the lowest trainable layer when the input
    needs no gradient): see chain_backward.
    """

    def __init__(self, *layers):
        super().__init__()
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, expected a Layer")

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout):
        return chain_backward(self.layers, dout)

    def append(self, layer: Layer) -> "Sequential":
        self.layers.append(layer)
        return self

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}".replace("\n", "\n  ") for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
