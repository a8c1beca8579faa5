"""Work minivgg splits over the CPU cores gives the same bits as one core.

The CPU kernels (kernels/threads.py's pool) cut copies (im2col), per-channel loops (col2im, max-pool) and Adam's
elementwise update into slices or blocks that run on a thread pool. Nothing is summed
across slices, so the results must not depend on the thread count at all. The arrays
here are small, so PARALLEL_MIN_BYTES is lowered to make every kernel split, and
_THREADS is set to 1 (no split), 2 and 3 (uneven slices).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minivgg import kernels
from minivgg.kernels import cpu
from minivgg.kernels import threads as pool
from minivgg.layers import Linear
from minivgg.optim import Adam
from minivgg.optim import optimizers

THREADS = [1, 2, 3]


@pytest.fixture
def threads(monkeypatch):
    """Call with n: the kernels then split their work n ways, however small it is."""
    monkeypatch.setattr(pool, "PARALLEL_MIN_BYTES", 0)

    def use(n):
        monkeypatch.setattr(pool, "_THREADS", n)
    return use


def test_the_helpers_cover_every_index_once(threads):
    for n_threads in THREADS:
        threads(n_threads)
        for n in (1, 2, 5, 17):
            seen = []
            pool.over_cores(lambda s: seen.extend(range(n)[s]), n, nbytes=1)
            assert sorted(seen) == list(range(n))
            seen = []
            pool.over_blocks(lambda s: seen.extend(range(n)[s]), n, bytes_per_item=4, block_bytes=12)
            assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("shape", [(3, 4, 40, 5), (6, 2, 3, 7)], ids=["long_axis_1", "long_axis_0"])
def test_parallel_copyto_copies_everything(threads, shape):
    src = np.random.default_rng(0).standard_normal(shape).transpose(0, 2, 1, 3)   # strided source
    for n in THREADS:
        threads(n)
        dst = np.zeros(src.shape)
        pool.parallel_copyto(dst, src)
        np.testing.assert_array_equal(dst, src)


# (N, C, H, W, kernel, stride, padding)
CASES = [(4, 5, 9, 8, 3, 1, 1), (2, 3, 7, 7, 3, 2, 0), (3, 1, 6, 5, 2, 2, 1), (5, 7, 4, 4, 3, 1, 1)]


@pytest.mark.parametrize("N,C,H,W,k,s,p", CASES)
def test_im2col_and_col2im_do_not_depend_on_the_thread_count(threads, N, C, H, W, k, s, p):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    cols_ref = kernels.im2col_naive(x, k, k, (s, s), (p, p))
    dcols = rng.standard_normal(cols_ref.shape).astype(np.float32)
    dx_ref = kernels.col2im_naive(dcols, x.shape, k, k, (s, s), (p, p))
    results = []
    for n in THREADS:
        threads(n)
        cols = cpu.im2col_cpu(x, k, k, (s, s), (p, p))
        dx = cpu.col2im_cpu(dcols, x.shape, k, k, (s, s), (p, p))
        np.testing.assert_array_equal(cols, cols_ref)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)   # float32, adds in another order
        results.append(dx)
    for dx in results[1:]:
        np.testing.assert_array_equal(dx, results[0])                   # the same bits on 1, 2, 3 threads


@pytest.mark.parametrize("N,C,H,W,k,s,p", CASES)
def test_maxpool_does_not_depend_on_the_thread_count(threads, monkeypatch, N, C, H, W, k, s, p):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    results = []
    for n in THREADS:
        threads(n)
        monkeypatch.setattr(cpu, "over_blocks", lambda fn, C, per, block_bytes=0: pool.run_on_cores(
            [lambda c=c: fn(slice(c, c + 1)) for c in range(C)]))        # one channel per block
        out, argmax = cpu.maxpool_forward_cpu(x, k, k, (s, s), (p, p))
        dout = np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)
        dx = cpu.maxpool_backward_cpu(dout, argmax, x.shape, k, k, (s, s), (p, p))
        results.append((out, argmax, dx))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            np.testing.assert_array_equal(a, b)


def test_adam_in_blocks_on_the_cores_equals_adam_on_the_whole_array(threads, monkeypatch):
    """A weight of 3 x 2^18 + 5 numbers: Adam's 1 MB blocks cut it into 4, the last short.
    Blocked on 1 or 3 threads, the steps equal the whole-array update bit for bit (and
    torch.optim.Adam's to float32 rounding)."""
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((1, 3 * 2**18 + 5)).astype(np.float32)
    grads = [rng.standard_normal(w0.shape).astype(np.float32) for _ in range(3)]
    blocks = []

    def run(n_threads, blocked):
        threads(n_threads)
        monkeypatch.setattr(optimizers, "over_blocks",
                            lambda fn, n, *a, **k: (blocks.append(n), pool.over_blocks(fn, n, *a, **k))
                            if blocked else fn(slice(0, n)))
        model = Linear(w0.shape[1], 1, bias=False)
        model.params["weight"][...] = w0
        opt = Adam(model, lr=1e-2)
        steps = []
        for g in grads:
            model.grads["weight"] = g
            opt.step()
            steps.append(model.params["weight"].copy())
        return steps

    whole = run(1, blocked=False)
    assert not blocks
    for n_threads in (1, 3):
        for a, b in zip(run(n_threads, blocked=True), whole):
            np.testing.assert_array_equal(a, b)
    assert blocks == [w0.size] * 2 * len(grads)      # the blocked path ran, once a step
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.Adam([tw], lr=1e-2)
    for g, ours in zip(grads, whole):
        tw.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_allclose(ours, tw.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_the_thread_count_comes_from_the_environment_or_set_num_threads(monkeypatch):
    monkeypatch.setenv("MINIVGG_NUM_THREADS", "3")
    assert pool._threads_from_environment() == 3
    monkeypatch.delenv("MINIVGG_NUM_THREADS")
    assert 1 <= pool._threads_from_environment() <= 8
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("MINIVGG_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="MINIVGG_NUM_THREADS"):
            pool._threads_from_environment()
    monkeypatch.setattr(pool, "_THREADS", pool._THREADS)      # restored after the test
    kernels.set_num_threads(3)
    assert kernels.get_num_threads() == 3
    seen = []
    pool.over_cores(lambda s: seen.append(s), 9, nbytes=2**30)
    assert len(seen) == 3 and len(pool._thread_pool()._threads) <= 2
    for bad in (0, 2.0, True, "2"):
        with pytest.raises(ValueError, match="set_num_threads"):
            kernels.set_num_threads(bad)


ROOT = Path(__file__).resolve().parents[1]


def timeout_seen_by_numpy(code: str, preset: str | None) -> str:
    """OPENBLAS_THREAD_TIMEOUT as a fresh interpreter has it after running `code`; preset is
    the value it starts with (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = str(ROOT)
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    probe = f"{code}; import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("code,preset,expected", [
    ("import minivgg", None, "4"),                  # before NumPy: OpenBLAS's workers will sleep at once
    ("import numpy, minivgg", None, "unset"),       # after: too late, so nothing is changed
    ("import minivgg", "0", "0"),                   # the user's value (0: OpenBLAS's default) is kept
    ("import benchmarks.common", None, "4"),        # the benchmarks set what minivgg would
], ids=["minivgg-first", "numpy-first", "user-set", "benchmarks"])
def test_openblas_thread_timeout_is_set_only_before_numpy_and_only_when_unset(code, preset, expected):
    assert timeout_seen_by_numpy(code, preset) == expected
