"""Grade a learner's workspace with minivgg's own checks: float64 central differences
(minivgg.gradcheck), parity with PyTorch where it is installed, and the contracts
(inputs left unchanged, dtypes and shapes kept). Graded only through the layer API:
forward, backward, params, grads, buffers; never a layer's internals.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backend, kernels, random_stream
from ..gradcheck import GradError, check_function, check_layer
from .generate import BY_NAME, EXERCISES, GAP

GRAD_TOL = 1e-6                 # float64 central differences, relative (CONTRIBUTING.md)
TORCH_FWD, TORCH_BWD = 1e-5, 1e-4   # float32 against PyTorch


class Failed(Exception):
    """One check failed; the message says which gradient and where."""


class NotStarted(Exception):
    """The learner's code reached a gap."""


@dataclass
class Result:
    name: str
    status: str          # 'passed', 'not started', 'failed'
    detail: str = ""


def load(path: Path):
    """Import the learner's file as a module of its own (a fresh one every call)."""
    spec = importlib.util.spec_from_file_location(f"minivgg_exercise_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worst(what: str, key: str, err: GradError, yours="yours", theirs="numerical") -> str:
    return (f"{what}: dL/d{key} is wrong (relative error {float(err):.1e}); worst element {err.index}: "
            f"{yours} {err.analytic:.6g}, {theirs} {err.numeric:.6g}")


DEVICE = "cpu"   # where check runs the learner's code: 'cpu', or 'gpu' (CuPy, or its stand-in)


def dev(a):
    """An array or a layer on DEVICE (inputs are made on the host, then moved)."""
    return a.to(DEVICE) if hasattr(a, "modules") else backend.to_device(a, DEVICE)


@contextlib.contextmanager
def on_device(device: str):
    global DEVICE
    old, DEVICE = DEVICE, device
    try:
        yield
    finally:
        DEVICE = old


# -- the three kinds of check --------------------------------------------------------------
def gradcheck(what: str, layer, x) -> None:
    """float64 central differences for dx and every parameter."""
    for key, err in check_layer(dev(layer), dev(x)).items():
        if not err <= GRAD_TOL:
            raise Failed(worst(what, key, err))


def contracts(what: str, layer, x) -> None:
    """float32: x and dout unchanged, dx shaped and typed like x, a grad for every param."""
    layer, x_before, x = dev(layer), x.copy(), dev(x)
    out = layer.forward(x)
    dout_before = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)
    dout = dev(dout_before)
    dx = layer.backward(dout)
    if not np.array_equal(backend.to_numpy(dout), dout_before):
        raise Failed(f"{what}: backward wrote into dout (its argument); compute into a new array")
    if not np.array_equal(backend.to_numpy(x), x_before):
        raise Failed(f"{what}: the input x was changed; never write into an argument")
    if getattr(dx, "shape", None) != x.shape or dx.dtype != x.dtype:
        raise Failed(f"{what}: dx is {getattr(dx, 'dtype', type(dx).__name__)} {getattr(dx, 'shape', '')}, "
                     f"expected {x.dtype} {x.shape} like x")
    for key, p in layer.params.items():
        g = layer.grads.get(key)
        if g is None or g.shape != p.shape or g.dtype != p.dtype:
            raise Failed(f"{what}: grads[{key!r}] is {getattr(g, 'dtype', None)} {getattr(g, 'shape', None)}, "
                         f"expected {p.dtype} {p.shape} like params[{key!r}]")


def torch_parity(what: str, layer, x, torch_fn) -> None:
    """float32 output and every gradient against torch_fn(x, params) with autograd."""
    torch = _torch()
    if torch is None:
        return
    layer = dev(layer)
    out = layer.forward(dev(x))
    G = np.random.default_rng(2).standard_normal(out.shape).astype(x.dtype)
    dx = layer.backward(dev(G))
    xt = torch.tensor(x, requires_grad=True)
    pt = {k: torch.tensor(backend.to_numpy(p), requires_grad=True) for k, p in layer.params.items()}
    yt = torch_fn(xt, pt)
    (yt * torch.tensor(G)).sum().backward()
    err = GradError(out, yt.detach().numpy())
    if not err <= TORCH_FWD:
        raise Failed(worst(what, "out (forward)", err, theirs="PyTorch"))
    for key, mine, ref in [("x", dx, xt.grad)] + [(k, layer.grads.get(k), t.grad) for k, t in pt.items()]:
        err = GradError(mine, ref.numpy())
        if not err <= TORCH_BWD:
            raise Failed(worst(what, key, err, theirs="PyTorch"))


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- inputs ----------------------------------------------------------------------------------
def distinct(shape, seed=7, gap=0.05):
    """Values with no ties, `gap` apart, none closer than gap/4 to 0 (no kinks, no ties)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    v = (rng.permutation(n) - n / 2 + 0.25) * gap
    return v.reshape(shape).astype(np.float64)


def normal(shape, seed=7):
    """Inputs drawn apart from check_layer's upstream gradient (its seed 0): an input equal to
    it would make BatchNorm's dx vanish (the loss sits at its maximum there)."""
    return np.random.default_rng(seed).standard_normal(shape)


def make(cls, *args, dtype=np.float64, seed=0, **kw):
    random_stream.seed(seed)
    return cls(*args, **kw).astype(dtype)


@contextlib.contextmanager
def workspace_mb(mb):
    old = kernels.get_workspace_limit() / 2**20
    kernels.set_workspace_limit(mb)
    try:
        yield
    finally:
        kernels.set_workspace_limit(old)


def layer_checks(what, build, x, torch_fn=None):
    """gradcheck in float64, then contracts and PyTorch in float32, each on a fresh layer."""
    gradcheck(what, build(np.float64), x)
    contracts(what, build(np.float32), x.astype(np.float32))
    if torch_fn is not None:
        torch_parity(what, build(np.float32), x.astype(np.float32), torch_fn)


# -- one grader per exercise ---------------------------------------------------------------------
def grade_relu(m):
    F = _functional()
    for shape in [(1, 3), (2, 3, 4, 5)]:
        layer_checks(f"ReLU on {shape}", lambda dt: m.ReLU().astype(dt), distinct(shape),
                     F and (lambda x, p: F.relu(x)))


def grade_linear(m):
    F = _functional()
    for n, i, o, bias in [(1, 3, 2, True), (4, 5, 3, True), (3, 2, 4, False)]:
        layer_checks(f"Linear({i}, {o}, bias={bias}) on batch {n}",
                     lambda dt: make(m.Linear, i, o, bias=bias, dtype=dt), normal((n, i)),
                     F and (lambda x, p: F.linear(x, p["weight"], p.get("bias"))))


def grade_dropout(m):
    for train in (True, False):
        for shape in [(1, 5), (3, 7)]:
            def build(dt):
                layer = m.Dropout(p=0.3, seed=4).astype(dt)
                return layer.train(train)
            layer_checks(f"Dropout(p=0.3) in {'training' if train else 'eval'} on {shape}", build,
                         normal(shape))


def grade_softmax_ce(m):
    torch, F = _torch(), _functional()
    for n, k, eps in [(1, 4, 0.0), (5, 7, 0.0), (4, 3, 0.1)]:
        what = f"SoftmaxCrossEntropy(label_smoothing={eps}) on logits ({n}, {k})"
        z_host = normal((n, k)) * 2
        y = dev(np.random.default_rng(1).integers(0, k, n))
        z = dev(z_host)
        loss = m.SoftmaxCrossEntropy(label_smoothing=eps)
        err = check_function(lambda: loss.forward(z, y), lambda G: {"logits": loss.backward(G)},
                             {"logits": z})["logits"]
        if not err <= GRAD_TOL:
            raise Failed(worst(what, "logits", err))
        z_before = z_host.astype(np.float32)
        z32 = dev(z_before.copy())
        loss.forward(z32, y)
        dz = loss.backward()
        if not np.array_equal(backend.to_numpy(z32), z_before) or getattr(dz, "dtype", None) != np.float32 or dz.shape != z.shape:
            raise Failed(f"{what}: backward() must leave the logits unchanged and return float32 "
                         f"{z.shape}, got {getattr(dz, 'dtype', type(dz).__name__)} {getattr(dz, 'shape', '')}")
        if torch is not None:
            zt = torch.tensor(z_before, requires_grad=True)
            F.cross_entropy(zt, torch.tensor(backend.to_numpy(y)), label_smoothing=eps).backward()
            err = GradError(dz, zt.grad.numpy())
            if not err <= TORCH_BWD:
                raise Failed(worst(what, "logits", err, theirs="PyTorch"))


def grade_maxpool(m):
    F = _functional()
    for shape, k, s, p in [((1, 1, 4, 4), 2, 2, 0), ((2, 3, 7, 6), 3, 2, 1), ((1, 2, 5, 7), (2, 3), (1, 2), 0),
                           ((1, 1, 6, 6), 2, 3, 0)]:
        layer_checks(f"MaxPool2d(kernel_size={k}, stride={s}, padding={p}) on {shape}",
                     lambda dt: m.MaxPool2d(k, s, p), distinct(shape),
                     F and (lambda x, _: F.max_pool2d(x, k, s, p)))
    from ..layers import MaxPool2d
    # ties on purpose: only the first maximum of each window (row-major) receives dout
    x = np.zeros((1, 2, 4, 4))
    x[0, 1, 1:3, 1:3] = 1.0
    what = "MaxPool2d(kernel_size=2, stride=2) on tied windows"
    x, G = dev(x), dev(normal((1, 2, 2, 2), seed=3))
    mine = m.MaxPool2d(2, 2)
    mine.forward(x)
    ref = MaxPool2d(2, 2)
    ref.forward(x)
    err = GradError(mine.backward(G), ref.backward(G))
    if not err <= 1e-12:
        raise Failed(worst(what, "x", err, theirs="expected (first maximum only)"))


def grade_conv(m):
    F = _functional()
    for shape, f, k, s, p, bias in [((1, 2, 5, 5), 3, 3, 1, 1, True), ((2, 3, 7, 6), 2, 3, 2, 1, True),
                                    ((1, 2, 6, 5), 3, (2, 3), (2, 1), 0, False), ((3, 1, 4, 4), 4, 1, 1, 0, True),
                                    ((2, 4, 5, 5), 2, 3, 1, 2, True)]:
        layer_checks(f"Conv2d({shape[1]}, {f}, kernel_size={k}, stride={s}, padding={p}, bias={bias}) on {shape}",
                     lambda dt: make(m.Conv2d, shape[1], f, k, s, p, bias=bias, dtype=dt), normal(shape),
                     F and (lambda x, q: F.conv2d(x, q["weight"], q.get("bias"), s, p)))
    if hasattr(kernels, "set_workspace_limit"):
        with workspace_mb(1e-4):   # a batch processed in several chunks: forward keeps no columns
                gradcheck("Conv2d(2, 3, kernel_size=3, padding=1) on (3, 2, 5, 5) in chunks of one image",
                      make(m.Conv2d, 2, 3, 3, 1, 1), normal((3, 2, 5, 5)))


def grade_batchnorm(m):
    F = _functional()
    for shape, train in [((2, 3, 4, 5), True), ((1, 2, 3, 3), True), ((3, 2, 1, 1), True), ((2, 3, 4, 5), False)]:
        def build(dt):
            layer = make(m.BatchNorm2d, shape[1], dtype=dt)
            rng = np.random.default_rng(5)
            C = shape[1]
            layer.params["weight"][...] = rng.uniform(0.5, 1.5, C)
            layer.params["bias"][...] = rng.standard_normal(C)
            layer.buffers["running_mean"] = rng.standard_normal(C).astype(dt)
            layer.buffers["running_var"] = rng.uniform(0.5, 2.0, C).astype(dt)
            return layer.train(train)

        def torch_fn(x, q, layer=build(np.float32)):
            b = layer.buffers
            rm, rv = (None, None) if train else tuple(_torch().tensor(b[k]) for k in ("running_mean", "running_var"))
            return F.batch_norm(x, rm, rv, q["weight"], q["bias"], training=train, eps=layer.eps)
        layer_checks(f"BatchNorm2d({shape[1]}) in {'training' if train else 'eval'} on {shape}", build,
                     normal(shape) * 2 + 1, F and torch_fn)


def grade_adam(m):
    from ..layers import Linear
    from ..optim import Adam
    torch = _torch()
    for wd in (0.0, 0.1):
        what = f"Adam(lr=0.01, weight_decay={wd})"
        models = [dev(make(Linear, 3, 2)), dev(make(Linear, 3, 2))]
        p0 = {k: backend.to_numpy(p).copy() for k, p in models[0].params.items()}
        opts = [m.Adam(models[0], lr=0.01, weight_decay=wd), Adam(models[1], lr=0.01, weight_decay=wd)]
        rng = np.random.default_rng(6)
        for step in range(1, 4):
            for key in p0:
                g = rng.standard_normal(p0[key].shape)
                for model in models:
                    model.grads[key] = dev(g)
            for opt in opts:
                opt.step()
            for key in p0:
                err = GradError(backend.to_numpy(models[0].params[key]) - p0[key],
                                backend.to_numpy(models[1].params[key]) - p0[key])
                if not err <= 1e-10:
                    raise Failed(f"{what}, step {step}: the change of {key} is wrong (relative error "
                                 f"{float(err):.1e}); worst element {err.index}: yours {err.analytic:.6g}, "
                                 f"expected {err.numeric:.6g}")
        if torch is not None:   # float32, against torch.optim.Adam
            model = dev(make(Linear, 3, 2, dtype=np.float32))
            start = {k: backend.to_numpy(p).copy() for k, p in model.params.items()}
            tp = {k: torch.tensor(p.copy(), requires_grad=True) for k, p in start.items()}
            opt, topt = m.Adam(model, lr=0.01, weight_decay=wd), torch.optim.Adam(tp.values(), lr=0.01, weight_decay=wd)
            for _ in range(3):
                for key in start:
                    g = rng.standard_normal(start[key].shape).astype(np.float32)
                    model.grads[key], tp[key].grad = dev(g), torch.tensor(g)
                opt.step()
                topt.step()
            for key in start:
                err = GradError(backend.to_numpy(model.params[key]) - start[key],
                                tp[key].detach().numpy() - start[key])
                if not err <= TORCH_BWD:
                    raise Failed(f"{what}, 3 steps in float32: the change of {key} differs from PyTorch "
                                 f"(relative error {float(err):.1e}); worst element {err.index}: yours "
                                 f"{err.analytic:.6g}, PyTorch {err.numeric:.6g}")


def _functional():
    torch = _torch()
    return None if torch is None else torch.nn.functional


GRADERS = {"relu": grade_relu, "linear": grade_linear, "dropout": grade_dropout, "softmax_ce": grade_softmax_ce,
           "maxpool": grade_maxpool, "conv": grade_conv, "batchnorm": grade_batchnorm, "adam": grade_adam}


# -- running them --------------------------------------------------------------------------------
def grade_one(directory: Path, name: str) -> Result:
    path = Path(directory) / f"{name}.py"
    if not path.is_file():
        return Result(name, "failed", f"{path} is missing (make a workspace with `init`)")
    try:
        GRADERS[name](load(path))
    except NotImplementedError as e:
        if str(e).startswith(GAP) and _raised_in(e, path):
            return Result(name, "not started", str(e))
        return Result(name, "failed", learner_traceback(e, path))
    except Failed as e:
        return Result(name, "failed", str(e))
    except Exception as e:   # the learner's own error: their traceback, not the grader's
        return Result(name, "failed", learner_traceback(e, path))
    return Result(name, "passed")


def _raised_in(e: BaseException, path: Path) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve() == path.resolve()


def learner_traceback(e: BaseException, path: Path) -> str:
    """The exception with only the frames in the learner's file (all frames if none is there)."""
    frames = traceback.extract_tb(e.__traceback__)
    theirs = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
    if isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path.resolve():
        theirs = []
    lines = ["Traceback (your code):\n" if theirs else "Traceback:\n"] + traceback.format_list(theirs or frames)
    return "".join(lines + traceback.format_exception_only(type(e), e)).rstrip()


def check_workspace(directory, names=None, device: str = "cpu") -> list[Result]:
    """Grade the named exercises (all, in order, by default), running them on `device`."""
    names = list(names) if names else [e.name for e in EXERCISES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(map(repr, unknown))}; "
                         f"the exercises are {', '.join(e.name for e in EXERCISES)}")
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no workspace at {directory}: make one with `init {directory}`")
    if backend.parse_device(device)[0] == "gpu" and not backend.gpu_available():   # before any grading
        raise ValueError(f"device {device!r} asked for, but no GPU (CuPy with a CUDA device) is available")
    with on_device(device):
        return [grade_one(Path(directory), n) for n in names]


def report(results: list[Result], out=None) -> None:
    """Each unfinished exercise's detail, then the progress table."""
    out = out or sys.stdout
    for r in results:
        if r.status != "passed":
            print(f"--- {r.name}: {r.status}\n{r.detail}\n", file=out)
    width = max([len("exercise")] + [len(r.name) for r in results])
    print(f"{'exercise':<{width}}  status", file=out)
    for r in results:
        print(f"{r.name:<{width}}  {r.status}", file=out)
    done = sum(r.status == "passed" for r in results)
    print(f"{done} of {len(results)} passed", file=out)
