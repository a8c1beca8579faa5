"""Export a minivgg VGG as an ONNX graph (built layer by layer with the `onnx` package's helper API), so
onnxruntime, TensorRT, OpenVINO or a browser can run the trained model. Needs the extra: pip install '.[export]'.

One ONNX node per minivgg layer, in the order of model.modules():
    Conv2d            -> Conv (pads, strides; weight (F, C, KH, KW) as is)
    BatchNorm2d       -> BatchNormalization (eval: running_mean, running_var, eps)
    ReLU              -> Relu
    MaxPool2d         -> MaxPool
    AdaptiveAvgPool2d -> GlobalAveragePool (1x1), AveragePool (bins that tile the map), or in
                         general MatMul(A, MatMul(x, B^T)) with the bin-averaging matrices A, B
    Flatten           -> Flatten(axis=1)
    Linear            -> Gemm(transB=1): y = x W^T + b
    Dropout           -> nothing (inference)
Outputs: "logits" (N, K) and "probabilities" = Softmax(logits). precision="float16" stores every weight as
float16 and computes in float16 between a Cast of the input and a Cast of the two outputs, so the file is
half the size and its callers still pass and receive float32 (to_float16 below). The batch dimension is dynamic ("N");
H and W are fixed to the image size the model was trained at. The preprocessing (image size, channels,
mean, std, scale 1/255), the class names and the model config go into metadata_props as JSON.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .. import backend
from ..layers import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU

OPSET = 17


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'minivgg[export]' "
                          "(or pip install onnx onnxruntime)") from e
    return onnx, helper, numpy_helper


def bin_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) float32 matrix averaging PyTorch's adaptive bins: row i is 1/|bin i| over bin i."""
    A = np.zeros((out, size), dtype=np.float32)   # (OH, H)
    for i in range(out):
        lo, hi = math.floor(i * size / out), math.ceil((i + 1) * size / out)
        A[i, lo:hi] = 1.0 / (hi - lo)
    return A


def leaf_layers(model) -> list:
    """[(name, layer)] of the layers that compute, in forward order (containers skipped)."""
    return [(n, m) for n, m in model.modules() if not m.children()]


def build_graph(model, input_shape, meta: dict | None = None, doc: str = ""):
    """An onnx.ModelProto of `model` in eval mode for inputs (N, C, H, W), N dynamic.

    input_shape: (C, H, W). meta: {key: JSON-able value} written to metadata_props.
    Raises ValueError for a layer with no ONNX mapping, naming it.
    """
    onnx, helper, numpy_helper = _onnx()
    C, H, W = (int(s) for s in input_shape)
    if hasattr(model, "check_input_shape"):
        model.check_input_shape((1, C, H, W))
    nodes, inits = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(backend.to_numpy(a), dtype=np.float32), name))
        return name

    x, shape = "input", (C, H, W)   # the running tensor name and its per-sample shape
    for name, layer in leaf_layers(model):
        out = f"{name}.out"
        if isinstance(layer, Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            ins = [x, const(f"{name}.weight", layer.params["weight"])]
            if "bias" in layer.params:
                ins.append(const(f"{name}.bias", layer.params["bias"]))
            nodes.append(helper.make_node("Conv", ins, [out], name=name, kernel_shape=[kh, kw],
                                          strides=[sh, sw], pads=[ph, pw, ph, pw]))
            shape = (layer.out_channels, (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        elif isinstance(layer, BatchNorm2d):
            ins = [x] + [const(f"{name}.{k}", src[k]) for src, k in
                         ((layer.params, "weight"), (layer.params, "bias"),
                          (layer.buffers, "running_mean"), (layer.buffers, "running_var"))]
            nodes.append(helper.make_node("BatchNormalization", ins, [out], name=name, epsilon=layer.eps))
        elif isinstance(layer, ReLU):
            nodes.append(helper.make_node("Relu", [x], [out], name=name))
        elif isinstance(layer, MaxPool2d):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            nodes.append(helper.make_node("MaxPool", [x], [out], name=name, kernel_shape=[kh, kw],
                                          strides=[sh, sw], pads=[ph, pw, ph, pw]))
            shape = (shape[0], (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        elif isinstance(layer, AdaptiveAvgPool2d):
            (oh, ow), (c, h, w) = layer.output_size, shape
            if (oh, ow) == (1, 1):
                nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=name))
            elif h % oh == 0 and w % ow == 0:   # equal disjoint bins
                nodes.append(helper.make_node("AveragePool", [x], [out], name=name,
                                              kernel_shape=[h // oh, w // ow], strides=[h // oh, w // ow]))
            else:   # overlapping or repeated bins: out = A x B^T per (n, c), A (OH, H), B (OW, W)
                cols = f"{name}.cols"
                nodes.append(helper.make_node("MatMul", [x, const(f"{name}.Bt", bin_matrix(w, ow).T)],
                                              [cols], name=f"{name}.w"))   # (N, C, H, OW)
                nodes.append(helper.make_node("MatMul", [const(f"{name}.A", bin_matrix(h, oh)), cols],
                                              [out], name=name))           # (N, C, OH, OW)
            shape = (c, oh, ow)
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], name=name, axis=1))
            shape = (int(np.prod(shape)),)
        elif isinstance(layer, Linear):
            ins = [x, const(f"{name}.weight", layer.params["weight"])]
            if "bias" in layer.params:
                ins.append(const(f"{name}.bias", layer.params["bias"]))
            nodes.append(helper.make_node("Gemm", ins, [out], name=name, transB=1))
            shape = (int(layer.params["weight"].shape[0]),)
        elif isinstance(layer, Dropout):
            continue   # identity at inference
        else:
            raise ValueError(f"ONNX export: no mapping for layer '{name}' ({type(layer).__name__}); "
                             "supported: Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, "
                             "Flatten, Linear, Dropout")
        x = out
    if len(shape) != 1:
        raise ValueError(f"ONNX export: the model ends in a {shape} map, expected (N, K) logits")
    K = shape[0]
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, getattr(model, "arch", type(model).__name__), [helper.make_tensor_value_info("input", f32, ["N", C, H, W])],
        [helper.make_tensor_value_info("logits", f32, ["N", K]),
         helper.make_tensor_value_info("probabilities", f32, ["N", K])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="minivgg", doc_string=doc)
    proto.ir_version = 8   # the IR of opset 17: readable by onnxruntime >= 1.14
    if meta:
        helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


PRECISIONS = ("float32", "float16")


def to_float16(proto):
    """The float32 graph made float16 inside: every float32 initializer rounded to float16 (round to
    nearest even), Cast(input -> float16) first and Cast(-> float32) on "logits" and "probabilities" last;
    the graph's inputs and outputs stay float32. Returns a new ModelProto, checked."""
    onnx, helper, numpy_helper = _onnx()
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    g = p.graph
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for i, t in enumerate(g.initializer):
        if t.data_type == f32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    outs = [o.name for o in g.output]
    rename = {"input": "input.f16", **{o: f"{o}.f16" for o in outs}}
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    g.node.insert(0, helper.make_node("Cast", ["input"], ["input.f16"], name="input.cast", to=f16))
    g.node.extend(helper.make_node("Cast", [f"{o}.f16"], [o], name=f"{o}.cast", to=f32) for o in outs)
    onnx.checker.check_model(p, full_check=True)
    return p


def export_onnx(model, path, input_shape, meta: dict | None = None, doc: str = "",
                precision: str = "float32") -> Path:
    """Write `model` (put in eval mode) as an ONNX file, atomically (train.files.atomic_write: temp file,
    fsync, rename). Temp files that a killed export left beside `path` are removed first. A failed
    write raises OSError naming `path`, and leaves the old file as it was. precision: float32 or float16
    (to_float16)."""
    from ..train.files import atomic_write, remove_stale_temps
    if precision not in PRECISIONS:
        raise ValueError(f"ONNX export: precision must be one of {PRECISIONS}, got {precision!r}")
    model.eval()
    proto = build_graph(model, input_shape, meta, doc)
    data = (to_float16(proto) if precision == "float16" else proto).SerializeToString()
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    return atomic_write(path, lambda f: f.write(data))


def refuse_overwriting_input(checkpoint, out) -> None:
    """ValueError if `out` is the checkpoint itself: the same resolved path, or a hard link to it."""
    src, dst = Path(checkpoint), Path(out)
    same = src.resolve() == dst.resolve()
    try:
        same = same or (dst.exists() and os.path.samefile(src, dst))
    except OSError:
        pass
    if same:
        raise ValueError(f"--out {out} is the checkpoint being exported ({checkpoint}); writing there would "
                         "destroy it: name another file")


def export_checkpoint(checkpoint, out, precision: str = "float32", extra_meta: dict | None = None) -> Path:
    """A train_vgg11.py checkpoint (best.npz / last.npz) -> an ONNX file with its preprocessing."""
    from .predictor import Predictor
    refuse_overwriting_input(checkpoint, out)
    pred = Predictor(checkpoint, device="cpu")
    m = pred.meta
    meta = {"image_size": m["image_size"], "channels": m["channels"], "mean": m["mean"], "std": m["std"],
            "scale": 1 / 255, "class_names": m["classes"], "config": pred.config, "layout": "NCHW",
            "preprocessing": "resize to image_size (bilinear), convert to channels (L or RGB), "
                             "x = (pixel / 255 - mean) / std per channel, NCHW float32"}
    doc = (f"minivgg {pred.config['arch']} exported from {Path(checkpoint).name}; input (N, {m['channels']}, "
           f"{m['image_size'][0]}, {m['image_size'][1]}), see metadata_props for the preprocessing")
    if precision != "float32":
        meta["precision"] = precision
    meta.update(extra_meta or {})
    return export_onnx(pred.model, out, (m["channels"], *m["image_size"]), meta, doc, precision)
