"""Write an Int8VGG (minivgg/quantize.py) as an ONNX graph that onnxruntime runs on its integer kernels.

The graph uses only standard ONNX operators, one per step of the arithmetic in minivgg/quantize.py, so
no graph optimizer has to recognise a pattern for the int8 kernels to run:

    input (N, C, H, W) float32 -> QuantizeLinear (uint8, s_in, z_in)
    every Conv2d + BatchNorm2d + ReLU -> QLinearConv (uint8 x int8 per-channel -> uint8, zero point 0:
                                         the ReLU is the clip at 0; int32 bias)
    every MaxPool2d                   -> MaxPool on uint8
    then DequantizeLinear -> the head in float32: GlobalAveragePool / AveragePool, Flatten, and per
         Linear DequantizeLinear(int8 weight, per-row scale, axis 0) -> Gemm(transB=1), Relu
Outputs "logits" and "probabilities", as the float32 export (minivgg/deploy/onnx_export.py), so the
predictor and the server take either file. debug=True adds every stage's uint8 output as a graph output
named after the stage ("features.0.q", ...), for tests that compare the simulation stage by stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .onnx_export import OPSET, _onnx


def build_int8_graph(qmodel, meta: dict | None = None, doc: str = "", debug: bool = False):
    """An onnx.ModelProto of `qmodel` (an Int8VGG) for inputs (N, C, H, W), N dynamic."""
    onnx, helper, numpy_helper = _onnx()
    C, H, W = qmodel.input_shape
    nodes, inits, extra_outputs = [], [], []
    TP = onnx.TensorProto

    def const(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    x = "input.q"
    nodes.append(helper.make_node("QuantizeLinear", ["input", const("input.scale", np.float32(qmodel.input_scale)),
                                                     const("input.zero", np.uint8(qmodel.input_zero))], [x],
                                  name="input.quantize"))
    shape = (C, H, W)
    for st in qmodel.stages:
        n, out = st["name"], f"{st['name']}.q"
        if st["op"] == "conv":
            F, _, kh, kw = st["w_q"].shape
            (sh, sw), (ph, pw) = st["stride"], st["pad"]
            ins = [x, const(f"{n}.x_scale", np.float32(st["x_scale"])), const(f"{n}.x_zero", np.uint8(st["x_zero"])),
                   const(f"{n}.weight", st["w_q"]), const(f"{n}.w_scale", st["w_scale"].astype(np.float32)),
                   const(f"{n}.w_zero", np.zeros(F, np.int8)),
                   const(f"{n}.y_scale", np.float32(st["y_scale"])), const(f"{n}.y_zero", np.uint8(st["y_zero"])),
                   const(f"{n}.bias", st["b_q"].astype(np.int32))]
            nodes.append(helper.make_node("QLinearConv", ins, [out], name=n, kernel_shape=[kh, kw],
                                          strides=[sh, sw], pads=[ph, pw, ph, pw]))
            shape = (F, (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        else:
            (kh, kw), (sh, sw), (ph, pw) = st["kernel"], st["stride"], st["pad"]
            nodes.append(helper.make_node("MaxPool", [x], [out], name=n, kernel_shape=[kh, kw],
                                          strides=[sh, sw], pads=[ph, pw, ph, pw]))
            shape = (shape[0], (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        if debug:
            extra_outputs.append(helper.make_tensor_value_info(out, TP.UINT8, ["N", *shape]))
        x = out
    last = [s for s in qmodel.stages if s["op"] == "conv"][-1]
    nodes.append(helper.make_node("DequantizeLinear", [x, const("features.scale", np.float32(last["y_scale"])),
                                                      const("features.zero", np.uint8(last["y_zero"]))],
                                  ["features.out"], name="features.dequantize"))
    x, (_, h, w) = "features.out", shape
    for i, step in enumerate(qmodel.head):
        out = f"head.{i}.out"
        if step[0] == "avgpool":
            oh, ow = step[1]
            if (oh, ow) == (1, 1):
                nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=f"head.{i}"))
            elif (h, w) == (oh, ow):
                nodes.append(helper.make_node("Identity", [x], [out], name=f"head.{i}"))
            elif h % oh == 0 and w % ow == 0:
                nodes.append(helper.make_node("AveragePool", [x], [out], name=f"head.{i}",
                                              kernel_shape=[h // oh, w // ow], strides=[h // oh, w // ow]))
            else:
                raise ValueError(f"int8 export: the head pools a {h}x{w} map to {oh}x{ow}, which is not a "
                                 "whole number of equal bins; use the float32 export")
            h, w = oh, ow
        elif step[0] == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [out], name=f"head.{i}", axis=1))
        elif step[0] == "relu":
            nodes.append(helper.make_node("Relu", [x], [out], name=f"head.{i}"))
        else:
            _, name, w_q, w_s, b = step
            nodes.append(helper.make_node("DequantizeLinear", [const(f"{name}.weight", w_q),
                                                               const(f"{name}.w_scale", w_s.astype(np.float32))],
                                          [f"{name}.weight.f"], name=f"{name}.dequantize", axis=0))
            nodes.append(helper.make_node("Gemm", [x, f"{name}.weight.f", const(f"{name}.bias", b)], [out],
                                          name=name, transB=1))
            K = w_q.shape[0]
        x = out
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    f32 = TP.FLOAT
    graph = helper.make_graph(
        nodes, f"{qmodel.config.get('arch', 'vgg')}_int8",
        [helper.make_tensor_value_info("input", f32, ["N", C, H, W])],
        [helper.make_tensor_value_info("logits", f32, ["N", K]),
         helper.make_tensor_value_info("probabilities", f32, ["N", K])] + extra_outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="minivgg", doc_string=doc)
    proto.ir_version = 8
    if meta:
        helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_int8(qmodel, path, meta: dict | None = None, doc: str = "", debug: bool = False) -> Path:
    """Write `qmodel` as an ONNX file, atomically (temp file, fsync, rename)."""
    from ..train.files import atomic_write, remove_stale_temps
    data = build_int8_graph(qmodel, meta, doc, debug).SerializeToString()
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    return atomic_write(path, lambda f: f.write(data))
