"""minivgg's CUDA kernels (minivgg/kernels/kernels.cu): right on the GPU backend, able to fail, and
compiled by nvcc for real GPUs.

On a machine without a GPU the GPU backend is the CuPy stand-in, which compiles the same .cu
text for the host, so every check here runs the shipped kernel source. Mutants of that source
(a deliberate indexing error each, made here and never shipped) prove the checks catch bugs.
"""
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from minivgg import backend, random_stream
from minivgg.kernels import gpu as gpu_kernels
from minivgg.kernels import im2col, col2im, maxpool_backward, maxpool_forward
from minivgg.kernels.cpu import col2im_cpu, im2col_cpu
from minivgg.layers.pool import maxpool2d_naive

needs_gpu_backend = pytest.mark.skipif(not backend.gpu_available(), reason="no GPU backend (CuPy or its stand-in)")
DTYPES = [np.float64, np.float32, np.float16]
# (kernel, stride, padding) for im2col / col2im: overlapping, disjoint, strided past the kernel, padded
CONV_CASES = [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 3, 0), (5, 1, 2), (3, 3, 0), (4, 2, 1)]
# for max-pool, padding <= kernel // 2 (PyTorch's rule)
POOL_CASES = [(k, s, p) for k in (1, 2, 3, 4) for s in (1, 2, 3, 5) for p in range(k // 2 + 1)]


def tol(dtype):
    return {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3}[dtype]


def check_im2col_col2im(rng, dtype=np.float32, cases=CONV_CASES):
    for (k, s, p) in cases:
        x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
        cols = im2col_cpu(x, k, k, (s, s), (p, p))
        gcols = im2col(backend.to_device(x, "gpu"), k, k, (s, s), (p, p))
        np.testing.assert_array_equal(backend.to_numpy(gcols), cols, err_msg=f"im2col k{k} s{s} p{p}")
        dcols = rng.standard_normal(cols.shape).astype(dtype)
        dx = col2im_cpu(dcols, x.shape, k, k, (s, s), (p, p)).astype(np.float64)
        gdx = backend.to_numpy(col2im(backend.to_device(dcols, "gpu"), x.shape, k, k, (s, s), (p, p)))
        np.testing.assert_allclose(gdx.astype(np.float64), dx, rtol=tol(dtype), atol=4 * tol(dtype),
                                   err_msg=f"col2im k{k} s{s} p{p}")


def check_maxpool(rng, dtype=np.float32, cases=POOL_CASES):
    """GPU forward and backward against the loop reference, on sizes where windows miss pixels."""
    for (k, s, p) in cases:
        for H, W in ((7, 5), (6, 6)):
            if H + 2 * p < k or W + 2 * p < k:
                continue
            x = rng.permutation(2 * 3 * H * W).reshape(2, 3, H, W).astype(dtype)   # distinct: no ties
            ref, ref_backward = maxpool2d_naive(x, k, s, p)
            out, argmax = maxpool_forward(backend.to_device(x, "gpu"), k, k, (s, s), (p, p))
            np.testing.assert_array_equal(backend.to_numpy(out), ref, err_msg=f"pool forward k{k} s{s} p{p}")
            dout = rng.standard_normal(ref.shape).astype(dtype)
            dx = maxpool_backward(backend.to_device(dout, "gpu"), argmax, x.shape, k, k, (s, s), (p, p))
            # where windows overlap, a pixel sums several douts, in another order than the loops
            # (and, for float16, in float32 before one rounding): equal to rounding, not bit for bit
            overlap = (s < k) * 3 * tol(dtype)
            np.testing.assert_allclose(backend.to_numpy(dx), ref_backward(dout), rtol=overlap, atol=overlap,
                                       err_msg=f"pool backward k{k} s{s} p{p} size {H}x{W}")


@needs_gpu_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32", "f16"])
def test_im2col_col2im_on_the_gpu_backend(dtype):
    check_im2col_col2im(np.random.default_rng(0), dtype)


@needs_gpu_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32", "f16"])
def test_maxpool_on_the_gpu_backend(dtype):
    cases = POOL_CASES if dtype != np.float16 else [(2, 2, 0), (3, 1, 1), (3, 2, 1)]   # f16 is exact to 2048
    check_maxpool(np.random.default_rng(0), dtype, cases)


def test_maxpool_nan_propagates_as_in_pytorch(device):
    """A window holding NaN yields NaN, and its gradient goes to the last NaN, as PyTorch does, on both backends."""
    x = np.array([[[[1, np.nan, 3, np.nan], [np.nan, 5, 3, 2], [4, 4, 1, 0], [-np.inf, -np.inf, 0, 1]]]],
                 np.float32)
    out, argmax = maxpool_forward(backend.to_device(x, device), 1, 4, (1, 4), (0, 0))
    tout, tidx = torch.nn.functional.max_pool2d(torch.from_numpy(x), (1, 4), return_indices=True)
    np.testing.assert_array_equal(backend.to_numpy(out), tout.numpy())
    np.testing.assert_array_equal(backend.to_numpy(argmax), tidx.numpy() % 4)


# -- mutants: a check that cannot fail proves nothing ---------------------------------------------------
MUTANTS = {
    "im2col forgets the padding offset": ("kh, xx = ow * sw - pw + kw;", "kh, xx = ow * sw + kw;", check_im2col_col2im),
    "col2im swaps the kernel offsets": ("const long long row = ((long long)c * KH + kh) * KW + kw;",
                                        "const long long row = ((long long)c * KH + kw) * KW + kh;",
                                        check_im2col_col2im),
    "max-pool lets the last maximum win a tie": ("v > best || v != v", "v >= best || v != v", None),
    "pool backward ignores the argmax": ("if (argmax[o] == kh * KW + kw) acc", "if (argmax[o] >= 0) acc",
                                         check_maxpool),
}


@needs_gpu_backend
@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_kernel_checks_catch_a_mutant(monkeypatch, name):
    original, mutated, check = MUTANTS[name]
    source = gpu_kernels.SOURCE.read_text()
    assert source.count(original) == 1, "the mutant no longer applies: update it with the kernel"
    module = backend.cupy.RawModule(code=source.replace(original, mutated), options=("-std=c++17",),
                                    name_expressions=gpu_kernels.NAME_EXPRESSIONS)
    monkeypatch.setattr(gpu_kernels, "_module", module)
    rng = np.random.default_rng(0)
    if check is None:   # the tie rule: a window of equal values must point at its first element
        x = np.zeros((1, 1, 2, 2), np.float32)
        _, argmax = maxpool_forward(backend.to_device(x, "gpu"), 2, 2, (2, 2), (0, 0))
        assert backend.to_numpy(argmax).item() != 0
        return
    with pytest.raises(AssertionError):
        check(rng)


# -- the random numbers ------------------------------------------------------------------------------
@needs_gpu_backend
def test_philox_matches_the_published_known_answer():
    """Random123's kat_vectors: philox4x32-10, counter 0, key 0 -> first word 0x6627e8d5."""
    u = backend.to_numpy(gpu_kernels.uniform_gpu((1,), seed=0, offset=0))
    assert u[0] == np.float32((0x6627E8D5 >> 8) / 2**24)


@needs_gpu_backend
def test_gpu_random_stream_is_a_pure_function_of_seed_and_offset():
    random_stream.seed(5)
    a = backend.to_numpy(random_stream.random_uniform(backend.cupy, (10,), np.float32))
    b = backend.to_numpy(random_stream.random_uniform(backend.cupy, (2, 3), np.float32)).ravel()
    state = random_stream.rng_state()
    assert state["gpu"] == {"seed": 5, "offset": 16}
    c = backend.to_numpy(random_stream.random_uniform(backend.cupy, (4,), np.float32))
    random_stream.seed(5)
    whole = backend.to_numpy(random_stream.random_uniform(backend.cupy, (16,), np.float32))
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)    # draws continue, never repeat
    random_stream.set_rng_state(state)
    np.testing.assert_array_equal(backend.to_numpy(random_stream.random_uniform(backend.cupy, (4,), np.float32)), c)
    random_stream.seed(6)
    assert not np.array_equal(backend.to_numpy(random_stream.random_uniform(backend.cupy, (16,), np.float32)), whole)


@needs_gpu_backend
def test_gpu_uniform_is_uniform():
    u = backend.to_numpy(gpu_kernels.uniform_gpu((200_000,), seed=123, offset=0)).astype(np.float64)
    assert 0.0 <= u.min() and u.max() < 1.0
    # mean and variance of U[0,1): 1/2 and 1/12, within 5 standard errors
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / u.size)
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = ((counts - u.size / 20) ** 2 / (u.size / 20)).sum()
    assert chi2 < 45.3   # chi-square, 19 degrees of freedom, p = 0.001


def test_old_checkpoint_rng_state_still_loads():
    """A checkpoint written before the GPU stream was saved holds the bare NumPy state."""
    random_stream.seed(3)
    old = random_stream.get_rng().bit_generator.state
    expected = random_stream.get_rng().random(3)
    random_stream.seed(4)
    random_stream.set_rng_state(old)
    np.testing.assert_array_equal(random_stream.get_rng().random(3), expected)
    assert random_stream.rng_state()["gpu"] == {"seed": 0, "offset": 0}


# -- nvcc: the same source for real GPUs ------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (the CUDA toolkit is not installed)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_for_real_gpus(tmp_path, arch):
    """nvcc compiles kernels.cu, every instantiation CuPy asks NVRTC for, with no spills."""
    instantiate = ", ".join(f"(void*)&{name}" for name in gpu_kernels.NAME_EXPRESSIONS + ["uniform"])
    src = tmp_path / "kernels.cu"
    src.write_text(gpu_kernels.SOURCE.read_text() + f"\nvoid* minivgg_instantiate[] = {{{instantiate}}};\n")
    done = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "--resource-usage",
                           "-o", str(tmp_path / "kernels.cubin"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = done.stdout + done.stderr
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", report))
    assert len(compiled) == len(gpu_kernels.NAME_EXPRESSIONS) + 1, report
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and not any(spills), report
