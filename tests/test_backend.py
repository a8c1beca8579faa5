# The backend's promises: device names parse (or fail clearly), a missing GPU says what to install,
# seeding repeats runs bit for bit, arrays round-trip between devices, and modes reach every layer.
import types

import numpy as np
import pytest

from minivgg import backend, random_stream
from minivgg.layers import BatchNorm2d, Conv2d, Dropout, Linear, ReLU, Sequential


@pytest.mark.parametrize("name,expected", [
    ("cpu", ("cpu", 0)), ("gpu", ("gpu", 0)), ("gpu:1", ("gpu", 1)), ("cuda", ("gpu", 0)),
    ("cuda:2", ("gpu", 2)), (" GPU:0 ", ("gpu", 0)), ("CPU", ("cpu", 0)),
])
def test_parse_device_accepts(name, expected):
    assert backend.parse_device(name) == expected


@pytest.mark.parametrize("name", ["tpu", "", "gpu:", "gpu:x", "gpu:-1", "cpu:0", "gpu:1:2", "cuda0"])
def test_parse_device_rejects_nonsense(name):
    with pytest.raises(ValueError, match=rf"unknown device {name!r}: expected 'cpu', 'gpu' or 'gpu:N'"):
        backend.parse_device(name)


@pytest.mark.parametrize("value", [0, None, ("gpu", 0)])
def test_parse_device_rejects_non_strings(value):
    with pytest.raises(TypeError, match="device must be a string like 'cpu', 'gpu' or 'gpu:1'"):
        backend.parse_device(value)


def test_missing_cupy_names_the_extras(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    monkeypatch.setattr(backend, "_CUPY_IMPORT_ERROR", ImportError("No module named 'cupy'"))
    assert not backend.gpu_available()
    assert backend.get_xp("cpu") is np
    for call in (lambda: backend.get_xp("gpu"), lambda: backend.get_xp("cuda:1"),
                 lambda: backend.to_device(np.zeros(3), "gpu"), lambda: Linear(2, 2).to("gpu")):
        with pytest.raises(RuntimeError, match=r"needs CuPy.*No module named 'cupy'") as info:
            call()
        assert "minivgg[cuda12]" in str(info.value) and "minivgg[cuda13]" in str(info.value)


def fake_cupy(device_count):
    """A stand-in CuPy module whose CUDA runtime reports `device_count` devices (or raises)."""
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(ndarray=type("ndarray", (), {}),
                                 cuda=types.SimpleNamespace(runtime=runtime, Device=None))


def test_cupy_without_a_driver_says_so(monkeypatch):
    monkeypatch.setattr(backend, "cupy", fake_cupy(RuntimeError("cudaErrorNoDevice")))
    assert not backend.gpu_available()
    with pytest.raises(RuntimeError, match=r"CuPy is installed but no CUDA device or driver was found "
                                           r"\(cudaErrorNoDevice\).*use the device 'cpu'"):
        backend.get_xp("gpu")


def test_gpu_index_out_of_range_lists_valid_ones(monkeypatch):
    monkeypatch.setattr(backend, "cupy", fake_cupy(2))
    with pytest.raises(RuntimeError, match=r"'gpu:5': only 2 CUDA device\(s\) present \(valid: gpu:0 .. gpu:1\)"):
        backend.get_xp("gpu:5")


def test_get_array_module(device, xp):
    a = backend.to_device(np.ones(3), device)
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(a, None, a) is xp            # None (no bias) is skipped
    assert backend.get_array_module(np.ones(2)) is np


def test_get_array_module_refuses_mixed_devices(monkeypatch):
    # On a CPU-only machine a fake CuPy array type stands in for a GPU array.
    fake = fake_cupy(1)
    monkeypatch.setattr(backend, "cupy", fake)
    with pytest.raises(TypeError, match=r"arrays from different devices in one call \(numpy.ndarray, .*ndarray\)"
                                        r": move them to one device first with minivgg.backend.to_device"):
        backend.get_array_module(np.ones(2), fake.ndarray())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_to_device_and_back_round_trip(device, rng, dtype):
    a = (100 * rng.standard_normal((3, 4, 5))).astype(dtype)
    on = backend.to_device(a, device)
    assert backend.device_of(on) == ("cpu" if device == "cpu" else "gpu:0")
    assert backend.get_array_module(on) is backend.get_xp(device)
    back = backend.to_numpy(on)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    np.testing.assert_array_equal(back, a)
    np.testing.assert_array_equal(backend.to_numpy(backend.to_device(on, "cpu")), a)
    assert backend.to_numpy(2.5) == np.float64(2.5)


def test_layer_to_moves_params_grads_and_buffers(device, xp):
    net = Sequential(Conv2d(1, 2, 3), BatchNorm2d(2)).to(device)
    x = backend.to_device(np.ones((2, 1, 4, 4), np.float32), device)
    net.backward(net.forward(x))
    net.to(device)
    for _, m in net.modules():
        for d in (m.params, m.grads, m.buffers):
            assert all(backend.get_array_module(a) is xp for a in d.values())
    net.to("cpu")
    assert all(isinstance(a, np.ndarray) for a in net.state_dict().values())


def build_and_run(device):
    """Initialise a few layers and run a Dropout forward, all from the shared generator."""
    net = Sequential(Conv2d(2, 3, 3), Linear(4, 5), Dropout(0.5))
    x = backend.to_device(np.ones((4, 6), np.float32), device)
    mask = net[2].train().forward(x)
    return [backend.to_numpy(a) for a in net.state_dict().values()] + [backend.to_numpy(mask)]


def test_seed_repeats_init_and_dropout_bit_for_bit(device):
    random_stream.seed(123)
    first = build_and_run(device)
    random_stream.seed(123)
    again = build_and_run(device)
    random_stream.seed(124)
    other = build_and_run(device)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0]), "a different seed gave the same weights"
    assert not np.array_equal(first[-1], other[-1]), "a different seed gave the same dropout mask"


def test_dropout_own_seed_repeats(device):
    x = backend.to_device(np.ones((8, 16), np.float32), device)
    masks = [backend.to_numpy(Dropout(0.5, seed=s).forward(x)) for s in (5, 5, 6)]
    assert np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])


def test_rng_state_round_trip():
    random_stream.seed(0)
    state = random_stream.rng_state()
    first = random_stream.get_rng().random(5)
    random_stream.set_rng_state(state)
    np.testing.assert_array_equal(random_stream.get_rng().random(5), first)


def test_train_and_eval_reach_every_nested_layer(device):
    inner = Sequential(BatchNorm2d(2), Dropout(0.5), Sequential(ReLU()))
    net = Sequential(Conv2d(1, 2, 1), inner).to(device)
    layers = [m for _, m in net.modules()]
    assert len(layers) == 7   # net, conv, inner, bn, dropout, the innermost Sequential, relu
    net.eval()
    assert not any(m.training for m in layers)
    x = backend.to_device(np.ones((2, 1, 3, 3), np.float32), device)
    np.testing.assert_array_equal(backend.to_numpy(inner[1].forward(x)), np.ones((2, 1, 3, 3)))  # no dropout
    net.train()
    assert all(m.training for m in layers)
    inner.eval()
    assert net.training and net[0].training
    assert not any(m.training for m in (inner, inner[0], inner[1], inner[2], inner[2][0]))


def test_synchronize_is_safe_on_any_device(device):
    backend.synchronize()
    backend.synchronize(backend.to_device(np.ones(2), device))
