# Winograd's F(2x2, 3x3) and F(4x4, 3x3): the matrices, the per-tile reference and the engine,
# against the loop convolution, PyTorch and central differences, on both backends.
import threading

import numpy as np
import pytest

from minivgg import backend, kernels, random_stream
from minivgg.gradcheck import check_layer
from minivgg.kernels.cpu import winograd_tiles_cpu, winograd_untile_cpu
from minivgg.layers import Conv2d, conv2d_naive, conv2d_naive_backward, make_conv2d
from minivgg.layers.conv_winograd import (MATRICES, AutoConv2d, Winograd4Conv2d, WinogradConv2d,
                                          conv2d_winograd_naive, conv2d_winograd_naive_backward,
                                          tile_grid, winograd_f23)

# ||a - b|| / ||b|| against the float64 loop convolution, per dtype and tile: float64 and float32
# are a few roundings of the transforms' constants apart (F(4x4)'s are larger: 8 in A^T, 5 in
# B^T, 1/24 in G); float16 is rounded once at the end (2^-11 per element) after float32 work.
TOL = {(np.float64, 2): 1e-12, (np.float64, 4): 1e-12, (np.float32, 2): 1e-5, (np.float32, 4): 3e-5,
       (np.float16, 2): 2e-3, (np.float16, 4): 2e-3}
ENGINES = {2: WinogradConv2d, 4: Winograd4Conv2d}


def rel(a, b):
    a, b = np.asarray(backend.to_numpy(a), np.float64), np.asarray(backend.to_numpy(b), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def correlate_1d(d, g, m):
    return np.array([sum(d[i + k] * g[k] for k in range(3)) for i in range(m)])


@pytest.mark.parametrize("m", [2, 4])
def test_the_matrices_compute_the_1d_correlation_exactly(m):
    """y = A^T [(G g) * (B^T d)] is the 3-tap correlation of an (m+2)-long d, for any d and g."""
    BT, G, AT = MATRICES[m]
    assert BT.shape == (m + 2, m + 2) and G.shape == (m + 2, 3) and AT.shape == (m, m + 2)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), correlate_1d(d, g, m), rtol=1e-13, atol=1e-13)


def test_f23_takes_four_products_and_equals_the_matrices():
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal(4), rng.standard_normal(3)
    BT, G, AT = MATRICES[2]
    np.testing.assert_allclose(winograd_f23(d, g), correlate_1d(d, g, 2), rtol=1e-14)
    np.testing.assert_allclose(winograd_f23(d, g), AT @ ((G @ g) * (BT @ d)), rtol=1e-14)


# (N, C, H, W, F, padding): VGG's padding 1, odd sizes whose last tiles hang over, batch 1,
# no padding, and more padding than the kernel needs
SHAPES = [(2, 3, 8, 8, 4, 1), (1, 2, 7, 5, 3, 1), (2, 4, 9, 6, 5, 0), (1, 3, 5, 3, 2, 2),
          (3, 5, 2, 2, 4, 1), (2, 2, 11, 13, 3, 1)]
IDS = [f"N{s[0]}C{s[1]}_{s[2]}x{s[3]}_F{s[4]}_p{s[5]}" for s in SHAPES]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_the_per_tile_reference_equals_the_loop_convolution(rng, m, shape):
    N, C, H, W, F, p = shape
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, 3, 3)), rng.standard_normal(F)
    out = conv2d_winograd_naive(x, w, b, padding=p, m=m)
    ref = conv2d_naive(x, w, b, padding=p)
    assert out.shape == ref.shape and rel(out, ref) < 1e-13
    dout = rng.standard_normal(ref.shape)
    for name, a, r in zip(["dx", "dW", "db"], conv2d_winograd_naive_backward(x, w, dout, padding=p, m=m),
                          conv2d_naive_backward(x, w, dout, padding=p)):
        assert a.shape == r.shape and rel(a, r) < 1e-13, name


def run(layer, x, dout, device):
    layer.to(device)
    out = layer.forward(backend.to_device(x, device))
    dx = layer.backward(backend.to_device(dout, device))
    return [backend.to_numpy(a) for a in (out, dx, layer.grads["weight"], layer.grads["bias"])]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_the_engine_equals_the_references(device, rng, dtype, m, shape):
    """out, dx, dW, db of the engine against the loop convolution (in float64, on the same
    dtype-rounded inputs) and the per-tile reference, in the input's dtype."""
    N, C, H, W, F, p = shape
    layer = ENGINES[m](C, F, 3, padding=p).astype(dtype)
    layer.params["bias"][...] = rng.standard_normal(F)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    dout = rng.standard_normal((N, F, H + 2 * p - 2, W + 2 * p - 2)).astype(dtype)
    assert layer.algorithm(H, W, dtype) == f"winograd{m}"
    got = run(layer, x, dout, device)
    w, b = (backend.to_numpy(layer.params[k]).astype(np.float64) for k in ("weight", "bias"))
    x64, d64 = x.astype(np.float64), dout.astype(np.float64)
    ref = [conv2d_naive(x64, w, b, padding=p), *conv2d_naive_backward(x64, w, d64, padding=p)]
    tiled = [conv2d_winograd_naive(x64, w, b, padding=p, m=m), *conv2d_winograd_naive_backward(x64, w, d64, p, m)]
    for name, a, r, t in zip(["out", "dx", "dW", "db"], got, ref, tiled):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert rel(a, r) < TOL[dtype, m], f"{name}: {rel(a, r):.2e} from the loop convolution"
        assert rel(a, t) < TOL[dtype, m], f"{name}: {rel(a, t):.2e} from the per-tile reference"


@pytest.mark.parametrize("m", [2, 4])
def test_the_engine_on_vgg_shapes_equals_pytorch(device, rng, m):
    """VGG's 3x3 padding-1 layers at a few of their sizes (channels cut to keep it quick), float32,
    against torch's conv2d and autograd, at the float32 parity tolerance of the scale."""
    torch = pytest.importorskip("torch")
    for N, C, F, H in [(4, 16, 32, 32), (4, 64, 64, 8), (2, 128, 64, 4), (2, 64, 128, 2), (1, 32, 16, 7)]:
        layer = ENGINES[m](C, F, 3, padding=1)
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        dout = rng.standard_normal((N, F, H, H)).astype(np.float32)
        got = run(layer, x, dout, device)
        tx = torch.tensor(x, requires_grad=True)
        tw = torch.tensor(backend.to_numpy(layer.params["weight"]), requires_grad=True)
        tb = torch.tensor(backend.to_numpy(layer.params["bias"]), requires_grad=True)
        y = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
        ref = [y.detach().numpy(), *(g.numpy() for g in torch.autograd.grad(y, (tx, tw, tb), torch.tensor(dout)))]
        for name, a, r in zip(["out", "dx", "dW", "db"], got, ref):
            err = np.abs(a - r).max() / np.abs(r).max()
            assert err < 1e-4, f"{N}x{C}x{H}x{H} -> {F}, {name}: {err:.2e} of the scale"


@pytest.mark.parametrize("cls", [WinogradConv2d, Winograd4Conv2d])
def test_float64_gradcheck(device, rng, cls):
    layer = cls(2, 3, 3, padding=1).astype(np.float64).to(device)
    x = backend.to_device(rng.standard_normal((2, 2, 5, 6)), device)
    errors = check_layer(layer, x)
    assert set(errors) == {"x", "weight", "bias"}
    for name, err in errors.items():
        assert err < 1e-7, f"{name}: {err!r}"


@pytest.mark.parametrize("m", [2, 4])
def test_chunked_batch_is_unchanged(device, rng, m):
    """A workspace too small for one sample's tiles: every image is its own chunk, V is rebuilt
    in backward, and the results equal the whole batch's."""
    layer = ENGINES[m](3, 4, 3, padding=1).astype(np.float64)
    x, dout = rng.standard_normal((3, 3, 7, 9)), rng.standard_normal((3, 4, 7, 9))
    old = kernels.get_workspace_limit()
    try:
        kernels.set_workspace_limit(0.001)
        chunked = run(layer, x, dout, device)
        assert layer.cache[4] is None, "the chunked forward kept its tiles"
    finally:
        kernels.set_workspace_limit(old / 2**20)
    whole = run(layer, x, dout, device)
    assert layer.cache[4] is not None, "the one-chunk forward did not keep its tiles"
    for name, a, b in zip(["out", "dx", "dW", "db"], chunked, whole):
        assert rel(a, b) < 1e-13, name


def test_needs_input_grad_false_skips_dx_and_keeps_dw(rng):
    layer = WinogradConv2d(3, 4, 3, padding=1).astype(np.float64)
    x, dout = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((2, 4, 6, 6))
    _, _, dW, db = run(layer, x, dout, "cpu")
    layer.needs_input_grad = False
    layer.forward(x)
    assert layer.backward(dout) is None
    np.testing.assert_array_equal(layer.grads["weight"], dW)
    np.testing.assert_array_equal(layer.grads["bias"], db)


@pytest.mark.parametrize("k,s", [(5, 1), (3, 2), (1, 1)])
def test_other_shapes_fall_back_to_im2col(rng, k, s):
    """Not 3x3 stride 1: algorithm() says im2col, and forward/backward equal the loop reference."""
    for cls in (WinogradConv2d, Winograd4Conv2d, AutoConv2d):
        layer = cls(2, 3, k, stride=s, padding=k // 2).astype(np.float64)
        assert layer.algorithm(9, 9) == "im2col"
        x = rng.standard_normal((2, 2, 9, 9))
        out = layer.forward(x)
        dout = rng.standard_normal(out.shape)
        dx = layer.backward(dout)
        w, b = layer.params["weight"], layer.params["bias"]
        rdx, rdW, _ = conv2d_naive_backward(x, w, dout, stride=s, padding=k // 2)
        assert rel(out, conv2d_naive(x, w, b, stride=s, padding=k // 2)) < 1e-12
        assert rel(dx, rdx) < 1e-12 and rel(layer.grads["weight"], rdW) < 1e-12


def test_auto_rule_on_vgg11_at_32x32():
    """The rule's choices on VGG-11's layers at 32x32 (see AutoConv2d.algorithm)."""
    layers = [(3, 32), (64, 16), (128, 8), (256, 8), (256, 4), (512, 4), (512, 2)]
    got = [AutoConv2d(c, 64, 3, padding=1).algorithm(h, h) for c, h in layers]
    assert got == ["im2col", "winograd4", "winograd4", "winograd4", "winograd4", "winograd4", "im2col"]
    assert AutoConv2d(64, 64, 3, padding=1).algorithm(16, 16, np.float16) == "winograd4"
    assert AutoConv2d(64, 64, 3, padding=0).algorithm(5, 5) == "im2col"           # a 3x3 output


def test_auto_is_bit_repeatable_on_the_cpu(rng):
    x = rng.standard_normal((4, 16, 8, 8)).astype(np.float32)
    dout = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    results = []
    for _ in range(2):
        random_stream.seed(3)
        layer = make_conv2d(16, 8, 3, padding=1, algo="auto")
        results.append(run(layer, x, dout, "cpu"))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("q,k,step,pad", [(4, 4, 2, (1, 1)), (6, 6, 4, (1, 2)), (2, 4, 2, (0, 0)), (3, 3, 3, (0, 0))])
def test_tile_kernels_equal_on_both_backends_and_untile_is_the_gathers_adjoint(rng, q, k, step, pad):
    """winograd_tiles with L = I is a gather of overlapping windows, and winograd_untile adds
    them back: <tiles(x), T> == <x, untile(T)>. The GPU kernels equal the NumPy forms."""
    N, C, H, W = 2, 3, 7, 6
    TH, TW = -(-(H + 2 * pad[0] - q) // step) + 1, -(-(W + 2 * pad[1] - q) // step) + 1
    x = rng.standard_normal((N, C, H, W))
    eye = np.eye(q)
    T = winograd_tiles_cpu(x, eye, step, pad, (TH, TW))                       # (q*q, C, P)
    dT = rng.standard_normal(T.shape)
    dx = winograd_untile_cpu(dT, q, step, pad, x.shape, (TH, TW))
    assert abs(np.vdot(T, dT) - np.vdot(x, dx)) < 1e-10 * np.abs(T * dT).sum()
    L = rng.standard_normal((k, q))
    bias = rng.standard_normal(C)
    cpu = [winograd_tiles_cpu(x, L, step, pad, (TH, TW)),
           winograd_untile_cpu(dT, q, step, pad, x.shape, (TH, TW), bias)]
    if backend.gpu_available():
        g = lambda a: backend.to_device(a, "gpu")  # noqa: E731
        gpu = [kernels.winograd_tiles(g(x), g(L), step, pad, (TH, TW)),
               kernels.winograd_untile(g(dT), q, step, pad, x.shape, (TH, TW), g(bias))]
        for a, b in zip(gpu, cpu):
            assert rel(a, b) < 1e-13


def test_tile_grid_covers_odd_sizes():
    assert tile_grid(7, 5, (1, 1), 2) == ((7, 5), (4, 3))
    assert tile_grid(7, 5, (1, 1), 4) == ((7, 5), (2, 2))
    assert tile_grid(3, 3, (0, 0), 4) == ((1, 1), (1, 1))


def test_vgg_builds_every_conv_with_the_chosen_engine_and_summary_names_the_algorithms():
    from minivgg.models import VGG, summary
    model = VGG("vgg11_bn", num_classes=10, in_channels=1, width_ratio=8, hidden=(16,), pool_size=1,
                conv_algo="winograd4")
    convs = [m for _, m in model.modules() if isinstance(m, Conv2d)]
    assert len(convs) == 8 and all(type(m) is Winograd4Conv2d for m in convs)
    assert "conv_algo" not in model.config            # how, not what: checkpoints load into any engine
    text = summary(model, (1, 32, 32))
    assert text.splitlines()[2].rstrip().endswith("Algo")
    assert sum(line.rstrip().endswith("winograd4") for line in text.splitlines()) == 8
    auto = summary(VGG("vgg11", num_classes=10, in_channels=1, width_ratio=1, conv_algo="auto"), (1, 32, 32))
    picks = [line.split()[-1] for line in auto.splitlines() if "AutoConv2d" in line]
    assert picks == [AutoConv2d(c, 64, 3, padding=1).algorithm(h, h) for c, h in
                     [(1, 32), (64, 16), (128, 8), (256, 8), (256, 4), (512, 4), (512, 2), (512, 2)]]
    with pytest.raises(ValueError, match=r"conv_algo must be one of .*'winograd4'.*got 'fft'"):
        VGG("vgg11", conv_algo="fft")


def test_train_vgg11_conv_algo_flag():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "train_vgg11.py"
    spec = importlib.util.spec_from_file_location("train_vgg11_for_winograd", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    # the default depends on the device (Winograd is measured faster on the CPU only); a typed flag, a
    # preset and a resumed run's own choice are kept
    assert cli.parse_args([]).conv_algo == "auto"
    assert cli.parse_args(["--preset", "d2l"]).conv_algo == "auto"
    assert cli.parse_args(["--device", "gpu"]).conv_algo == "im2col-fast"
    assert cli.parse_args(["--device", "gpu", "--conv-algo", "winograd4"]).conv_algo == "winograd4"
    cli._SAVED["started-before.npz"] = {"args": {"conv_algo": "im2col-fast"}}   # as saved_extra reads it
    assert cli.parse_args(["--resume", "started-before.npz"]).conv_algo == "im2col-fast"
    assert cli.parse_args(["--resume", "started-before.npz", "--conv-algo", "winograd2"]).conv_algo == "winograd2"
    args = cli.parse_args(["--conv-algo", "auto"])
    model = cli.make_model(args, 10, 1)
    assert all(type(m) is AutoConv2d for _, m in model.modules() if isinstance(m, Conv2d))
    with pytest.raises(SystemExit):
        cli.parse_args(["--conv-algo", "fft"])


@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
def test_a_frozen_winograd_layer_makes_no_weight_gradient_and_the_same_dx(algo):
    """As every conv engine: freeze() means no dL/dW, dL/db work; dL/dx is unchanged."""
    rng = np.random.default_rng(4)
    random_stream.seed(0)
    conv = make_conv2d(6, 5, 3, padding=1, algo=algo).astype(np.float64)
    x, dout = rng.standard_normal((2, 6, 7, 9)), rng.standard_normal((2, 5, 7, 9))
    conv.forward(x)
    dx = conv.backward(dout)
    assert set(conv.grads) == {"weight", "bias"}
    conv.freeze()
    conv.forward(x)
    np.testing.assert_array_equal(conv.backward(dout), dx)
    assert conv.grads == {}


@pytest.mark.parametrize("m", [2, 4])
def test_reused_work_memory_changes_no_result(device, rng, m):
    """The engine keeps U, V, M, ... in its Scratch from call to call. Batches that grow, shrink
    and change the map size give what a fresh layer gives, bit for bit, and no later call
    changes what an earlier one returned (outputs and gradients are never work memory)."""
    layer = ENGINES[m](4, 6, 3, padding=1).astype(np.float64).to(device)
    layer.params["bias"][...] = backend.to_device(rng.standard_normal(6), device)
    calls = []
    for N, H, W in [(3, 9, 7), (5, 6, 6), (2, 9, 7), (3, 9, 7)]:
        x, dout = rng.standard_normal((N, 4, H, W)), rng.standard_normal((N, 6, H, W))
        fresh = ENGINES[m](4, 6, 3, padding=1).astype(np.float64)
        fresh.load_state_dict(layer.state_dict())
        want = run(fresh, x, dout, device)
        got = [layer.forward(backend.to_device(x, device))]
        got += [layer.backward(backend.to_device(dout, device)), layer.grads["weight"], layer.grads["bias"]]
        for name, a, b in zip(["out", "dx", "dW", "db"], got, want):
            np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=name)
        calls.append((got, want))
    assert set(layer.work.buffers) == {"U", "V"}
    assert set(backend.shared_scratch().buffers) >= {"M", "T", "dU"}
    for got, want in calls:   # after every later call
        for name, a, b in zip(["out", "dx", "dW", "db"], got, want):
            np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=f"{name}, changed by a later call")


def test_layers_share_their_temporaries_so_memory_is_the_largest_layers_not_the_sum(rng):
    """Two layers in one thread: the second, smaller one computes in the first one's memory;
    each keeps only its own U and V (backward needs them). Another thread has its own."""
    backend.shared_scratch().clear()
    big, small = Winograd4Conv2d(8, 8, 3, padding=1), Winograd4Conv2d(4, 4, 3, padding=1)
    for layer, C in ((big, 8), (small, 4)):
        y = layer.forward(rng.standard_normal((2, C, 8, 8)).astype(np.float32))
        layer.backward(np.ones_like(y))
        if layer is big:
            memory = dict(backend.shared_scratch().buffers)
    now = backend.shared_scratch().buffers
    assert now.keys() == memory.keys() and all(now[k] is memory[k] for k in now), "grown or replaced"
    assert not np.shares_memory(big.work.buffers["V"], small.work.buffers["V"])
    other = []
    thread = threading.Thread(target=lambda: other.append(backend.shared_scratch()))
    thread.start()
    thread.join()
    assert other[0] is not backend.shared_scratch()


def test_scratch_reuses_memory_that_fits_and_replaces_what_does_not():
    work = backend.Scratch()
    like = np.zeros(1, np.float32)
    a = work.get("a", (4, 5), like)
    assert a.shape == (4, 5) and a.dtype == np.float32
    b = work.get("a", (2, 3), like)                       # fits: the same memory
    assert np.shares_memory(a, b)
    c = work.get("a", (5, 5), like)                       # larger: new memory, kept from now on
    assert not np.shares_memory(a, c) and np.shares_memory(c, work.get("a", (25,), like))
    d = work.get("a", (2, 3), like, np.float64)           # another dtype: new memory
    assert d.dtype == np.float64 and not np.shares_memory(c, d)
    assert not np.shares_memory(work.get("b", (2, 3), like), work.get("a", (2, 3), like, np.float64))
    work.clear()
    assert work.buffers == {} and not np.shares_memory(work.get("a", (2, 3), like, np.float64), d)


@pytest.mark.parametrize("q,step,pad", [(6, 4, (1, 1)), (4, 2, (2, 0)), (4, 4, (0, 0))])
def test_tile_gathers_into_reused_memory_equal_fresh_ones(rng, q, step, pad):
    """winograd_tiles_cpu's padded map and windows in a Scratch that held other data (a larger
    map with another padding): the zero border is rewritten, the tiles equal fresh ones."""
    work = backend.Scratch()
    big = rng.standard_normal((3, 4, 11, 12)) + 5.0                   # leaves non-zero memory behind
    winograd_tiles_cpu(big, np.eye(q), step, (2, 2), (4, 4), scratch=work)
    pad_memory = work.buffers["tiles.pad"]
    N, C, H, W = 2, 3, 7, 6
    tiles = (-(-(H + 2 * pad[0] - q) // step) + 1, -(-(W + 2 * pad[1] - q) // step) + 1)
    x = rng.standard_normal((N, C, H, W))
    L = rng.standard_normal((q, q))
    out = np.empty((q * q, C, tiles[0] * tiles[1] * N))
    got = winograd_tiles_cpu(x, L, step, pad, tiles, out=out, scratch=work)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(got, winograd_tiles_cpu(x, L, step, pad, tiles))
    assert work.buffers["tiles.pad"] is pad_memory, "a smaller map did not reuse the memory"
