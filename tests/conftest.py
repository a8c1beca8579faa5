"""Backend parametrisation: every test that takes `xp` runs on NumPy and on the GPU backend.

The GPU backend is real CuPy where a CUDA device is present; elsewhere it is minivgg's strict
CuPy stand-in (minivgg/testing/fakecupy), which runs the GPU code path and minivgg's own CUDA
kernels on the CPU. MINIVGG_FAKE_CUPY=1 forces the stand-in, MINIVGG_FAKE_CUPY=0 forbids it
(the CuPy cases then skip without a GPU). The choice is made here, before minivgg is imported,
and inherited by the subprocesses tests start.
"""
import os


def _real_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


if "MINIVGG_FAKE_CUPY" not in os.environ:
    os.environ["MINIVGG_FAKE_CUPY"] = "0" if _real_gpu() else "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minivgg import backend  # noqa: E402

FAKE = os.environ["MINIVGG_FAKE_CUPY"] == "1"
BACKENDS = [pytest.param("cpu", id="numpy"),
            pytest.param("gpu", id="cupy", marks=pytest.mark.skipif(
                not backend.gpu_available(),
                reason="no CUDA device and the CuPy stand-in is off (MINIVGG_FAKE_CUPY=0)"))]


def pytest_report_header(config):
    if FAKE:
        return "GPU backend: minivgg.testing.fakecupy (strict CuPy stand-in on the CPU, kernels compiled by g++)"
    if backend.gpu_available():
        return f"GPU backend: CuPy {backend.cupy.__version__} on a real CUDA device"
    return "GPU backend: none (CuPy cases skip)"


@pytest.fixture(params=BACKENDS)
def device(request):
    """'cpu' or 'gpu'; tests move inputs and layers with backend.to_device / layer.to(device)."""
    return request.param


@pytest.fixture
def xp(device):
    """The array module of the device under test (numpy, or cupy / its stand-in)."""
    return backend.get_xp(device)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
