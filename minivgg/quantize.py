"""Post-training int8 quantization of a trained VGG, written out as arithmetic: the rounding of weights and
activations, their calibration on a few hundred images, and a NumPy simulation of the integer network that
predicts what onnxruntime's int8 kernels compute (minivgg/deploy/onnx_int8.py writes the same numbers as
an ONNX graph of QuantizeLinear, QLinearConv, MaxPool and DequantizeLinear nodes).

Notation: N batch, C in-channels, F out-channels, H W map size; round() is round half to even (ONNX's
rule, np.rint); clip(v, a, b) saturates.

Weights, per output channel f, symmetric (zero point 0), B bits (8; 7 for CPUs without VNNI, below):
    s_w[f] = max|W[f]| / (2^(B-1) - 1)           W_q[f] = clip(round(W[f] / s_w[f]), -127, 127)  int8
Activations, one range [lo, hi] per tensor (lo <= 0 <= hi, so 0 is exact), asymmetric uint8:
    s = (hi - lo) / 255      z = round(-lo / s)   q = clip(round(x / s) + z, 0, 255)   x ~ (q - z) * s
    after a ReLU lo = 0, so z = 0 and the clip at 0 *is* the ReLU.
Calibration of [lo, hi] on N images run through the float network:
    'minmax'      lo = min(0, min x), hi = max(0, max x)
    'percentile'  lo = min(0, P_{100-p}(x)), hi = max(0, P_p(x)): the p-th percentile (p = 99.99) clips
                  the rare outliers that would otherwise stretch the step s for every other value.
Each Conv2d with its BatchNorm (eval) folded in, a = gamma / sqrt(var + eps):
    W' = W * a[f],   b' = (b - mean) * a + beta
and then one QLinearConv:
    acc[f] = sum_{c,kh,kw} (x_q - z_x) * W_q[f] + b_q[f]            b_q[f] = round(b'[f] / (s_x s_w[f]))  int32
    y_q    = clip(round(float32(acc) * m[f]) + z_y, 0, 255)          m[f] = s_x s_w[f] / s_y  (float32)
(the padding holds z_x, i.e. a real 0). MaxPool runs on the uint8 codes as they are: max commutes with an
increasing map. After the last block the codes are dequantized and the head (average pool, Linear layers)
runs in float32, its weights stored as int8 per output row and dequantized (W_q * s_w).

Why 7 bits on CPUs without AVX-512 VNNI / AVX-VNNI: there onnxruntime's u8 x s8 kernels multiply with
vpmaddubsw, which adds pairs of products into int16 and saturates when 2 * 255 * 127 > 32767; with weights
in [-63, 63] no pair can saturate (onnxruntime's own quantizer calls this reduce_range).
"""
from __future__ import annotations

import numpy as np

from . import backend
from .kernels.cpu import im2col_cpu, maxpool_forward_cpu, out_size
from .layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                     ReLU)

RULES = ("minmax", "percentile")
QMIN, QMAX = 0, 255          # uint8 activations


# -- the two roundings ----------------------------------------------------------------------------
def quantize_per_channel(w, bits: int = 8):
    """Symmetric per-output-channel quantization of a weight (F, ...): (W_q int8, s_w float32 (F,)).

    s_w[f] = max|W[f]| / (2^(bits-1) - 1); a channel of zeros gets s_w = 1 (its codes are all 0).
    """
    if bits not in (7, 8):
        raise ValueError(f"quantize_per_channel: bits must be 8, or 7 for CPUs without VNNI, got {bits}")
    w = np.asarray(backend.to_numpy(w), dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)                      # (F,)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)           # (F,)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -qmax, qmax)
    return q.astype(np.int8), scale


def activation_qparams(lo: float, hi: float):
    """(scale float32, zero point uint8) of the uint8 grid covering [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite: the calibration images gave "
                         "inf or NaN activations")
    scale = np.float32((hi - lo) / (QMAX - QMIN)) if hi > lo else np.float32(1.0)
    zero = int(np.clip(np.rint(QMIN - lo / float(scale)), QMIN, QMAX))
    return scale, np.uint8(zero)


def quantize(x, scale, zero):
    """ONNX QuantizeLinear to uint8: clip(round(x / s) + z, 0, 255), in float32 as onnxruntime does."""
    v = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero)
    return np.clip(v, QMIN, QMAX).astype(np.uint8)


def dequantize(q, scale, zero):
    """ONNX DequantizeLinear: (q - z) * s, float32."""
    return ((np.asarray(q).astype(np.int32) - int(zero)).astype(np.float32) * np.float32(scale))


# -- calibration -------------------------------------------------------------------------------------
class Calibrator:
    """The range [lo, hi] of one tensor over the calibration images, by rule 'minmax' or 'percentile'.

    observe(x) for every batch, then range(). 'percentile' keeps the values it saw; past max_values it
    keeps every second one (a deterministic thinning), so its memory stays bounded.
    """

    def __init__(self, rule: str = "minmax", percentile: float = 99.99, max_values: int = 1 << 22):
        if rule not in RULES:
            raise ValueError(f"calibration rule must be one of {RULES}, got {rule!r}")
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.rule, self.percentile, self.max_values = rule, float(percentile), int(max_values)
        self.lo, self.hi, self.values, self.count = np.inf, -np.inf, [], 0

    def observe(self, x) -> None:
        x = np.asarray(backend.to_numpy(x), dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if self.rule == "percentile":
            self.values.append(x.copy())
            self.count += x.size
            while self.count > self.max_values:     # thin what is kept, evenly
                self.values = [v[::2] for v in self.values]
                self.count = sum(v.size for v in self.values)

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("Calibrator.range(): no values observed")
        if self.rule == "minmax":
            return min(self.lo, 0.0), max(self.hi, 0.0)
        v = np.concatenate(self.values)
        lo, hi = np.percentile(v, [100.0 - self.percentile, self.percentile])
        return min(float(lo), 0.0), max(float(hi), 0.0)


# -- the quantized network ----------------------------------------------------------------------------
def fold_batchnorm(conv: Conv2d, bn: BatchNorm2d | None):
    """(W', b') in float64: the conv with its eval-mode BatchNorm folded in (module docstring)."""
    w = np.asarray(backend.to_numpy(conv.params["weight"]), np.float64)           # (F, C, KH, KW)
    b = (np.asarray(backend.to_numpy(conv.params["bias"]), np.float64) if "bias" in conv.params
         else np.zeros(w.shape[0]))                                               # (F,)
    if bn is None:
        return w, b
    g = lambda k, src: np.asarray(backend.to_numpy(src[k]), np.float64)           # noqa: E731
    a = g("weight", bn.params) / np.sqrt(g("running_var", bn.buffers) + bn.eps)   # (F,)
    return w * a[:, None, None, None], (b - g("running_mean", bn.buffers)) * a + g("bias", bn.params)


def _trunk_blocks(model):
    """The trunk as [('conv', conv, bn, relu_index) | ('pool', pool)], refusing what int8 cannot map."""
    layers, blocks, i = model.features.layers, [], 0
    while i < len(layers):
        m = layers[i]
        if isinstance(m, Conv2d):
            bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], BatchNorm2d) else None
            j = i + (2 if bn is not None else 1)
            if j >= len(layers) or not isinstance(layers[j], ReLU):
                raise ValueError(f"int8: features.{i} (Conv2d) must be followed by [BatchNorm2d and] ReLU; "
                                 "the ReLU becomes the uint8 clip at 0")
            blocks.append(("conv", m, bn, j))
            i = j + 1
        elif isinstance(m, MaxPool2d):
            blocks.append(("pool", m))
            i += 1
        else:
            raise ValueError(f"int8: no integer mapping for features.{i} ({type(m).__name__}); "
                             "supported: Conv2d [+ BatchNorm2d] + ReLU, MaxPool2d")
    return blocks


class Int8VGG:
    """A VGG quantized to int8: the integers and scales, and `forward`, the NumPy simulation of them.

    Built by quantize_vgg(). stages: dicts, one per trunk block:
      {'op': 'conv', 'name', 'w_q' int8 (F,C,KH,KW), 'w_scale' (F,), 'b_q' int32 (F,), 'stride', 'pad',
       'x_scale', 'x_zero', 'y_scale', 'y_zero'} or {'op': 'maxpool', 'name', 'kernel', 'stride', 'pad'}
    head: [('avgpool', (P, P)) | ('flatten',) | ('linear', name, w_q, w_scale, bias) | ('relu',)]
    """

    def __init__(self, config, input_shape, input_scale, input_zero, stages, head, calibration):
        self.config, self.input_shape = dict(config), tuple(int(s) for s in input_shape)
        self.input_scale, self.input_zero = np.float32(input_scale), np.uint8(input_zero)
        self.stages, self.head, self.calibration = stages, head, dict(calibration)

    def features(self, x, keep: bool = False):
        """Float input (N, C, H, W) -> the last block's uint8 codes (N, F, h, w); keep=True also returns
        {stage name: uint8 output} of every stage."""
        x = np.asarray(backend.to_numpy(x), np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"Int8VGG: expected input (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        q = quantize(x, self.input_scale, self.input_zero)                         # (N, C, H, W) uint8
        outs = {}
        for st in self.stages:
            q = conv_int8(q, st) if st["op"] == "conv" else maxpool_uint8(q, st)
            if keep:
                outs[st["name"]] = q
        return (q, outs) if keep else q

    def head_forward(self, q):
        """The last codes (N, F, h, w) -> float32 logits (N, K): dequantize, then the float head."""
        last = [s for s in self.stages if s["op"] == "conv"][-1]
        h = dequantize(q, last["y_scale"], last["y_zero"])                          # (N, F, h, w)
        for step in self.head:
            if step[0] == "avgpool":
                h = AdaptiveAvgPool2d(step[1]).forward(h)                          # (N, F, P, P)
            elif step[0] == "flatten":
                h = h.reshape(h.shape[0], -1)                                      # (N, F*P*P)
            elif step[0] == "relu":
                h = np.maximum(h, np.float32(0))
            else:
                _, _, w_q, w_s, b = step
                w = w_q.astype(np.float32) * w_s[:, None]                          # (out, in)
                h = h @ w.T + b                                                    # (N, out)
        return h.astype(np.float32)

    def forward(self, x):
        """The simulated int8 network: float32 logits (N, K)."""
        return self.head_forward(self.features(x))

    __call__ = forward


def conv_int8(q, st):
    """One QLinearConv: uint8 codes (N, C, H, W) -> uint8 codes (N, F, OH, OW) (module docstring)."""
    N, C, H, W = q.shape
    w_q = st["w_q"]                                                              # (F, C, KH, KW) int8
    F, _, KH, KW = w_q.shape
    (sh, sw), (ph, pw) = st["stride"], st["pad"]
    OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
    xc = q.astype(np.float64) - float(st["x_zero"])                              # (N, C, H, W) exact
    cols = im2col_cpu(xc, KH, KW, (sh, sw), (ph, pw))                            # (C*KH*KW, OH*OW*N), pad 0
    acc = w_q.reshape(F, -1).astype(np.float64) @ cols                           # (F, OH*OW*N) exact ints
    acc = acc.astype(np.int64) + st["b_q"].astype(np.int64)[:, None]             # (F, OH*OW*N) int32 range
    m = (np.float32(st["x_scale"]) * st["w_scale"].astype(np.float32)) / np.float32(st["y_scale"])  # (F,)
    y = np.rint(acc.astype(np.float32) * m[:, None]) + np.float32(st["y_zero"])  # (F, OH*OW*N)
    y = np.clip(y, QMIN, QMAX).astype(np.uint8)
    return np.ascontiguousarray(y.reshape(F, OH, OW, N).transpose(3, 0, 1, 2))   # (N, F, OH, OW)


def maxpool_uint8(q, st):
    """MaxPool on the codes: (N, C, H, W) uint8 -> (N, C, OH, OW) uint8."""
    (kh, kw), stride, pad = st["kernel"], st["stride"], st["pad"]
    out, _ = maxpool_forward_cpu(q.astype(np.float32), kh, kw, stride, pad)      # exact on 0..255
    return out.astype(np.uint8)


def quantize_vgg(model, images, rule: str = "percentile", percentile: float = 99.99, batch_size: int = 64,
                 weight_bits: int = 8, progress=None) -> Int8VGG:
    """Calibrate on `images` (N, C, H, W) float32, already normalised as in training, and quantize.

    The activation ranges come from the float network in eval mode (BatchNorm with running statistics).
    progress: an optional callable wrapping an iterable (tqdm) for the calibration batches.
    """
    from .models.vgg import VGG
    if not isinstance(model, VGG):
        raise TypeError(f"quantize_vgg: expected a minivgg VGG, got {type(model).__name__}")
    images = np.asarray(backend.to_numpy(images), np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"quantize_vgg: calibration images must be (N, C, H, W) with N >= 1, "
                         f"got shape {images.shape}")
    model.check_input_shape(images.shape)
    calibrator = lambda: Calibrator(rule, percentile)                             # noqa: E731
    blocks = _trunk_blocks(model)
    model.eval()
    layers = model.features.layers
    cal_in, cal = calibrator(), {j: calibrator() for b in blocks if b[0] == "conv" for j in [b[3]]}
    device = backend.device_of(layers[0].params["weight"])
    batches = range(0, len(images), batch_size)
    for s in (progress(batches) if progress else batches):
        h = backend.to_device(images[s:s + batch_size], device)
        cal_in.observe(h)
        for j, layer in enumerate(layers):
            h = layer.forward(h)
            if j in cal:
                cal[j].observe(h)
    x_scale, x_zero = activation_qparams(*cal_in.range())
    ranges = {"input": cal_in.range()}
    stages, (s_x, z_x) = [], (x_scale, x_zero)
    for b in blocks:
        if b[0] == "pool":
            (kh, kw), stride, pad = b[1].kernel_size, b[1].stride, b[1].padding
            stages.append({"op": "maxpool", "name": _name(model, b[1]), "kernel": (kh, kw),
                           "stride": tuple(stride), "pad": tuple(pad)})
            continue
        _, conv, bn, j = b
        w, bias = fold_batchnorm(conv, bn)
        w_q, w_s = quantize_per_channel(w, weight_bits)
        ranges[_name(model, conv)] = cal[j].range()
        y_scale, y_zero = activation_qparams(*cal[j].range())                     # lo = 0: zero 0
        b_q = np.rint(bias / (np.float64(s_x) * w_s.astype(np.float64)))          # (F,)
        b_q = np.clip(b_q, -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        stages.append({"op": "conv", "name": _name(model, conv), "w_q": w_q, "w_scale": w_s, "b_q": b_q,
                       "stride": tuple(conv.stride), "pad": tuple(conv.padding),
                       "x_scale": s_x, "x_zero": z_x, "y_scale": y_scale, "y_zero": y_zero})
        s_x, z_x = y_scale, y_zero
    head = []
    for name, m in model.modules():
        if not name.startswith(("avgpool", "flatten", "classifier")) or m.children():
            continue
        if isinstance(m, AdaptiveAvgPool2d):
            head.append(("avgpool", tuple(m.output_size)))
        elif isinstance(m, Flatten):
            head.append(("flatten",))
        elif isinstance(m, ReLU):
            head.append(("relu",))
        elif isinstance(m, Linear):
            w_q, w_s = quantize_per_channel(m.params["weight"], 8)
            b = (np.asarray(backend.to_numpy(m.params["bias"]), np.float32) if "bias" in m.params
                 else np.zeros(w_q.shape[0], np.float32))
            head.append(("linear", name, w_q, w_s, b))
        elif not isinstance(m, Dropout):
            raise ValueError(f"int8: no mapping for head layer '{name}' ({type(m).__name__})")
    calibration = {"rule": rule, "percentile": percentile if rule == "percentile" else None,
                   "images": int(len(images)), "weight_bits": int(weight_bits), "ranges": ranges}
    return Int8VGG(model.config, images.shape[1:], x_scale, x_zero, stages, head, calibration)


def _name(model, layer) -> str:
    return next(n for n, m in model.modules() if m is layer)
