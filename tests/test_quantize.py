"""int8 quantization: the rounding of weights and activations, the calibration rules on known data, the
NumPy simulation against onnxruntime's integer kernels stage by stage, and the float16 export."""
from pathlib import Path

import numpy as np
import pytest

import minivgg
from minivgg.models import VGG
from minivgg.quantize import (Calibrator, activation_qparams, dequantize, quantize, quantize_per_channel,
                              quantize_vgg)


def _vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni"))


# 8-bit weights only where onnxruntime's u8 x s8 kernels do not saturate int16 pairs (minivgg/quantize.py)
BITS = 8 if _vnni() else 7


def _trained_like(**kw):
    """A small VGG with spread BatchNorm statistics, so every channel's range differs."""
    minivgg.seed(0)
    model = VGG("vgg11_bn", num_classes=5, in_channels=1, width_ratio=16, dropout=0.0, **kw)
    rng = np.random.default_rng(3)
    for _, m in model.modules():
        if "running_mean" in getattr(m, "buffers", {}):
            c = m.buffers["running_mean"].shape[0]
            m.params["weight"][...] = rng.uniform(0.3, 1.5, c)
            m.params["bias"][...] = rng.normal(0, 0.3, c)
            m.buffers["running_mean"][...] = rng.normal(0, 0.2, c)
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
    return model.eval()


# -- rounding ------------------------------------------------------------------------------------------
def test_per_channel_scales_and_round_half_to_even():
    w = np.array([[127.0, 2.5, 3.5, -2.5],        # max 127: scale 1, so the codes are round(w)
                  [0.0, 0.0, 0.0, 0.0],           # a dead channel: scale 1, codes 0
                  [1.0, 0.5, -0.25, 0.003]], np.float32)
    q, s = quantize_per_channel(w)
    assert q.dtype == np.int8 and s.dtype == np.float32
    np.testing.assert_array_equal(s, np.float32([1.0, 1.0, 1 / 127]))
    np.testing.assert_array_equal(q[0], [127, 2, 4, -2])          # 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    np.testing.assert_array_equal(q[1], [0, 0, 0, 0])
    np.testing.assert_array_equal(q[2], [127, 64, -32, 0])        # 63.5 -> 64, -31.75 -> -32, 0.381 -> 0
    q7, s7 = quantize_per_channel(w, bits=7)
    assert s7[2] == np.float32(1 / 63) and q7[2, 0] == 63 and np.abs(q7).max() == 63


def test_weight_rounding_error_is_at_most_half_a_step():
    w = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32)
    q, s = quantize_per_channel(w)
    err = np.abs(q * s[:, None, None, None].astype(np.float64) - w)
    assert (err <= s[:, None, None, None] / 2 * (1 + 1e-6)).all()
    assert (np.abs(q).reshape(6, -1).max(axis=1) == 127).all()   # every channel uses its whole range
    with pytest.raises(ValueError, match="bits must be 8, or 7"):
        quantize_per_channel(w, bits=4)


def test_activation_grid_covers_zero_exactly_and_saturates():
    s, z = activation_qparams(0.0, 2.55)
    assert (s, z) == (np.float32(0.01), 0)
    s, z = activation_qparams(-1.0, 1.55)
    assert s == np.float32(0.01) and z == 100
    s2, z2 = activation_qparams(0.5, 2.55)                         # lo is widened to 0
    assert (s2, z2) == (np.float32(0.01), 0)
    x = np.array([-2.0, -1.0, 0.0, 0.004, 0.005, 0.015, 1.55, 9.0], np.float32)
    q = quantize(x, s, z)
    np.testing.assert_array_equal(q, [0, 0, 100, 100, 100, 102, 255, 255])   # 0.5 -> 0, 1.5 -> 2 (even)
    inside = (x >= -1.0) & (x <= 1.55)
    assert (np.abs(dequantize(q, s, z) - x)[inside] <= s / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="not finite"):
        activation_qparams(0.0, np.inf)


# -- calibration ---------------------------------------------------------------------------------------
def test_minmax_and_percentile_on_known_data():
    x = np.arange(10001, dtype=np.float32) / 100               # 0 .. 100 in steps of 0.01
    cal = Calibrator("minmax")
    for part in np.array_split(x, 7):
        cal.observe(part)
    assert cal.range() == (0.0, 100.0)
    cal = Calibrator("percentile", percentile=99.0)
    for part in np.array_split(x, 7):
        cal.observe(part)
    assert cal.range() == pytest.approx((0.0, 99.0))           # P99 of 0..10000 is 9900, and lo is 0
    signed = np.arange(-5000, 5001, dtype=np.float32)
    cal = Calibrator("percentile", percentile=99.9)
    cal.observe(signed)
    assert cal.range() == pytest.approx((-4990.0, 4990.0))
    outlier = np.concatenate([signed, [1e6]]).astype(np.float32)
    mm, pc = Calibrator("minmax"), Calibrator("percentile", percentile=99.9)
    mm.observe(outlier)
    pc.observe(outlier)
    assert mm.range()[1] == 1e6 and pc.range()[1] < 5000       # the percentile rule clips the outlier


def test_percentile_memory_is_bounded_by_thinning():
    cal = Calibrator("percentile", percentile=99.0, max_values=1000)
    x = np.arange(100000, dtype=np.float32)
    for part in np.array_split(x, 50):
        cal.observe(part)
        assert cal.count <= 1000
    assert cal.range()[1] == pytest.approx(99000, rel=0.01)
    with pytest.raises(ValueError, match="rule must be one of"):
        Calibrator("entropy")
    with pytest.raises(ValueError, match="no values observed"):
        Calibrator().range()


# -- the simulation against onnxruntime ------------------------------------------------------------------
@pytest.mark.parametrize("head,size", [(dict(head="gap"), 32), (dict(head="classic", hidden=(12,), pool_size=1), 32),
                                       (dict(head="classic", hidden=(), pool_size=2), 64)])
@pytest.mark.parametrize("rule", ["minmax", "percentile"])
def test_simulation_predicts_onnxruntime_within_one_step(head, size, rule):
    ort = pytest.importorskip("onnxruntime")
    from minivgg.deploy.onnx_int8 import build_int8_graph
    model = _trained_like(**head)
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(24, 1, size, size)).astype(np.float32)
    x = rng.normal(size=(9, 1, size, size)).astype(np.float32)
    q = quantize_vgg(model, calib, rule, percentile=99.9, batch_size=10, weight_bits=BITS)
    sess = ort.InferenceSession(build_int8_graph(q, debug=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    last, stages = q.features(x, keep=True)
    assert len(stages) == 13                                     # 8 QLinearConv + 5 MaxPool
    for name, codes in stages.items():
        got = outs[f"{name}.q"]
        assert got.dtype == np.uint8 and got.shape == codes.shape
        assert np.abs(got.astype(np.int32) - codes.astype(np.int32)).max() <= 1, name
    # logits: one code step of the last map moves logit k by at most s * sum_j |W_kj| (through a
    # float head that only averages, then multiplies); the float32 head itself rounds at ~1e-6
    logits = q.head_forward(last)
    s_last = float([s for s in q.stages if s["op"] == "conv"][-1]["y_scale"])
    lin = [st for st in q.head if st[0] == "linear"]
    bound = s_last
    for _, _, w_q, w_s, _ in lin:
        bound = bound * float(np.abs(w_q * w_s[:, None]).sum(axis=1).max())
    scale = float(np.abs(logits).max())
    assert np.abs(outs["logits"] - logits).max() <= bound + 1e-5 * scale
    assert q.calibration["rule"] == rule and q.calibration["weight_bits"] == BITS


def test_int8_stays_close_to_float_and_file_is_about_4x_smaller():
    """The int8 network's rounding is bounded: codes use the calibrated range, so the logits move by a few
    steps, not by their own size; and int8 weights take a quarter of float32's bytes."""
    pytest.importorskip("onnxruntime")
    from minivgg.deploy.onnx_export import build_graph
    from minivgg.deploy.onnx_int8 import build_int8_graph
    model = _trained_like(head="gap")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 1, 32, 32)).astype(np.float32)
    q = quantize_vgg(model, x, "minmax", weight_bits=BITS)
    want, got = model.forward(x), q.forward(x)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    ratio = len(build_graph(model, (1, 32, 32)).SerializeToString()) / len(build_int8_graph(q).SerializeToString())
    assert 3.0 < ratio < 4.2


def test_bad_models_and_inputs_are_named():
    from minivgg.layers import Conv2d, Sequential
    model = _trained_like(head="gap")
    with pytest.raises(ValueError, match=r"calibration images must be \(N, C, H, W\) with N >= 1"):
        quantize_vgg(model, np.zeros((0, 1, 32, 32), np.float32))
    with pytest.raises(TypeError, match="expected a minivgg VGG"):
        quantize_vgg(Sequential(Conv2d(1, 2, 3)), np.zeros((1, 1, 32, 32), np.float32))
    q = quantize_vgg(model, np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32))
    with pytest.raises(ValueError, match=r"expected input \(N, 1, 32, 32\), got \(2, 1, 28, 28\)"):
        q.forward(np.zeros((2, 1, 28, 28), np.float32))


# -- float16 -------------------------------------------------------------------------------------------------
def test_float16_export_runs_in_onnxruntime_within_float16_rounding(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from minivgg.deploy.onnx_export import build_graph, export_onnx
    model = _trained_like(head="classic", hidden=(12,), pool_size=1)
    path = export_onnx(model, tmp_path / "m16.onnx", (1, 32, 32), precision="float16")
    export_onnx(model, tmp_path / "m32.onnx", (1, 32, 32))
    proto = onnx.load(str(path))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert 1.8 < (tmp_path / "m32.onnx").stat().st_size / path.stat().st_size < 2.05
    x = np.random.default_rng(4).normal(size=(6, 1, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    want = model.forward(x)
    assert got.dtype == np.float32
    # float16 rounds each weight and each layer's result by u = 2^-11 relative: over the network's
    # L = 14 computing layers the error stays within about 2 * L * u of the logits' scale
    L = 14
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2 * L * 2.0 ** -11
    assert err > 0          # it did round: not the float32 graph
    with pytest.raises(ValueError, match="precision must be one of"):
        export_onnx(model, tmp_path / "m8.onnx", (1, 32, 32), precision="int8")
    assert build_graph(model, (1, 32, 32)).graph.initializer[0].data_type == onnx.TensorProto.FLOAT
