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


# -- memory layout, as CuPy allocates it ------------------------------------------------------------
def chwn(cp, shape=(3, 4, 5, 6)):
    """An (N, C, H, W) device array with CHWN memory (a transposed view), as minivgg's feature maps."""
    N, C, H, W = shape
    a = cp.asarray(np.random.default_rng(0).standard_normal((C, H, W, N)))
    return a.transpose(3, 0, 1, 2)


@pytest.mark.parametrize("compute", [
    lambda cp, a: a + 1, lambda cp, a: a * a, lambda cp, a: np.float64(2) * a, lambda cp, a: -a,
    lambda cp, a: abs(a), lambda cp, a: a > 0, lambda cp, a: a @ a.transpose(0, 1, 3, 2),
    lambda cp, a: cp.maximum(a, 0), lambda cp, a: cp.exp(a), lambda cp, a: cp.multiply(a, a > 0),
    lambda cp, a: cp.where(a > 0, a, 0), lambda cp, a: a.clip(0, 1), lambda cp, a: cp.clip(a, 0, 1),
    lambda cp, a: a.sum(axis=1), lambda cp, a: cp.sum(a, axis=1), lambda cp, a: a.max(axis=1),
    lambda cp, a: cp.concatenate([a, a], axis=1), lambda cp, a: cp.stack([a, a])],
    ids=["add", "mul", "rmul-scalar", "neg", "abs", "compare", "matmul", "maximum", "exp", "multiply",
         "where", "clip-method", "clip", "sum-method", "sum", "max-method", "concatenate", "stack"])
def test_computed_results_are_c_contiguous_whatever_the_input_layout(cp, compute):
    """CuPy allocates what a ufunc, elementwise kernel, reduction or concatenate returns in C
    order (cupy/_core/_kernel.pyx _get_out_args_from_optionals); NumPy would keep CHWN."""
    a = chwn(cp)
    r = compute(cp, a)
    assert r.flags.c_contiguous, r.strides


def test_out_is_written_as_it_is_laid_out(cp):
    a = chwn(cp)
    out = cp.empty_like(a)
    assert cp.maximum(a, 0, out=out) is out and out.strides == a.strides
    np.testing.assert_array_equal(cp.asnumpy(out), np.maximum(cp.asnumpy(a), 0))
    a += 1                                                  # in place: the memory stays where it is
    assert a.strides == out.strides


@pytest.mark.parametrize("make", [lambda cp, a: cp.empty_like(a), lambda cp, a: cp.zeros_like(a),
                                  lambda cp, a: cp.ones_like(a), lambda cp, a: a.astype(np.float32),
                                  lambda cp, a: a.transpose(0, 1, 2, 3), lambda cp, a: a[:, 1:]],
                         ids=["empty_like", "zeros_like", "ones_like", "astype", "transpose", "slice"])
def test_like_creation_astype_and_views_keep_the_layout(cp, make):
    """order='K' (cupy/_creation/basic.py _new_like_order_and_strides, core.pyx _astype) and views:
    the same memory order as the input, as in NumPy."""
    a = chwn(cp)
    r = make(cp, a)
    assert np.argsort(r.strides).tolist() == np.argsort(a.strides).tolist() and not r.flags.c_contiguous


def test_copy_and_ascontiguousarray_give_c_order(cp):
    a = chwn(cp)
    for r in (a.copy(), cp.ascontiguousarray(a)):
        assert r.flags.c_contiguous
    b = cp.ascontiguousarray(a.transpose(1, 2, 3, 0))        # already C-contiguous: the same array
    assert b.strides == a.transpose(1, 2, 3, 0).strides


# -- device memory ----------------------------------------------------------------------------------
def test_mem_info_is_free_and_total_bytes_and_the_pool_takes_from_free(cp, monkeypatch):
    """Device.mem_info is (free, total) as cudaMemGetInfo reports them (cupy/cuda/device.pyx):
    memory the pool holds is not free. The stand-in's device has $MINIVGG_FAKECUPY_MEMORY_MB."""
    monkeypatch.setenv("MINIVGG_FAKECUPY_MEMORY_MB", "1024")
    pool = cp.get_default_memory_pool()
    free, total = cp.cuda.Device().mem_info
    assert total == 2**30 == cp.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"]
    assert (free, total) == cp.cuda.runtime.memGetInfo() == (total - pool.total_bytes(), total)
    a = cp.empty((2**20,), np.float32)   # 4 MiB
    assert cp.cuda.Device(0).mem_info == (total - pool.total_bytes(), total) and pool.total_bytes() >= a.nbytes


def test_the_stand_ins_imports_run_downhill():
    """_state -> _device -> _ndarray -> _host_cuda -> cuda -> the package: each module imports only
    those before it, at the top of the file (no import inside a function closes a loop). Read
    from the source, since importing the package loads them all."""
    import ast
    from pathlib import Path

    import minivgg.testing.fakecupy as package
    order = ["_state", "_device", "_ndarray", "_host_cuda", "cuda", "__init__"]
    here = Path(package.__file__).parent
    assert sorted(p.stem for p in here.glob("*.py")) == sorted(order)
    for i, name in enumerate(order):
        tree = ast.parse((here / f"{name}.py").read_text())
        local = [(n.module or "").split(".")[0] or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and n.level == 1 for a in n.names]
        assert set(local) <= set(order[:i]), (name, local)
