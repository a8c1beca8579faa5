# The fast paths (im2col + GEMM convolution, vectorised max-pool) must equal the loop
# references beside them, on every shape class, and must not change when the batch is chunked.
import numpy as np
import pytest

from minivgg import backend, kernels
from minivgg.kernels import batch_chunks, out_size
from minivgg.layers import (CONV_ENGINES, Conv2d, MaxPool2d, TunedConv2d, conv2d_naive, conv2d_naive_backward,
                            make_conv2d, maxpool2d_naive)
from minivgg.layers.base import pair
from minivgg.layers.conv_fast import flipped_kernel_applies

# Relative error ||a - b|| / ||b|| allowed between two summation orders of the same products.
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(params=sorted(CONV_ENGINES))
def engine(request):
    """Each registered convolution engine in turn: the textbook and every tuned one."""
    return request.param


@pytest.fixture
def tiny_workspace():
    """A 0.001 MB im2col budget: every sample of the shapes below becomes its own chunk."""
    old = kernels.get_workspace_limit()
    kernels.set_workspace_limit(0.001)
    try:
        yield
    finally:
        kernels.set_workspace_limit(None)         # back to the defaults (or $MINIVGG_WORKSPACE_MB)
        assert kernels.get_workspace_limit() == old


# (N, C, H, W, F, kernel, stride, padding, bias)
CONV_CASES = [
    (2, 3, 8, 8, 4, 3, 1, 1, True),
    (1, 2, 7, 5, 3, 3, 1, 0, True),              # batch 1, odd non-square image
    (3, 2, 9, 11, 4, 5, 2, 2, True),             # kernel 5, stride 2, padding 2
    (2, 4, 6, 9, 5, 1, 1, 0, True),              # kernel 1
    (2, 3, 10, 7, 2, 1, 2, 1, False),            # kernel 1 with stride and padding, no bias
    (3, 2, 8, 6, 3, 3, 2, 1, False),             # stride 2, no bias
    (2, 3, 9, 10, 2, (3, 5), (2, 1), (1, 2), True),  # non-square kernel, stride and padding
    (2, 1, 3, 3, 2, 5, 1, 2, True),              # kernel covers the whole padded image
    (2, 1, 6, 5, 8, 3, 1, 1, True),              # stride 1 with F > C: dx by col2im, not the flip
    (2, 5, 6, 5, 4, 3, 1, 1, True),              # stride 1 with F < C: dx by the flipped kernel
    (3, 4, 5, 7, 4, 3, 1, 0, False),             # F == C, no padding: the flip pads dout by K-1
    (1, 8, 2, 1, 4, 3, 1, 1, True),              # F < C but weight larger than the columns: col2im
]
CONV_IDS = [f"N{c[0]}C{c[1]}_{c[2]}x{c[3]}_F{c[4]}_k{c[5]}_s{c[6]}_p{c[7]}_b{int(c[8])}" for c in CONV_CASES]


def takes_the_flip(case) -> bool:
    N, C, H, W, F, k, s, p, _ = case
    (KH, KW), (sh, sw), (ph, pw) = pair(k), pair(s), pair(p)
    M = N * out_size(H, KH, sh, ph) * out_size(W, KW, sw, pw)
    return flipped_kernel_applies((KH, KW), (sh, sw), (ph, pw), F, C, M)


def test_the_cases_take_both_input_gradient_paths():
    """TunedConv2d.backward has two ways to dL/dx; the cases above must reach each of them."""
    flip = [takes_the_flip(case) for case in CONV_CASES]
    assert any(flip) and not all(flip)


def folds_the_bias(case) -> bool:
    N, C, H, W, F, k, s, p, bias = case
    layer = TunedConv2d(C, F, k, stride=s, padding=p, bias=bias)
    (KH, KW), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return layer.folds_bias(C * KH * KW, N * out_size(H, KH, sh, ph) * out_size(W, KW, sw, pw))


def test_the_cases_take_both_bias_paths():
    """TunedConv2d.forward adds the bias in the product (the bias trick) or after it; the cases
    with a bias must reach each."""
    fold = [folds_the_bias(case) for case in CONV_CASES if case[-1]]
    assert any(fold) and not all(fold)


@pytest.mark.parametrize("C,H,folds", [(2, 6, True), (16, 1, False)], ids=["K<M", "K>=M"])
def test_the_bias_trick_puts_a_row_of_ones_under_the_columns(C, H, folds):
    """Folded: the kept columns have K+1 rows, the last all ones, and forward added the bias
    there (out equals the reference). Not folded: K rows."""
    rng = np.random.default_rng(4)
    layer = TunedConv2d(C, 3, 3, padding=1).astype(np.float64)
    layer.params["bias"][...] = rng.standard_normal(3)
    x = rng.standard_normal((2, C, H, H))
    out = layer.forward(x)
    K = C * 9
    cols = layer.cache[1]
    assert cols.shape == (K + folds, 2 * H * H)
    if folds:
        np.testing.assert_array_equal(cols[K], 1.0)
    ref = conv2d_naive(x, layer.params["weight"], layer.params["bias"], padding=1)
    assert rel(out, ref) < RTOL[np.float64]


def make_conv(rng, dtype, N, C, H, W, F, k, s, p, bias, algo="im2col"):
    """A Conv2d of engine `algo` with a non-trivial bias, an input and an upstream gradient,
    all host arrays."""
    layer = make_conv2d(C, F, k, stride=s, padding=p, bias=bias, algo=algo).astype(dtype)
    if bias:  # PyTorch's init makes a tiny bias; a large one would hide errors in W @ cols
        layer.params["bias"][...] = rng.standard_normal(F)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    OH, OW = out_size(H, layer.kernel_size[0], layer.stride[0], layer.padding[0]), \
        out_size(W, layer.kernel_size[1], layer.stride[1], layer.padding[1])
    dout = rng.standard_normal((N, F, OH, OW)).astype(dtype)
    return layer, x, dout


def run_fast(layer, x, dout, device):
    """Conv2d forward and backward on `device`: [out, dx, dW(, db)] as NumPy arrays."""
    layer.to(device)
    out = layer.forward(backend.to_device(x, device))
    dx = layer.backward(backend.to_device(dout, device))
    grads = [layer.grads["weight"]] + ([layer.grads["bias"]] if "bias" in layer.params else [])
    return [backend.to_numpy(a) for a in [out, dx] + grads]


def run_reference(layer, x, dout):
    weight = backend.to_numpy(layer.params["weight"])
    bias = backend.to_numpy(layer.params["bias"]) if "bias" in layer.params else None
    out = conv2d_naive(x, weight, bias, stride=layer.stride, padding=layer.padding)
    dx, dW, db = conv2d_naive_backward(x, weight, dout, stride=layer.stride, padding=layer.padding)
    return [out, dx, dW] + ([db] if bias is not None else [])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_equals_loop_reference(device, rng, engine, dtype, case):
    layer, x, dout = make_conv(rng, dtype, *case, algo=engine)
    ref = run_reference(layer, x, dout)
    fast = run_fast(layer, x, dout, device)
    assert len(fast) == len(ref) == (4 if case[-1] else 3)
    for name, a, b in zip(["out", "dx", "dW", "db"], fast, ref):
        assert a.dtype == dtype, f"{name} came back as {a.dtype}"
        assert a.shape == b.shape, name
        assert rel(a, b) < RTOL[dtype], f"{name}: relative error {rel(a, b):.2e}"


def test_the_default_workspace_follows_the_device(device, monkeypatch):
    """256 MB on the CPU; on a GPU 1/16 of the device's total memory (at least 256 MB): VGG-16's
    second layer at 224x224, batch 128 (115.6 MB of columns an image) runs in 3 chunks on an
    80 GiB GPU, not 64 of 2 images. set_workspace_limit, or $MINIVGG_WORKSPACE_MB, holds on both."""
    monkeypatch.delenv("MINIVGG_WORKSPACE_MB", raising=False)
    monkeypatch.setenv("MINIVGG_FAKECUPY_MEMORY_MB", str(80 * 1024))   # the stand-in's device: 80 GiB
    monkeypatch.setattr(kernels, "_gpu_defaults", {})
    kernels.set_workspace_limit(None)
    x = backend.to_device(np.zeros((1, 64, 2, 2), np.float32), device)
    per_image = 64 * 9 * 224 * 224 * 4
    try:
        if device == "cpu":
            assert kernels.get_workspace_limit(x) == 256 * 2**20 == kernels.get_workspace_limit()
            assert len(batch_chunks(128, per_image, like=x)) == 64
        else:
            total = backend.device_memory(x)[1]
            assert kernels.get_workspace_limit(x) == max(256 * 2**20, total // 16) == kernels.gpu_workspace_default(total)
            if getattr(backend.cupy, "is_fake", False):
                assert total == 80 * 2**30 and len(batch_chunks(128, per_image, like=x)) == 3
        kernels.set_workspace_limit(512)
        assert kernels.get_workspace_limit(x) == 512 * 2**20 and len(batch_chunks(128, per_image, like=x)) == 32
        monkeypatch.setenv("MINIVGG_WORKSPACE_MB", "1024")
        kernels.set_workspace_limit(None)
        assert kernels.get_workspace_limit(x) == 2**30
    finally:
        monkeypatch.undo()
        kernels.set_workspace_limit(None)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_chunked_batch_is_unchanged(device, rng, engine, tiny_workspace, case):
    N, C = case[:2]
    layer, x, dout = make_conv(rng, np.float64, *case, algo=engine)
    KH, KW = layer.kernel_size
    per_sample = C * KH * KW * dout.shape[2] * dout.shape[3] * x.itemsize
    assert len(batch_chunks(N, per_sample)) == N, "the workspace limit did not split the batch"
    chunked = run_fast(layer, x, dout, device)
    kernels.set_workspace_limit(256)
    assert len(batch_chunks(N, per_sample)) == 1
    whole = run_fast(layer, x, dout, device)
    ref = run_reference(layer, x, dout)
    for name, a, b, r in zip(["out", "dx", "dW", "db"], chunked, whole, ref):
        # Every product here is a GEMM whose width changes with the chunk, and BLAS (cuBLAS
        # too) may block, and so round, a wider product differently: OpenBLAS's AVX-512
        # kernels do, for the forward too (its AVX2 kernels happened not to); dW and db sum
        # over the batch, so chunking changes their order of summation.
        assert rel(a, b) < RTOL[np.float64], name
        assert rel(a, r) < RTOL[np.float64], name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_every_conv_engine_equals_the_textbook(device, rng, engine, dtype, case):
    """The same weights, input and dout through the textbook Conv2d and through `engine`:
    out, dx, dW and db agree to rounding (the engines sum in other orders)."""
    layer, x, dout = make_conv(rng, dtype, *case, algo=engine)
    textbook = Conv2d(*layer.params["weight"].shape[:2][::-1], layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, bias="bias" in layer.params).astype(dtype)
    textbook.load_state_dict(layer.state_dict())
    assert list(textbook.state_dict()) == list(layer.state_dict())
    for name, a, b in zip(["out", "dx", "dW", "db"], run_fast(layer, x, dout, device),
                          run_fast(textbook, x, dout, device)):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert rel(a, b) < RTOL[dtype], f"{name}: relative error {rel(a, b):.2e}"


def test_make_conv2d_names_the_engines_it_knows():
    with pytest.raises(ValueError, match=r"unknown algo 'winograd'.*'im2col', 'im2col-fast'"):
        make_conv2d(1, 1, 3, algo="winograd")


# (N, C, H, W, kernel, stride, padding)
POOL_CASES = [
    (2, 3, 8, 8, 2, None, 0),          # the VGG pool
    (1, 2, 7, 9, 3, 2, 0),             # overlapping, odd sizes, batch 1
    (2, 2, 7, 6, 3, 2, 1),             # overlapping, padded
    (2, 1, 6, 7, (2, 3), (1, 2), (1, 1)),  # non-square window, stride and padding
    (1, 2, 5, 5, 5, 1, 2),             # window as big as the padded image allows
    (2, 2, 9, 4, 3, 3, 0),             # sizes that leave pixels unvisited
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("N,C,H,W,k,s,p", POOL_CASES)
def test_maxpool2d_equals_loop_reference(device, rng, dtype, N, C, H, W, k, s, p):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    out_ref, backward_ref = maxpool2d_naive(x, k, s, p)
    dout = rng.standard_normal(out_ref.shape).astype(dtype)
    layer = MaxPool2d(k, stride=s, padding=p)
    out = backend.to_numpy(layer.forward(backend.to_device(x, device)))
    dx = backend.to_numpy(layer.backward(backend.to_device(dout, device)))
    assert out.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(out, out_ref)      # a maximum is a selection: exact
    dx_ref = backward_ref(dout)
    assert dx.shape == dx_ref.shape
    assert rel(dx, dx_ref) < RTOL[dtype]             # overlapping windows may add in another order
    np.testing.assert_array_equal(dx == 0, dx_ref == 0)


@pytest.mark.parametrize("first_mb,then_mb", [(256, 0.001), (0.001, 256)],
                         ids=["kept-whole-then-chunked", "chunked-then-whole"])
@pytest.mark.parametrize("case", CONV_CASES[:3] + CONV_CASES[-1:], ids=CONV_IDS[:3] + CONV_IDS[-1:])
def test_conv2d_workspace_limit_changed_between_forward_and_backward(device, rng, engine, tiny_workspace,
                                                                     first_mb, then_mb, case):
    """Backward uses the columns forward kept (whole batch), or rebuilds them all: never a mix."""
    layer, x, dout = make_conv(rng, np.float64, *case, algo=engine)
    layer.to(device)
    kernels.set_workspace_limit(first_mb)
    out = layer.forward(backend.to_device(x, device))
    kernels.set_workspace_limit(then_mb)
    dx = layer.backward(backend.to_device(dout, device))
    grads = [layer.grads["weight"]] + ([layer.grads["bias"]] if "bias" in layer.params else [])
    ref = run_reference(layer, x, dout)
    for name, a, b in zip(["out", "dx", "dW", "db"], [out, dx] + grads, ref):
        assert rel(backend.to_numpy(a), b) < RTOL[np.float64], name


# (N, C, H, W, kernel, stride, padding): the im2col shapes of CONV_CASES, plus gaps between windows
COL_CASES = [(c[0], c[1], c[2], c[3], c[5], c[6], c[7]) for c in CONV_CASES] + [(2, 2, 9, 8, 2, 3, 1)]


@pytest.mark.parametrize("N,C,H,W,k,s,p", COL_CASES)
def test_im2col_and_col2im_equal_their_loop_references(device, rng, N, C, H, W, k, s, p):
    (KH, KW), stride, pad = [(v, v) if isinstance(v, int) else v for v in (k, s, p)]
    x = rng.standard_normal((N, C, H, W))
    cols_ref = kernels.im2col_naive(x, KH, KW, stride, pad)
    cols = backend.to_numpy(kernels.im2col(backend.to_device(x, device), KH, KW, stride, pad))
    np.testing.assert_array_equal(cols, cols_ref)                      # a copy: exact
    dcols = rng.standard_normal(cols_ref.shape)
    dx_ref = kernels.col2im_naive(dcols, x.shape, KH, KW, stride, pad)
    dx = backend.to_numpy(kernels.col2im(backend.to_device(dcols, device), x.shape, KH, KW, stride, pad))
    assert rel(dx, dx_ref) < RTOL[np.float64]                          # overlaps add in another order
    # adjoints: <im2col(x), dcols> == <x, col2im(dcols)>
    assert abs(np.vdot(cols_ref, dcols) - np.vdot(x, dx_ref)) < 1e-10 * np.abs(cols_ref * dcols).sum()


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 1, 1), (3, 2, 7, 3)])
def test_batchnorm2d_fused_equals_its_reference(device, rng, shape):
    from minivgg.layers import BatchNorm2d, batchnorm2d_reference
    C = shape[1]
    layer = BatchNorm2d(C).astype(np.float64)
    layer.params["weight"][...] = rng.uniform(0.5, 2.0, C)
    layer.params["bias"][...] = rng.standard_normal(C)
    x = rng.standard_normal(shape) * 3 + 2
    dout = rng.standard_normal(shape)
    layer.to(device)
    xd, doutd = backend.to_device(x, device), backend.to_device(dout, device)
    out = layer.forward(xd)
    dx = layer.backward(doutd)
    out_ref, backward_ref = batchnorm2d_reference(xd, layer.params["weight"], layer.params["bias"], layer.eps)
    dx_ref, dgamma_ref, dbeta_ref = backward_ref(doutd)
    for name, a, b in [("out", out, out_ref), ("dx", dx, dx_ref), ("dgamma", layer.grads["weight"], dgamma_ref),
                       ("dbeta", layer.grads["bias"], dbeta_ref)]:
        assert rel(backend.to_numpy(a), backend.to_numpy(b)) < RTOL[np.float64], name
