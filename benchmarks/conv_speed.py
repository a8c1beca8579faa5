"""How fast is minivgg's Conv2d against PyTorch's, layer by layer, on the convolutions VGG runs?

Times forward, backward (dx, dW and db together) and forward+backward for every conv shape of
VGG-11 on 32x32 images (batch 64), or of VGG-16 on 224x224 (--vgg16-224), for minivgg
(NumPy on the CPU, CuPy on the GPU) and torch.nn.functional.conv2d in the same run, after
checking that both compute the same outputs and gradients. Beside them, the GEMM-only column:
the three matrix products a convolution cannot avoid (forward, dW, dx) timed alone on the
layer's shapes, the ceiling any im2col convolution on the same BLAS could reach. Only Conv2d's
public API is used (forward, backward, params, grads), so the script keeps working as the
layer's internals change.

    PYTHONPATH=. python benchmarks/conv_speed.py                  # VGG-11 @ 32x32, CPU
    PYTHONPATH=. python benchmarks/conv_speed.py --vgg16-224 --batch 2 --json out.json
    PYTHONPATH=. python benchmarks/conv_speed.py --device gpu     # CuPy vs PyTorch CUDA
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/conv_speed.py` without PYTHONPATH=.: add the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

# Before minivgg imports CuPy: TF32 stays off for float32 unless --tf32 (see common).
common.set_cupy_tf32_env("--tf32" in sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minivgg import backend  # noqa: E402
from minivgg.layers import TunedConv2d, make_conv2d  # noqa: E402

TOL_FP32 = 1e-4   # rel err of outputs and every gradient, float32, TF32 off
TOL_TF32 = 1e-2   # with --tf32 both sides round matmul inputs to 10 mantissa bits

TORCH_METHOD = ("torch: fwd = F.conv2d with autograd recording (as in training); "
                "bwd = one torch.autograd.grad(y, [x, w, b], dout) call, i.e. a single "
                "ConvolutionBackward (aten.convolution_backward with all three grads), the same "
                "kernel call a training step makes; dx / dW alone = torch.nn.grad.conv2d_input / "
                "conv2d_weight (the same aten op with output_mask (1,0,0) / (0,1,0)); "
                "total = F.conv2d + autograd.grad. minivgg: fwd = Conv2d.forward, "
                "bwd = Conv2d.backward (dx, dW, db in one call), total = both. "
                "Both sides compute dx for every layer, the first one too. Each side gets its "
                "inputs laid out as its own network hands them over: torch NCHW; minivgg x and dout "
                "CHWN in memory (seen as NCHW), as its Conv2d outputs are, except the first layer's "
                "x, the images, NCHW.")

GEMM_METHOD = ("GEMM-only: the three products of a convolution on its im2col shapes, with "
               "M = N*OH*OW and K = C*KH*KW: forward (F, K) @ (K, M), dW (F, M) @ (M, K) and "
               "dx (K, F) @ (F, M) (the same flops as the flipped-kernel form), float32 NumPy arrays "
               "(CuPy on the GPU), timed alone in the same rounds as the layers; "
               "'over GEMM' = minivgg's fwd+bwd time / the three GEMMs' time.")

ALGOS = ("winograd2", "winograd4", "auto")   # the other engines timed beside the default (--algos)
ALGO_METHOD = ("algorithms: each engine of minivgg.layers.CONV_ENGINES named in --algos, with the same "
               "weights, checked against torch like the default engine, its forward + backward timed in "
               "the same rounds; 'x GEMM' = its fwd+bwd time / the im2col GEMM-only time (below 1: past "
               "the ceiling of any im2col convolution; Winograd does fewer multiplications).")


@dataclass(frozen=True)
class ConvCase:
    """One conv shape: x (N, C, H, W) -> out (N, F, OH, OW), kernel KxK, stride 1, padding P.
    count: how many of the network's conv layers have this shape (for the network total)."""
    name: str
    N: int
    C: int
    F: int
    H: int
    W: int
    K: int = 3
    P: int = 1
    count: int = 1

    @property
    def OH(self) -> int:
        return self.H + 2 * self.P - self.K + 1

    @property
    def OW(self) -> int:
        return self.W + 2 * self.P - self.K + 1

    @property
    def flops_forward(self) -> int:
        """2*N*F*C*KH*KW*OH*OW: one multiply and one add per weight per output pixel."""
        return 2 * self.N * self.F * self.C * self.K * self.K * self.OH * self.OW

    @property
    def flops_backward(self) -> int:
        """dx and dW are each a product the size of the forward one (db is negligible)."""
        return 2 * self.flops_forward

    def describe(self) -> str:
        return f"{self.N}x{self.C}x{self.H}x{self.W} -> {self.F}"


def vgg11_32_cases(batch: int = 64, image: int = 32, width_ratio: int = 1, in_channels: int = 3) -> list[ConvCase]:
    """VGG-11's eight convs on image x image inputs (32 by default), every width divided by
    width_ratio as VGG(width_ratio=R) divides it; the last two share a shape (count=2).
    d2l's VGG-11: image=224, width_ratio=4, in_channels=1; the quick start's: width_ratio=8,
    in_channels=1 (batch 128)."""
    c = [64 // width_ratio, 128 // width_ratio, 256 // width_ratio, 512 // width_ratio]
    s = [image, image // 2, image // 4, image // 8, image // 16]
    return [ConvCase("conv1", batch, in_channels, c[0], s[0], s[0]),
            ConvCase("conv2", batch, c[0], c[1], s[1], s[1]),
            ConvCase("conv3", batch, c[1], c[2], s[2], s[2]),
            ConvCase("conv4", batch, c[2], c[2], s[2], s[2]),
            ConvCase("conv5", batch, c[2], c[3], s[3], s[3]),
            ConvCase("conv6", batch, c[3], c[3], s[3], s[3]),
            ConvCase("conv7-8", batch, c[3], c[3], s[4], s[4], count=2)]


def vgg16_224_cases(batch: int = 4) -> list[ConvCase]:
    """VGG-16's thirteen convs on 224x224 images, one row per distinct shape."""
    return [ConvCase("conv1_1", batch, 3, 64, 224, 224),
            ConvCase("conv1_2", batch, 64, 64, 224, 224),
            ConvCase("conv2_1", batch, 64, 128, 112, 112),
            ConvCase("conv2_2", batch, 128, 128, 112, 112),
            ConvCase("conv3_1", batch, 128, 256, 56, 56),
            ConvCase("conv3_2-3", batch, 256, 256, 56, 56, count=2),
            ConvCase("conv4_1", batch, 256, 512, 28, 28),
            ConvCase("conv4_2-3", batch, 512, 512, 28, 28, count=2),
            ConvCase("conv5_1-3", batch, 512, 512, 14, 14, count=3)]


# ---------------------------------------------------------------------------------------------
# One case: the same numbers in both frameworks
# ---------------------------------------------------------------------------------------------
def torch_device(device: str) -> torch.device:
    return torch.device("cpu" if device == "cpu" else "cuda")


def make_pair(case: ConvCase, device: str = "cpu", seed: int = 0, network_layout: bool = True,
              algos=()) -> dict:
    """A minivgg Conv2d and torch tensors holding the same weight, bias, input and upstream
    gradient (Kaiming-scaled weights, N(0, 1) data), on `device`; and one more Conv2d of each
    engine in `algos` (pair["algos"]) with the same weights."""
    rng = np.random.default_rng(seed)
    fan_in = case.C * case.K * case.K
    w = (rng.standard_normal((case.F, case.C, case.K, case.K)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    b = (rng.standard_normal(case.F) * 0.1).astype(np.float32)
    x = rng.standard_normal((case.N, case.C, case.H, case.W)).astype(np.float32)
    dout = rng.standard_normal((case.N, case.F, case.OH, case.OW)).astype(np.float32)

    layer = TunedConv2d(case.C, case.F, case.K, stride=1, padding=case.P)   # the engine the models use
    layer.params["weight"][...] = w        # the public params dict, written in place
    layer.params["bias"][...] = b
    layer.to(device)
    others = {}
    for algo in algos:
        other = make_conv2d(case.C, case.F, case.K, stride=1, padding=case.P, algo=algo)
        other.load_state_dict(layer.state_dict())
        others[algo] = other.to(device)

    tdev = torch_device(device)
    t = {k: torch.from_numpy(v).to(tdev) for k, v in (("x", x), ("w", w), ("b", b), ("dout", dout))}
    for k in ("x", "w", "b"):
        t[k].requires_grad_(True)
    mx, mdout = backend.to_device(x, device), backend.to_device(dout, device)
    if network_layout:                     # --nchw-inputs turns this off (for minivgg before the CHWN layout)
        mdout = chwn(mdout)
        if case.C > 3:                     # not the images: a feature map, CHWN as Conv2d makes it
            mx = chwn(mx)
    return {"case": case, "device": device, "layer": layer, "x": mx, "dout": mdout, "torch": t,
            "gemm": gemm_operands(case, device, rng), "algos": others}


def chwn(a):
    """The same (N, C, H, W) values with CHWN memory, as minivgg's Conv2d outputs (and the
    gradients flowing back into them) lie inside a network."""
    xp = backend.get_array_module(a)
    return xp.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def gemm_operands(case: ConvCase, device: str, rng) -> dict:
    """Random float32 operands of the three GEMMs (see GEMM_METHOD), on `device`."""
    K, M = case.C * case.K * case.K, case.N * case.OH * case.OW
    mats = {"Wm": (case.F, K), "cols": (K, M), "D": (case.F, M)}
    return {k: backend.to_device(rng.standard_normal(shape, dtype=np.float32), device) for k, shape in mats.items()}


def minivgg_results(pair: dict, layer=None):
    """out, dx, dW, db from minivgg's Conv2d (forward, then backward)."""
    layer = pair["layer"] if layer is None else layer
    out = layer.forward(pair["x"])
    dx = layer.backward(pair["dout"])
    return out, dx, layer.grads["weight"], layer.grads["bias"]


def torch_results(pair: dict):
    """out, dx, dW, db from torch autograd."""
    t, P = pair["torch"], pair["case"].P
    y = F.conv2d(t["x"], t["w"], t["b"], padding=P)
    dx, dw, db = torch.autograd.grad(y, (t["x"], t["w"], t["b"]), t["dout"])
    return y, dx, dw, db


def check_pair(pair: dict, tol: float = TOL_FP32) -> dict:
    """Compare out, dx, dW, db with torch; raise common.MismatchError when any rel err > tol.
    Also checks that torch.nn.grad's dx / dW (what the split timings run) equal autograd's."""
    t, P = pair["torch"], pair["case"].P
    mv = minivgg_results(pair)
    ref = torch_results(pair)
    with torch.no_grad():
        dx_only = torch.nn.grad.conv2d_input(t["x"].shape, t["w"], t["dout"], padding=P)
        dw_only = torch.nn.grad.conv2d_weight(t["x"], t["w"].shape, t["dout"], padding=P)
    pairs = {"out": (mv[0], ref[0]), "dx": (mv[1], ref[1]), "dW": (mv[2], ref[2]), "db": (mv[3], ref[3])}
    errors = common.check_close(pairs, tol, what=f"{pair['case'].name} ({pair['case'].describe()})")
    for algo, layer in pair.get("algos", {}).items():
        got = minivgg_results(pair, layer)
        errs = common.check_close({k: (a, b[1]) for (k, b), a in zip(pairs.items(), got)}, tol,
                                  what=f"{pair['case'].name} ({pair['case'].describe()}), {algo}")
        errors.update({f"{k} {algo}": v for k, v in errs.items()})
    common.check_close({"torch dx (nn.grad vs autograd)": (dx_only.cpu().numpy(), ref[1]),
                        "torch dW (nn.grad vs autograd)": (dw_only.cpu().numpy(), ref[2])},
                       1e-5 if tol <= TOL_FP32 else tol, what=f"{pair['case'].name} torch self-check")
    return errors


def timed_functions(pair: dict) -> dict:
    """name -> zero-argument callable, for each quantity the benchmark times."""
    layer, x, dout = pair["layer"], pair["x"], pair["dout"]
    t, P = pair["torch"], pair["case"].P
    tx, tw, tb, tdout = t["x"], t["w"], t["b"], t["dout"]
    x_shape, w_shape = tx.shape, tw.shape
    layer.forward(x)                                            # leaves the cache backward reads
    for other in pair.get("algos", {}).values():
        other.forward(x)
    y_graph = F.conv2d(tx, tw, tb, padding=P)                   # a graph autograd.grad can rerun

    def mv_total():
        layer.forward(x)
        layer.backward(dout)

    def t_dx():
        with torch.no_grad():
            torch.nn.grad.conv2d_input(x_shape, tw, tdout, padding=P)

    def t_dw():
        with torch.no_grad():
            torch.nn.grad.conv2d_weight(tx, w_shape, tdout, padding=P)

    def t_total():
        y = F.conv2d(tx, tw, tb, padding=P)
        torch.autograd.grad(y, (tx, tw, tb), tdout)

    g = pair["gemm"]
    Wm, cols, D = g["Wm"], g["cols"], g["D"]

    def gemm_total():
        Wm @ cols
        D @ cols.T
        Wm.T @ D

    def algo_total(other):
        def total():
            other.forward(x)
            other.backward(dout)
        return total

    return {
        **{f"algo_{name}_total": algo_total(other) for name, other in pair.get("algos", {}).items()},
        "gemm_forward": lambda: Wm @ cols,
        "gemm_backward": lambda: (D @ cols.T, Wm.T @ D),
        "gemm_total": gemm_total,
        "minivgg_forward": lambda: layer.forward(x),
        "minivgg_backward": lambda: layer.backward(dout),
        "minivgg_total": mv_total,
        "torch_forward": lambda: F.conv2d(tx, tw, tb, padding=P),
        "torch_backward_dx": t_dx,
        "torch_backward_dw": t_dw,
        "torch_backward": lambda: torch.autograd.grad(y_graph, (tx, tw, tb), tdout, retain_graph=True),
        "torch_total": t_total,
    }


def bench_case(case: ConvCase, device: str = "cpu", repeats: int = 5, warmup: int = 1,
               min_time: float = 0.0, tol: float = TOL_FP32, seed: int = 0, progress=None,
               network_layout: bool = True, algos=()) -> dict:
    """Check, then time, one conv shape; returns errors, timings (seconds) and derived figures."""
    pair = make_pair(case, device, seed, network_layout, algos)
    errors = check_pair(pair, tol)

    def on_round(i):
        if progress is not None:
            progress.step(f"{case.name}: " + ("warm-up" if i == 0 else f"repeat {i}/{repeats}"))

    timings = common.measure_many(timed_functions(pair), device, repeats=repeats, warmup=warmup,
                                  min_time=min_time, on_round=on_round)
    result = summarize_case(case, errors, timings)
    result["auto_picks"] = {name: other.algorithm(case.H, case.W) for name, other in pair["algos"].items()
                            if hasattr(other, "algorithm")}
    return result


def summarize_case(case: ConvCase, errors: dict, timings: dict) -> dict:
    med = {k: v.median for k, v in timings.items()}
    ff, fb = case.flops_forward, case.flops_backward
    return {
        "name": case.name, "shape": case.describe(), "N": case.N, "C": case.C, "F": case.F,
        "H": case.H, "W": case.W, "K": case.K, "padding": case.P, "count": case.count,
        "flops_forward": ff, "flops_backward": fb,
        "rel_err": errors,
        "seconds": med,
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "ratio": {part: med[f"minivgg_{part}"] / med[f"torch_{part}"] for part in ("forward", "backward", "total")},
        "over_gemm": {part: med[f"minivgg_{part}"] / med[f"gemm_{part}"] for part in ("forward", "backward", "total")},
        "algo_over_gemm": {k[len("algo_"):-len("_total")]: v / med["gemm_total"] for k, v in med.items()
                           if k.startswith("algo_")},
        "gflops": {
            "minivgg_forward": ff / med["minivgg_forward"] / 1e9,
            "torch_forward": ff / med["torch_forward"] / 1e9,
            "minivgg_backward": fb / med["minivgg_backward"] / 1e9,
            "torch_backward": fb / med["torch_backward"] / 1e9,
            "minivgg_total": (ff + fb) / med["minivgg_total"] / 1e9,
            "torch_total": (ff + fb) / med["torch_total"] / 1e9,
            "gemm_total": (ff + fb) / med["gemm_total"] / 1e9,
        },
    }


def summarize(results: list[dict]) -> dict:
    """Geometric-mean ratios over the layers, the worst layer, and the network total
    (each shape weighted by how many of the network's convs have it)."""
    out = {}
    for part in ("forward", "backward", "total"):
        out[f"geomean_ratio_{part}"] = common.geomean(r["ratio"][part] for r in results)
    worst = max(results, key=lambda r: r["ratio"]["total"])
    out["max_ratio_total"] = worst["ratio"]["total"]
    out["max_ratio_layer"] = worst["name"]
    for part in ("forward", "backward", "total"):
        out[f"geomean_over_gemm_{part}"] = common.geomean(r["over_gemm"][part] for r in results)
    worst = max(results, key=lambda r: r["over_gemm"]["total"])
    out["max_over_gemm_total"] = worst["over_gemm"]["total"]
    out["max_over_gemm_layer"] = worst["name"]
    for algo in results[0].get("algo_over_gemm", {}):
        out[f"geomean_over_gemm_{algo}"] = common.geomean(r["algo_over_gemm"][algo] for r in results)
        out[f"network_seconds_{algo}_total"] = sum(r["count"] * r["seconds"][f"algo_{algo}_total"] for r in results)
    mv = sum(r["count"] * r["seconds"]["minivgg_total"] for r in results)
    tt = sum(r["count"] * r["seconds"]["torch_total"] for r in results)
    out["network_seconds_minivgg_total"] = mv
    out["network_seconds_torch_total"] = tt
    out["network_ratio_total"] = mv / tt
    return out


def format_report(results: list[dict], summary: dict) -> str:
    f, r = common.fmt_ms, common.fmt_ratio
    worst, worst_g = summary["max_ratio_layer"], summary["max_over_gemm_layer"]
    main = common.table(
        ["layer", "N x C x H x W -> F", "minivgg ms", "GEMM-only ms", "over GEMM", "torch ms", "ratio",
         "GFLOP/s minivgg", "GFLOP/s GEMM", "GFLOP/s torch"],
        [[x["name"] + (f" (x{x['count']})" if x["count"] > 1 else ""), x["shape"],
          f(x["seconds"]["minivgg_total"]), f(x["seconds"]["gemm_total"]),
          r(x["over_gemm"]["total"]) + (" <- max" if x["name"] == worst_g else ""),
          f(x["seconds"]["torch_total"]),
          r(x["ratio"]["total"]) + (" <- max" if x["name"] == worst else ""),
          f"{x['gflops']['minivgg_total']:.1f}", f"{x['gflops']['gemm_total']:.1f}",
          f"{x['gflops']['torch_total']:.1f}"] for x in results],
        align="llrrlrlrrr")
    parts = common.table(
        ["layer", "fwd minivgg", "fwd torch", "ratio", "bwd minivgg", "bwd torch", "ratio",
         "torch dx", "torch dW", "torch dx+dW"],
        [[x["name"], f(x["seconds"]["minivgg_forward"]), f(x["seconds"]["torch_forward"]),
          r(x["ratio"]["forward"]), f(x["seconds"]["minivgg_backward"]), f(x["seconds"]["torch_backward"]),
          r(x["ratio"]["backward"]), f(x["seconds"]["torch_backward_dx"]), f(x["seconds"]["torch_backward_dw"]),
          f(x["seconds"]["torch_backward_dx"] + x["seconds"]["torch_backward_dw"])] for x in results])
    lines = [
        "forward + backward (dx, dW, db), median ms per call; over GEMM = minivgg time / its three "
        "GEMMs' time; ratio = minivgg time / torch time (above 1: minivgg is slower)",
        main, "",
        f"over GEMM, geometric mean over {len(results)} layers: total {r(summary['geomean_over_gemm_total'])}, "
        f"forward {r(summary['geomean_over_gemm_forward'])}, backward "
        f"{r(summary['geomean_over_gemm_backward'])}; max {r(summary['max_over_gemm_total'])} "
        f"({summary['max_over_gemm_layer']})",
        f"geometric mean ratio over {len(results)} layers: total {r(summary['geomean_ratio_total'])}, "
        f"forward {r(summary['geomean_ratio_forward'])}, backward {r(summary['geomean_ratio_backward'])}",
        f"max ratio: {r(summary['max_ratio_total'])} ({summary['max_ratio_layer']})",
        f"network (the layers above, repeated shapes counted): minivgg "
        f"{summary['network_seconds_minivgg_total'] * 1e3:.1f} ms, torch "
        f"{summary['network_seconds_torch_total'] * 1e3:.1f} ms, ratio {r(summary['network_ratio_total'])}",
        "",
        "the parts, median ms (minivgg's backward makes dx, dW, db in one call; torch's bwd is the one "
        "autograd call that does the same; dx and dW alone are shown for torch only)",
        parts,
    ]
    algos = list(results[0].get("algo_over_gemm", {}))
    if algos:
        rows = [[x["name"] + (f" (x{x['count']})" if x["count"] > 1 else ""), f(x["seconds"]["gemm_total"]),
                 f(x["seconds"]["minivgg_total"]) + f" ({r(x['over_gemm']['total'])})"] +
                [f(x["seconds"][f"algo_{a}_total"]) + f" ({r(x['algo_over_gemm'][a])})" for a in algos] +
                [x.get("auto_picks", {}).get("auto", "")]
                for x in results]
        rows.append(["geomean x GEMM", "", r(summary["geomean_over_gemm_total"])] +
                    [r(summary[f"geomean_over_gemm_{a}"]) for a in algos] + [""])
        rows.append(["network ms", "", f"{summary['network_seconds_minivgg_total'] * 1e3:.1f}"] +
                    [f"{summary[f'network_seconds_{a}_total'] * 1e3:.1f}" for a in algos] + [""])
        lines += ["", "algorithms: forward + backward, median ms per call (x GEMM: / the im2col GEMM-only time)",
                  common.table(["layer", "GEMM-only ms", "im2col-fast"] + algos + ["auto runs"], rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n" + textwrap.fill(TORCH_METHOD, 92),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            "Every shape is checked first (float32: output and gradients within rel err 1e-4 of "
            "torch, as max|a-b|/max|b|); the script stops if they are not. Each timing is the "
            "median of --repeats after --warmup calls, with the device synchronised around each; "
            "the minivgg and torch timings of a layer are interleaved round by round, so a burst "
            "of load from elsewhere hits both alike. GFLOP/s counts 2*N*F*C*KH*KW*OH*OW for the "
            "forward and twice that for the backward. On the GPU TF32 is off on both sides unless "
            "--tf32 (CuPy reads CUPY_TF32 from the environment, which this script sets before "
            "importing CuPy); torch keeps its default cudnn.benchmark=False.", 92))
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: NumPy vs torch CPU; gpu: CuPy vs torch CUDA (default: cpu)")
    p.add_argument("--vgg16-224", action="store_true",
                   help="VGG-16's convs on 224x224 images instead of VGG-11's on 32x32")
    p.add_argument("--image", type=int, default=32, metavar="S",
                   help="VGG-11's convs on SxS images (a multiple of 16; default 32)")
    p.add_argument("--width-ratio", type=int, default=1, metavar="R",
                   help="VGG-11's widths divided by R, as --width-ratio of the training command (d2l: 4, "
                        "the quick start: 8; default 1)")
    p.add_argument("--in-channels", type=int, default=3, metavar="C",
                   help="VGG-11's first conv's input channels (Fashion-MNIST: 1; default 3)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size N (default: 64 for VGG-11 @ 32x32, 4 for --vgg16-224)")
    p.add_argument("--layers", default=None,
                   help="comma-separated layer names to run, e.g. conv1,conv4 (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds a timed repeat should last at least; shorter calls are looped and "
                        "averaged (default: 0.02 on the CPU, 0.05 on the GPU)")
    p.add_argument("--nchw-inputs", action="store_true",
                   help="give minivgg NCHW-contiguous x and dout, as versions before the CHWN layout "
                        "(commit a7112ee and earlier) received them in a network")
    p.add_argument("--algos", default=",".join(ALGOS),
                   help="comma-separated engines of CONV_ENGINES to time beside the default im2col-fast, "
                        f"'none' for none (default: {','.join(ALGOS)})")
    common.add_shared_options(p, checked="the check")
    args = p.parse_args(argv)
    from minivgg.layers import CONV_ENGINES
    args.algos = [] if args.algos.strip() in ("", "none") else [a.strip() for a in args.algos.split(",")]
    unknown = sorted(set(args.algos) - set(CONV_ENGINES))
    if unknown:
        p.error(f"--algos: unknown {unknown}; choose from {sorted(CONV_ENGINES)}")
    if args.batch is None:
        args.batch = 4 if args.vgg16_224 else 64
    if args.min_time is None:
        args.min_time = 0.02 if args.device == "cpu" else 0.05
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if args.image < 16 or args.image % 16:
        p.error(f"--image: VGG-11 halves the map four times before its last convs; expected a multiple of "
                f"16, got {args.image}")
    if args.width_ratio < 1 or 64 % args.width_ratio:
        p.error(f"--width-ratio: expected a divisor of 64 (1, 2, 4, 8, ...), got {args.width_ratio}")
    if args.in_channels < 1:
        p.error(f"--in-channels: expected a count >= 1, got {args.in_channels}")
    if args.vgg16_224 and (args.image, args.width_ratio, args.in_channels) != (32, 1, 3):
        p.error("--image, --width-ratio and --in-channels shape VGG-11's convs; --vgg16-224 takes none of them")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tf32, threads_note, tol = common.start_run(args, TOL_FP32, TOL_TF32)

    cases = vgg16_224_cases(args.batch) if args.vgg16_224 else \
        vgg11_32_cases(args.batch, args.image, args.width_ratio, args.in_channels)
    if args.layers:
        wanted = [s.strip() for s in args.layers.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"--layers: unknown {unknown}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]

    info = common.machine_info(args.device)
    net = "VGG-16 convs @ 224x224" if args.vgg16_224 else \
        f"VGG-11 convs @ {args.image}x{args.image}" + (f", widths / {args.width_ratio}" if args.width_ratio > 1 else "") \
        + (f", {args.in_channels} input channel(s)" if args.in_channels != 3 else "")
    print(common.header(info, f"{threads_note}; TF32 {'on' if args.tf32 else 'off'}"))
    print(f"benchmark: {net}, batch {args.batch}, float32, device {args.device}, median of "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up, check tolerance {tol:g}")
    print(textwrap.fill(TORCH_METHOD, 100))
    print(textwrap.fill(GEMM_METHOD, 100))
    if args.algos:
        print(textwrap.fill(ALGO_METHOD, 100))
    print(flush=True)

    progress = common.Progress(total=(1 + args.repeats) * len(cases), desc="conv_speed",
                               enabled=not args.no_progress)
    results = []
    try:
        for case in cases:
            results.append(bench_case(case, args.device, args.repeats, args.warmup, args.min_time, tol,
                                      args.seed, progress, network_layout=not args.nchw_inputs,
                                      algos=args.algos))
    except common.MismatchError as e:
        progress.close()
        raise SystemExit(f"check failed, nothing timed further: {e}")
    progress.close()
    summary = summarize(results)
    print(format_report(results, summary))

    payload = {"benchmark": "conv_speed", "network": net, "batch": args.batch, "device": args.device,
               "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup, "min_time": args.min_time,
               "tolerance": tol, "tf32": tf32, "nchw_inputs": args.nchw_inputs, "threads": args.threads, "threads_note": threads_note,
               "method": TORCH_METHOD, "gemm_method": GEMM_METHOD,
               "algos": args.algos, "machine": info, "layers": results, "summary": summary}
    if args.json:
        common.write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
