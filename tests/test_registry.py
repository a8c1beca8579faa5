# One table (minivgg/models/registry.py) describes each layer type to summary, draw_architecture and
# to_torch: an unregistered layer is refused by all three with one message, and one entry enables all three.
import numpy as np
import pytest

from minivgg.layers import Conv2d, Flatten, Layer, Linear, ReLU, Sequential
from minivgg.models import draw_architecture, summary
from minivgg.models.registry import LAYERS, LayerInfo, UnknownLayerError


class Square(Layer):
    """out = x^2: a layer type the registry has never heard of."""

    def forward(self, x):
        self.cache = x
        return x * x

    def backward(self, dout):
        return 2 * self.saved() * dout


def model_with(layer):
    return Sequential(Conv2d(1, 2, 3, padding=1), layer, Flatten(), Linear(2 * 4 * 4, 3))


def uses_of_the_registry(tmp_path):
    from minivgg.models.torch_interop import to_torch
    return {"summary": lambda m: summary(m, (1, 4, 4)),
            "draw_architecture": lambda m: draw_architecture(m, (1, 4, 4), tmp_path / "arch.png"),
            "to_torch": to_torch}


@pytest.mark.parametrize("use", ["summary", "draw_architecture", "to_torch"])
def test_an_unknown_layer_is_refused_everywhere_with_the_same_message(tmp_path, use):
    pytest.importorskip("torch")
    call = uses_of_the_registry(tmp_path)[use]
    with pytest.raises(UnknownLayerError, match=f"^{use}: layer type Square is not registered; add a "
                                                r"LayerInfo for it to LAYERS in minivgg/models/registry.py"):
        call(model_with(Square()))


def test_one_entry_makes_a_new_layer_known_to_all_three(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")

    class TorchSquare(torch.nn.Module):
        def forward(self, x):
            return x * x

    monkeypatch.setitem(LAYERS, Square, LayerInfo(output_shape=lambda m, shape: tuple(shape), draw="tag",
                                                  tag=lambda m: "x²", torch=lambda m, nn: TorchSquare()))
    model = model_with(Square())
    uses = uses_of_the_registry(tmp_path)
    assert "Square" in uses["summary"](model)
    uses["draw_architecture"](model)
    assert (tmp_path / "arch.png").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    twin = uses["to_torch"](model)
    np.testing.assert_allclose(twin(torch.tensor(x)).detach().numpy(), model.forward(x), rtol=1e-5, atol=1e-6)


def test_a_subclass_uses_its_parents_entry():
    class LeakyishReLU(ReLU):
        pass
    assert "LeakyishReLU" in summary(model_with(LeakyishReLU()), (1, 4, 4))
