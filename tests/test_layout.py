# Inside a network minivgg's feature maps are CHWN in memory and NCHW in shape (kernels/cpu.py).
# These tests pin that down: where the layout comes from, that every layer gives the same numbers
# whatever the layout of its input, and that a Conv2d's reused column memory never leaks into
# a result.
import numpy as np
import pytest

from minivgg import backend, random_stream
from minivgg.layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, TunedConv2d
from minivgg.layers.activation import Dropout
from minivgg.layers.sync_norm import SyncBatchNorm2d
from minivgg.models import VGG

DEVICES = ["cpu"] + (["gpu"] if backend.cupy is not None else [])


def chwn(a):
    """The same (N, C, H, W) values with CHWN memory."""
    xp = backend.get_array_module(a)
    return xp.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def is_chwn(a) -> bool:
    N, C, H, W = a.shape
    item = a.dtype.itemsize
    return a.strides == (item, H * W * N * item, W * N * item, N * item)


def in_chwn_order(a) -> bool:
    """CHWN memory order, compact or not (a max-pool's padded dx is a slice of a larger CHWN array)."""
    return np.argsort(a.strides, kind="stable").tolist() == [0, 3, 2, 1]


def test_a_convolution_hands_on_chwn_memory_without_copying():
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32)
    conv = Conv2d(3, 5, 3, padding=1)
    out = conv.forward(x)
    assert out.shape == (4, 5, 8, 8) and is_chwn(out)
    assert not is_chwn(np.ascontiguousarray(out))       # the check can tell the two apart


def test_the_layout_survives_a_vgg_feature_stack(device):
    """Every conv after the first gets CHWN memory, forward and backward: ReLU, BatchNorm and
    max-pool keep it, on NumPy (whose ufuncs keep their input's order) and on CuPy (whose ufuncs
    allocate C order unless given out=; the stand-in does as CuPy does)."""
    model = VGG("vgg11_bn", num_classes=10, in_channels=1, width_ratio=16, pool_size=1, hidden=(16, 16)).to(device)
    seen, seen_dout = [], []
    for layer in model.features:
        if isinstance(layer, Conv2d):
            forward, backward = layer.forward, layer.backward
            layer.forward = lambda x, f=forward: (seen.append(x), f(x))[1]
            layer.backward = lambda d, b=backward: (seen_dout.append(d), b(d))[1]
    x = backend.to_device(np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32), device)
    logits = model.forward(x)
    model.backward(backend.to_device(np.ones(logits.shape, np.float32), device))
    assert len(seen) == 8 and not is_chwn(seen[0]) and [is_chwn(a) for a in seen[1:]] == [True] * 7
    # backward order; the last conv's dout comes from the head through the last max-pool, and NumPy's
    # max-pool backward lays its dx out as its dout, which the head made NCHW (the network's edge)
    assert len(seen_dout) == 8 and [is_chwn(d) for d in seen_dout[1:]] == [True] * 7


class OneRank:
    """A one-rank all-reduce (the sum over one rank is the buffer itself)."""

    def allreduce_sum_(self, buf):
        return buf


@pytest.mark.parametrize("make", [ReLU, lambda: BatchNorm2d(4), lambda: BatchNorm2d(4).eval(),
                                  lambda: SyncBatchNorm2d(4, OneRank()), lambda: Dropout(0.5, seed=0),
                                  lambda: MaxPool2d(2), lambda: MaxPool2d(3, stride=2, padding=1)],
                         ids=["relu", "bn", "bn-eval", "sync-bn", "dropout", "pool2", "pool3s2p1"])
def test_each_layer_hands_on_chwn_memory_forward_and_backward(device, make):
    """A CHWN input gives a CHWN output, and a CHWN dout a CHWN dx, on NumPy and on CuPy (where an
    elementwise op allocates C order unless given out=; the stand-in allocates as CuPy does)."""
    layer = make().to(device)
    x = chwn(backend.to_device(np.random.default_rng(4).standard_normal((3, 4, 6, 6), dtype=np.float32), device))
    out = layer.forward(x)
    dout = chwn(backend.to_device(np.random.default_rng(5).standard_normal(out.shape, dtype=np.float32), device))
    dx = layer.backward(dout)
    if isinstance(layer, Dropout) and device == "cpu":
        return   # NumPy lays x * mask out as the mask, C order (the CPU path is left as it is)
    assert in_chwn_order(out) and in_chwn_order(dx), (out.strides, dx.strides)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, make", [(4, lambda: Conv2d(4, 6, 3, padding=1)), (6, lambda: Conv2d(6, 4, 3, padding=1)),
                                     (4, lambda: Conv2d(4, 6, 3, stride=2)), (4, lambda: MaxPool2d(2)),
                                     (4, lambda: MaxPool2d(3, stride=2, padding=1)), (4, lambda: BatchNorm2d(4)),
                                     (4, lambda: ReLU())],
                         ids=["conv_col2im", "conv_flip", "conv_stride2", "pool2", "pool3s2p1", "bn", "relu"])
def test_every_layer_gives_the_same_numbers_for_either_layout(device, C, make):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, C, 9, 9))
    results = []
    for layout in (lambda a: a, chwn):
        random_stream.seed(0)                                   # the same weights both times
        layer = make().astype(np.float64).to(device)
        xd = layout(backend.to_device(x, device))
        out = layer.forward(xd)
        dout = layout(backend.to_device(np.random.default_rng(2).standard_normal(out.shape), device))
        dx = layer.backward(dout)
        results.append([backend.to_numpy(a) for a in (out, dx, *layer.grads.values())])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [3, 8], ids=["flip", "col2im"])
def test_reused_column_memory_never_shows_in_a_result(device, F):
    """Forward writes its columns into the last step's memory, backward its dL/dx columns into
    forward's: results equal a fresh layer's, a repeated backward equals the first, and the
    memory really is reused."""
    rng = np.random.default_rng(3)
    random_stream.seed(0)
    conv = TunedConv2d(4, F, 3, padding=1).astype(np.float64).to(device)
    random_stream.seed(0)
    fresh = TunedConv2d(4, F, 3, padding=1).astype(np.float64).to(device)
    for step in range(3):
        x = backend.to_device(rng.standard_normal((2, 4, 6, 6)), device)
        dout = backend.to_device(rng.standard_normal((2, F, 6, 6)), device)
        out = conv.forward(x)
        if step > 0 and device == "cpu":
            assert np.shares_memory(conv.cache[1], last_spare)
        last_spare = conv.spare
        dx = conv.backward(dout)
        dx_again = conv.backward(dout)          # the columns were overwritten: rebuilt, same answer
        fresh.spare = None
        ref_out, ref_dx = fresh.forward(x), fresh.backward(dout)
        for a, b in [(out, ref_out), (dx, ref_dx), (dx_again, ref_dx),
                     (conv.grads["weight"], fresh.grads["weight"])]:
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_to_and_astype_drop_every_layers_scratch_memory_through_the_hook():
    """Layer.to/astype call each module's drop_scratch: TunedConv2d's spare columns, and any other
    layer's scratch memory, never outlive the device or dtype they were made for."""
    from minivgg.layers import Layer, Sequential

    class Scratchy(Layer):
        def __init__(self):
            super().__init__()
            self.scratch = np.empty(4)

        def forward(self, x):
            return x

        def drop_scratch(self):
            self.scratch = None

    for move in (lambda net: net.astype(np.float64), lambda net: net.to("cpu")):
        conv, other = TunedConv2d(1, 2, 3), Scratchy()
        net = Sequential(conv, other)
        net.forward(np.ones((1, 1, 4, 4), np.float32))
        assert conv.spare is not None
        move(net)
        assert conv.spare is None and other.scratch is None
