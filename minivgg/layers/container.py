"""Sequential: run layers forward in order and backward in reverse."""
from __future__ import annotations

from .base import Layer


class Sequential(Layer):
    """A chain of layers. forward: x -> l0 -> l1 -> ...; backward: the reverse.

    By the chain rule the gradient of the chain is the product of the layers'
    Jacobians taken last to first, so backward hands each layer's dx to the
    layer before it. Children are named '0', '1', ... as in torch.nn.Sequential,
    so state_dict keys match PyTorch's.
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
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

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
