"""The CuPy stand-in refuses what CuPy refuses: each rule fed a mistake it must catch.

These run only where the GPU backend is the stand-in (MINIVGG_FAKE_CUPY=1, the default
without a GPU); on a real GPU the same code meets real CuPy instead.
"""
import numpy as np
import pytest

from minivgg import backend

pytestmark = pytest.mark.skipif(not getattr(backend.cupy, "is_fake", False),
                                reason="the GPU backend is real CuPy (or none), not the stand-in")
IMPLICIT = r"Implicit conversion to a NumPy array is not allowed\. Please use `\.get\(\)`"


@pytest.fixture
def cp():
    return backend.cupy


@pytest.fixture
def x(cp):
    return cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))


# -- no implicit conversion, no mixing --------------------------------------------------------------
@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda a: a.__array__(), np.ascontiguousarray],
                         ids=["asarray", "array", "__array__", "ascontiguousarray"])
def test_no_implicit_conversion_to_numpy(x, convert):
    with pytest.raises(TypeError, match=IMPLICIT):
        convert(x)


@pytest.mark.parametrize("call", [np.exp, np.sum, lambda a: np.matmul(a, a.T), lambda a: np.concatenate([a, a])],
                         ids=["exp", "sum", "matmul", "concatenate"])
def test_numpy_functions_refused_on_device_arrays(x, call):
    with pytest.raises(TypeError, match=r"numpy\.\w+ was called on a cupy\.ndarray"):
        call(x)


@pytest.mark.parametrize("mix", [lambda a, h: a + h, lambda a, h: h + a, lambda a, h: a * h, lambda a, h: a @ h.T,
                                 lambda a, h: a.__setitem__(Ellipsis, h)],
                         ids=["add", "radd", "mul", "matmul", "setitem"])
def test_numpy_arrays_refused_as_operands(x, mix):
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        mix(x, np.ones((2, 3), np.float32))


def test_scalars_mix_and_results_stay_on_the_device(cp, x):
    for y in (np.float32(2) * x, x * 2.0, 1 - x, x.sum(), x.max(axis=0), cp.sqrt(x)):
        assert isinstance(y, cp.ndarray)
    assert x.sum().ndim == 0   # a reduction is a 0-d device array, as in CuPy, not a scalar


def test_only_what_minivgg_uses_exists(cp):
    for name in ("fft", "fuse", "ElementwiseKernel", "RawKernel_from_cubin"):
        assert not hasattr(cp, name), name
    with pytest.raises(AttributeError):
        cp.linalg.norm


def test_empty_memory_is_poisoned(cp):
    assert np.isnan(cp.asnumpy(cp.empty((3,), np.float32))).all()
    assert (cp.asnumpy(cp.empty((3,), np.int32)) == -7777).all()


# -- counting -------------------------------------------------------------------------------------
def test_transfers_are_counted(cp, x):
    with cp.counting() as c:
        y = cp.asarray(np.ones(3))          # host -> device
        float(y.sum())                      # device -> host
        cp.asnumpy(y)                       # device -> host
        y[np.array([0, 2])]                 # a host index is copied over
        cp.cuda.Device().synchronize()
        _ = x + 1, x.reshape(3, 2), len(x)  # none
    assert (c["h2d"], c["d2h"], c["sync"]) == (2, 2, 1)


# -- kernel launches are checked as the CUDA driver reads them --------------------------------------
SCALE = r"""
extern "C" __global__ void scale(const float* x, float* y, float a, int n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        y[i] = a * x[i];
}
"""


@pytest.fixture
def scale(cp):
    return cp.RawModule(code=SCALE).get_function("scale")


def test_a_correct_launch_runs_every_thread(cp, scale):
    x = cp.asarray(np.arange(1000, dtype=np.float32))
    y = cp.empty((1000,), np.float32)
    scale((3,), (128,), (x, y, np.float32(2), np.int32(1000)))   # 384 threads, grid-stride loop
    np.testing.assert_array_equal(cp.asnumpy(y), 2 * np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize("args,match", [
    (lambda x, y: (x, y, 2.0, np.int32(4)), r"argument 2: the kernel declares a 4-byte parameter but CuPy would "
                                            r"pass this float as 8 bytes"),
    (lambda x, y: (x, y, np.float32(2), 4), r"argument 3: .* 4-byte parameter but CuPy would pass this int as 8"),
    (lambda x, y: (np.ones(4, np.float32), y, np.float32(2), np.int32(4)), r"argument 0 is a pointer parameter; "
                                                                         r"pass a cupy\.ndarray.*host"),
    (lambda x, y: (x.astype(np.float64), y, np.float32(2), np.int32(4)), r"argument 0: array of float64 "
                                                                        r"\(8-byte elements\) .* 4-byte"),
    (lambda x, y: (x[::2], y, np.float32(2), np.int32(2)), r"argument 0: a non-contiguous array"),
    (lambda x, y: (x, y, np.float32(2)), r"takes 4 arguments, got 3"),
    (lambda x, y: (x, y, np.float32(2), np.array([4, 4], np.int32)), r"numpy\.ndarray of shape \(2,\) as a kernel"),
], ids=["py-float", "py-int", "host-array", "wrong-dtype", "strided", "count", "np-array-scalar"])
def test_bad_launches_are_refused(cp, scale, args, match):
    x, y = cp.asarray(np.ones(4, np.float32)), cp.empty((4,), np.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        scale((1,), (4,), args(x, y))


def test_unsupported_device_code_does_not_compile(cp):
    """Shared memory and barriers cannot run one thread after another, so the shim refuses them."""
    src = SCALE.replace("y[i] = a * x[i];", "__syncthreads(); y[i] = a * x[i];")
    with pytest.raises(cp.cuda.CompileException, match="__syncthreads"):
        cp.RawModule(code=src).get_function("scale")


def test_a_missing_kernel_name_is_an_error(cp):
    with pytest.raises(KeyError, match="neither an extern"):
        cp.RawModule(code=SCALE).get_function("scale_v2")


def test_benchmarks_refuse_to_time_the_stand_in():
    from benchmarks import common
    with pytest.raises(SystemExit, match=r"CuPy stand-in on the CPU \(MINIVGG_FAKE_CUPY=1\): it proves the code "
                                         r"path and measures no GPU speed"):
        common.require_gpu()


def test_asking_for_the_gpu_says_it_is_the_stand_in(monkeypatch):
    monkeypatch.setattr(backend, "_told_fake", False)
    with pytest.warns(UserWarning, match="the GPU backend is the CuPy stand-in"):
        backend.get_xp("gpu")
