"""Backend parametrisation: every test that takes `xp` runs on NumPy, and on CuPy where a GPU is present."""
import numpy as np
import pytest

from minivgg import backend

BACKENDS = [pytest.param("cpu", id="numpy"),
            pytest.param("gpu", id="cupy", marks=pytest.mark.skipif(
                not backend.gpu_available(), reason="no CUDA device (CuPy tests run only on a GPU)"))]


@pytest.fixture(params=BACKENDS)
def device(request):
    """'cpu' or 'gpu'; tests move inputs and layers with backend.to_device / layer.to(device)."""
    return request.param


@pytest.fixture
def xp(device):
    """The array module of the device under test (numpy or cupy)."""
    return backend.get_xp(device)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
