"""summary(model, input_shape): a layer table with shapes, parameters, multiply-adds and memory.

Shapes are propagated with each layer type's output-size formula (from
registry.py, shared with draw.py and torch_interop.py), so a
138M-parameter VGG-16 at 224x224 is summarised without running a forward.
The totals follow torchsummary's (and Keras' model.summary()) conventions.

Notation: N batch, C in-channels, F out-channels, H W input size, KH KW
kernel, OH OW output size, I O in/out features.
"""
from __future__ import annotations

import numpy as np

from ..layers import Conv2d, Layer
from .registry import describe

MB = 2.0 ** 20


def layer_output_shape(layer: Layer, shape: tuple, who: str = "summary") -> tuple:
    """The output shape (without the batch) of one layer given its input shape (see registry.py)."""
    return tuple(describe(layer, who).output_shape(layer, tuple(shape)))


def layer_macs(layer: Layer, in_shape: tuple, out_shape: tuple) -> int:
    """Multiply-adds per sample: Conv2d OH*OW*F*C*KH*KW, Linear I*O, others 0 (see registry.py)."""
    return describe(layer, "summary").macs(layer, in_shape, out_shape)


def conv_algorithm(layer: Layer, in_shape: tuple) -> str:
    """The algorithm a Conv2d engine runs on a (C, H, W) input ('im2col', 'winograd2',
    'winograd4'; engines without a choice are im2col); '' for other layers."""
    if not isinstance(layer, Conv2d):
        return ""
    choose = getattr(layer, "algorithm", None)
    if choose is None:
        return "im2col"
    return choose(in_shape[1], in_shape[2], layer.params["weight"].dtype)


def leaf_layers(model: Layer):
    """(dotted name, layer) for every layer without children, in forward order."""
    return [(name, m) for name, m in model.modules() if not m.children()]


def trace(model: Layer, input_shape, who: str = "summary") -> list[dict]:
    """One row per leaf layer: name, type, in/out shape (no batch), params, MACs.

    input_shape is (C, H, W), or (N, C, H, W) whose N is ignored here. `who`
    names the caller in the error an unregistered layer raises.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if hasattr(model, "check_input_shape"):   # VGG's own checks: channels, >= 32x32
        model.check_input_shape((1, *shape))
    rows = []
    for name, layer in leaf_layers(model):
        out = layer_output_shape(layer, shape, who)
        if min(out) < 1:
            raise ValueError(f"summary: {name} ({type(layer).__name__}) would output {out} from "
                             f"{shape}; the input {tuple(input_shape)} is too small for this model")
        rows.append({"name": name, "type": type(layer).__name__, "in_shape": shape,
                     "out_shape": out, "params": sum(int(p.size) for p in layer.params.values()),
                     "trainable": not layer.frozen, "macs": layer_macs(layer, shape, out),
                     "view": describe(layer).view, "algo": conv_algorithm(layer, shape)})
        shape = out
    return rows


def summary(model: Layer, input_shape, batch_size: int = 1, show: bool = False) -> str:
    """A table of every leaf layer and the model's totals, as torchsummary prints.

    Columns: layer name, type, output shape [-1, ...], parameters, multiply-adds
    per sample, the activation memory of the output for `batch_size` samples, and each
    convolution's algorithm at this input size (im2col, winograd2, winograd4; see conv_engines).
    Totals: parameters (all and trainable), parameter MB, input MB,
    forward/backward pass MB (every layer output, kept for backward, and its
    gradient: 2 x activations; Flatten is a view and allocates nothing),
    and their sum as the estimated total. show=True also prints the table.
    """
    if len(tuple(input_shape)) == 4:
        batch_size = int(input_shape[0])
    rows = trace(model, input_shape)
    params = list(model.named_parameters(trainable_only=False))
    itemsize = params[0][1].dtype.itemsize if params else 4
    in_shape = rows[0]["in_shape"] if rows else tuple(input_shape)

    header = f"{'Layer':<16} {'Type':<18} {'Output shape':<22} {'Params':>13} {'Mult-adds':>15} {'Activ.':>10}  Algo"
    rule = "=" * len(header)
    lines = [f"{getattr(model, 'arch', type(model).__name__)}  input {list(in_shape)}, "
             f"batch {batch_size}, {np.dtype(params[0][1].dtype).name if params else 'float32'}",
             rule, header, rule]
    activ = 0
    for r in rows:
        n_out = int(np.prod(r["out_shape"])) * batch_size
        mem = 0 if r["view"] else n_out * itemsize
        activ += mem
        lines.append(f"{r['name']:<16} {r['type']:<18} {str([-1, *r['out_shape']]):<22} "
                     f"{r['params']:>13,} {r['macs']:>15,} {_fmt_bytes(mem):>10}  {r['algo']}".rstrip())
    total = sum(int(p.size) for _, p, _ in params)
    trainable = sum(r["params"] for r in rows if r["trainable"])
    macs = sum(r["macs"] for r in rows)
    input_mb = int(np.prod(in_shape)) * batch_size * itemsize / MB
    fwd_bwd_mb = 2 * activ / MB
    params_mb = total * itemsize / MB
    lines += [rule,
              f"Total params: {total:,}",
              f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}",
              f"Mult-adds per sample: {macs:,} ({macs / 1e9:.2f} G)",
              "-" * len(header),
              f"Input size (MB): {input_mb:.2f}",
              f"Forward/backward pass size (MB): {fwd_bwd_mb:.2f}",
              f"Params size (MB): {params_mb:.2f}",
              f"Estimated Total Size (MB): {input_mb + fwd_bwd_mb + params_mb:.2f}",
              "-" * len(header)]
    text = "\n".join(lines)
    if show:
        print(text)
    return text


def _fmt_bytes(n: int) -> str:
    if n == 0:
        return "0"
    for unit, size in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
