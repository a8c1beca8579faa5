"""How many images per second does a whole minivgg training step process, against the same
network trained by PyTorch, and how much memory does each need?

One step = forward, softmax cross-entropy, backward, Adam update, on a fixed random batch:
  (a) VGG-11 on 32x32 images (Fashion-MNIST-like: 10 classes, 1 channel), batch 64, with the
      head pool_size=1 and hidden widths (512, 512); --batch-norm for VGG-11-BN;
  (b) d2l's VGG-11 (every conv width divided by 4) on 224x224, classic 4096-4096 head;
  (c) the quick start's VGG-11-BN (--models quick-start; widths / 8, 32x32, batch 128), not in "all".
The PyTorch model is minivgg.models.torch_interop.to_torch(model): the same layers and weights,
trained by torch.optim.Adam. Before timing, both must give the same logits and loss on the
first step from the same weights (dropout off for that check), and gradients that agree.

    PYTHONPATH=. python benchmarks/train_speed.py                      # both models, CPU
    PYTHONPATH=. python benchmarks/train_speed.py --models vgg11-32 --batch-norm --json out.json
    PYTHONPATH=. python benchmarks/train_speed.py --device gpu         # CuPy vs PyTorch CUDA
    PYTHONPATH=. python benchmarks/train_speed.py --conv-algos im2col-fast,auto --host-memory both

--host-memory keep runs every subprocess, torch's too, after minivgg.hostmem.keep_freed_memory()
(glibc keeps freed memory for the next step instead of unmapping it; what the training command
does by default); both times each variant with glibc's default and with it, alternating.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import sys
import textwrap
import time
import traceback

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/train_speed.py` without PYTHONPATH=.: add the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

# Before minivgg imports CuPy: TF32 stays off for float32 unless --tf32 (see common).
common.set_cupy_tf32_env("--tf32" in sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import minivgg  # noqa: E402
from minivgg import backend, hostmem  # noqa: E402
from minivgg.layers import Dropout  # noqa: E402
from minivgg.losses import SoftmaxCrossEntropy  # noqa: E402
from minivgg.layers import CONV_ENGINES  # noqa: E402
from minivgg.layers.conv_engines import DEFAULT_CONV_ENGINE  # noqa: E402
from minivgg.models import VGG, build_model  # noqa: E402
from minivgg.models.torch_interop import to_torch  # noqa: E402
from minivgg.optim import Adam  # noqa: E402
from minivgg.train import skip_input_grad  # noqa: E402

TOL_FP32 = 1e-4   # rel err of the loss, float32
TOL_TF32 = 1e-2   # with --tf32 both sides round matmul inputs to 10 mantissa bits
GRAD_TOL = 0.1    # gradients after step 1: a loose gate against a broken backward (see check_first_step)
LR = 1e-3

MEMORY_METHOD = {
    "cpu": ("peak host memory of a fresh subprocess per framework (multiprocessing 'spawn'): "
            "VmHWM from /proc/self/status after the timed steps minus VmRSS after the imports, "
            "the high-water mark having been reset (echo 5 > /proc/self/clear_refs) once the "
            "model, optimizer and batch were built; so it counts weights, gradients, Adam state, "
            "batch, activations and workspace, not the interpreter and libraries"),
    "gpu": ("minivgg: the peak of bytes in use in CuPy's memory pool during one step, tracked "
            "allocation by allocation with a cupy.cuda.MemoryHook (the pool's total_bytes() "
            "high-water mark, which also counts cached free blocks, is in the JSON); torch: "
            "torch.cuda.max_memory_allocated() over the timed steps (max_memory_reserved in the "
            "JSON). Each framework runs in its own subprocess; both count weights, gradients, "
            "Adam state, batch, activations and workspace"),
}


# ---------------------------------------------------------------------------------------------
# The two workloads
# ---------------------------------------------------------------------------------------------
def vgg11_32_config(batch: int = 64, in_channels: int = 1, batch_norm: bool = False) -> dict:
    """(a) VGG-11 on 32x32, 10 classes: pool_size=1 head with hidden widths (512, 512)."""
    return {"name": "VGG-11-BN @ 32x32" if batch_norm else "VGG-11 @ 32x32", "key": "vgg11-32",
            "batch": batch, "image": 32,
            "model": {"arch": "vgg11_bn" if batch_norm else "vgg11", "num_classes": 10,
                      "in_channels": in_channels, "width_ratio": 1, "head": "classic",
                      "hidden": [512, 512], "pool_size": 1, "dropout": 0.5, "init": "kaiming"}}


def d2l_224_config(batch: int = 16, in_channels: int = 1) -> dict:
    """(b) d2l's VGG-11: conv widths / 4 (16..128), 224x224, classic head 4096-4096, Xavier init."""
    return {"name": "d2l VGG-11 (width/4) @ 224x224", "key": "d2l-224", "batch": batch, "image": 224,
            "model": {"arch": "vgg11", "num_classes": 10, "in_channels": in_channels, "width_ratio": 4,
                      "head": "classic", "hidden": [4096, 4096], "pool_size": 7, "dropout": 0.5,
                      "init": "xavier"}}


def quick_start_config(batch: int = 128, in_channels: int = 1) -> dict:
    """(c) the quick start's network (examples/train_vgg11.py's defaults): VGG-11-BN at 1/8 width on
    32x32, classic head pooled to 1x1 with hidden widths (256, 256), no dropout, Xavier init, batch 128."""
    return {"name": "quick start: VGG-11-BN (width/8) @ 32x32", "key": "quick-start", "batch": batch,
            "image": 32,
            "model": {"arch": "vgg11_bn", "num_classes": 10, "in_channels": in_channels, "width_ratio": 8,
                      "head": "classic", "hidden": [256, 256], "pool_size": 1, "dropout": 0.0,
                      "init": "xavier"}}


def make_batch(config: dict, seed: int = 0):
    """A fixed float32 batch (N, C, S, S) ~ N(0, 1) and int64 labels (N,), on the host."""
    rng = np.random.default_rng(seed + 1)
    m = config["model"]
    x = rng.standard_normal((config["batch"], m["in_channels"], config["image"], config["image"]),
                            dtype=np.float32)
    y = rng.integers(0, m["num_classes"], size=config["batch"], dtype=np.int64)
    return x, y


def build_minivgg(config: dict, seed: int = 0):
    """The minivgg model of config["model"], its convolutions by the engine config["conv_algo"]
    (default: the models' default engine)."""
    minivgg.seed(seed)
    build_model(dict(config["model"]))     # refuses a config build_model would not take
    minivgg.seed(seed)
    return VGG(**config["model"], conv_algo=config.get("conv_algo", DEFAULT_CONV_ENGINE))


def with_algo(config: dict, algo: str, keep_memory: bool = False) -> dict:
    """config with its convolutions computed by engine `algo`, and with glibc keeping freed memory
    (hostmem.keep_freed_memory) if keep_memory, named so in the report."""
    tags = ([] if algo == DEFAULT_CONV_ENGINE else [algo]) + (["keep-memory"] if keep_memory else [])
    name = f"{config['name']} [{', '.join(tags)}]" if tags else config["name"]
    return dict(config, conv_algo=algo, keep_freed_memory=keep_memory, name=name)


def torch_device(device: str) -> torch.device:
    return torch.device("cpu" if device == "cpu" else "cuda")


# ---------------------------------------------------------------------------------------------
# One training step in each framework
# ---------------------------------------------------------------------------------------------
def minivgg_step_fn(model, x, y, lr: float = LR):
    """A callable running one minivgg step; returns the loss (a 0-d array on the device)."""
    opt = Adam(model, lr=lr)
    loss_fn = SoftmaxCrossEntropy()
    skip_input_grad(model)   # the images need no gradient, as in torch (x.requires_grad is False)

    def step():
        logits = model.forward(x)                 # (N, K)
        loss = loss_fn(logits, y)
        model.backward(loss_fn.backward())        # fills every layer's grads
        opt.step()
        return loss
    return step


def torch_step_fn(model, x, y, lr: float = LR):
    """A callable running one torch step (torch.optim.Adam, its default implementation)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def dropout_off(mv_model=None, torch_model=None) -> None:
    """p = 0 in every Dropout, so both frameworks compute the same deterministic function."""
    if mv_model is not None:
        for _, m in mv_model.modules():
            if isinstance(m, Dropout):
                m.p = 0.0
    if torch_model is not None:
        for m in torch_model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


def check_first_step(config: dict, device: str = "cpu", tol: float = TOL_FP32, seed: int = 0,
                     grad_tol: float = GRAD_TOL) -> dict:
    """Build both models from the same weights, dropout off, and run one step in each.

    Gate 1 (what the timings rest on): the logits, as max|a-b|/max|b|, and the losses agree
    within rel err `tol`. The logits matter: with the default init (classifier weights
    ~ N(0, 0.01^2)) the first loss is log(K) to about 4 digits whatever the features compute.
    Gate 2 (catches a broken backward, which the loss alone cannot): every parameter's
    gradient agrees within `grad_tol`, measured as max|a-b| / max(max|b|, 1e-3 * the largest
    gradient entry of the model). The gate is loose because float32 rounding differences grow
    through ReLU kinks and BatchNorm's cancelling sums (a few 1e-3, up to ~2e-2 with BN at small
    batches; in float64 the two agree to 1e-14); a wrong backward is off by O(1).
    Later steps are not compared: Adam's first update, lr * g / (|g| + eps), turns rounding-level
    differences in tiny gradients into differences of lr, so losses drift apart by design.
    """
    mv = build_minivgg(config, seed)
    dropout_off(mv)
    twin = to_torch(mv).to(torch_device(device))
    mv.to(device)
    x, y = make_batch(config, seed)
    what = f"{config['name']}, batch {config['batch']}"
    logits_err = common.check_close(
        {"logits": (mv.forward(backend.to_device(x, device)),
                    twin(torch.from_numpy(x).to(torch_device(device))).detach())}, tol, what)["logits"]
    mv_loss = float(backend.to_numpy(minivgg_step_fn(mv, backend.to_device(x, device),
                                                     backend.to_device(y, device))()))
    t_loss = float(torch_step_fn(twin, torch.from_numpy(x).to(torch_device(device)),
                                 torch.from_numpy(y).to(torch_device(device)))().item())
    loss_err = common.check_close({"loss of step 1": (np.float64(mv_loss), np.float64(t_loss))}, tol, what)
    tgrads = {name: p.grad for name, p in twin.named_parameters()}
    pairs = {name: (g, tgrads[name]) for name, _, g in mv.named_parameters()}
    floor = 1e-3 * max(float(g.abs().max()) for g in tgrads.values())
    grad_err = common.check_close(pairs, grad_tol, what + " (gradients after step 1)", floor=floor)
    worst = max(grad_err, key=grad_err.get)
    return {"logits_rel_err": logits_err,
            "loss_minivgg": mv_loss, "loss_torch": t_loss, "loss_rel_err": loss_err["loss of step 1"],
            "grad_max_rel_err": grad_err[worst], "grad_worst": worst, "grad_rel_err": grad_err}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024          # the kernel reports kB
    except OSError:
        pass
    return None


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024          # bytes on macOS, KiB on Linux


def reset_host_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cupy_peak_used_bytes(step) -> int:
    """Run step() once and return the most bytes CuPy's pool had in use at any moment."""
    cupy = backend.cupy
    pool = cupy.get_default_memory_pool()

    class PeakHook(cupy.cuda.MemoryHook):
        name = "benchmarks_peak_used"

        def __init__(self):
            super().__init__()
            self.now = self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kw):
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw):
            self.now -= kw["mem_size"]

    hook = PeakHook()
    with hook:
        step()
        backend.synchronize()
    return hook.peak


# ---------------------------------------------------------------------------------------------
# The timed run, in a fresh process per framework
# ---------------------------------------------------------------------------------------------
def time_training(framework: str, config: dict, device: str = "cpu", steps: int = 5, warmup: int = 2,
                  seed: int = 0, threads: int | None = None, tf32: bool = False) -> dict:
    """Build the model, run warmup + steps training steps, time each (device synchronised),
    and measure peak memory. Meant to run in its own process (see run_isolated)."""
    if framework not in ("minivgg", "torch"):
        raise ValueError(f"framework must be 'minivgg' or 'torch', got {framework!r}")
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"   # CuPy reads it at its first float32 matmul
    if config.get("keep_freed_memory") and not hostmem.keep_freed_memory():
        raise RuntimeError("keep_freed_memory: this C library is not glibc; nothing to compare")
    common.set_torch_tf32(tf32)
    common.set_threads(threads)
    if device == "gpu":
        backend.get_xp("gpu")
    gc.collect()
    base_rss = _proc_status_bytes("VmRSS")
    base_ru = _ru_maxrss_bytes()

    mv = build_minivgg(config, seed)
    x, y = make_batch(config, seed)
    if framework == "torch":
        tdev = torch_device(device)
        model = to_torch(mv).to(tdev)
        del mv                                        # the twin holds its own copy of the weights
        step = torch_step_fn(model, torch.from_numpy(x).to(tdev), torch.from_numpy(y).to(tdev))
    else:
        model = mv.to(device)
        step = minivgg_step_fn(model, backend.to_device(x, device), backend.to_device(y, device))
    gc.collect()
    if device == "gpu" and framework == "torch":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    hwm_reset = reset_host_peak()

    pool = backend.cupy.get_default_memory_pool() if device == "gpu" else None
    pool_high = 0
    times, losses = [], []
    for i in range(warmup + steps):
        common.synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        common.synchronize(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        if pool is not None:
            pool_high = max(pool_high, pool.total_bytes())
        losses.append(float(loss.item()) if framework == "torch" else float(backend.to_numpy(loss)))
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"{framework}: non-finite loss during the timed steps: {losses}")

    mem = {}
    if device == "cpu":
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None and base_rss is not None:
            mem["peak_bytes"] = hwm - base_rss
            mem["method"] = "VmHWM - VmRSS after imports" + ("" if hwm_reset else " (VmHWM not reset)")
        else:   # no /proc (not Linux): the process's lifetime peak minus the one after imports
            mem["peak_bytes"] = _ru_maxrss_bytes() - base_ru
            mem["method"] = "ru_maxrss - ru_maxrss after imports"
        mem["process_peak_rss_bytes"] = _ru_maxrss_bytes()
    elif framework == "torch":
        mem["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        mem["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
        mem["method"] = "torch.cuda.max_memory_allocated"
    else:
        mem["peak_bytes"] = int(cupy_peak_used_bytes(step))
        mem["pool_total_high_water_bytes"] = int(max(pool_high, pool.total_bytes()))
        mem["method"] = "CuPy pool bytes in use, peak within one step (MemoryHook)"

    t = common.Timing(median=float(np.median(times)), min=min(times), max=max(times), times=times)
    return {"framework": framework, "device": device, "batch": config["batch"],
            "step": t.to_dict(), "images_per_second": config["batch"] / t.median,
            "losses": losses, "memory": mem, "pid": os.getpid()}


def _child(queue, kwargs) -> None:
    try:
        queue.put(("ok", time_training(**kwargs)))
    except BaseException:   # report anything, even SystemExit, to the parent
        queue.put(("error", traceback.format_exc()))


def run_isolated(**kwargs) -> dict:
    """time_training(**kwargs) in a fresh 'spawn' subprocess, so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    try:
        status, payload = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"the {kwargs.get('framework')} timing subprocess failed:\n{payload}")
    return payload


def pool_rounds(runs: list[dict]) -> dict:
    """One framework's rounds (time_training results) as one: the median over all their timed
    steps, the largest peak memory; each round's own median kept under 'round_medians', the
    rest (losses, pid, ...) from the first round."""
    times = [t for r in runs for t in r["step"]["times"]]
    out = dict(runs[0])
    t = common.Timing(median=float(np.median(times)), min=min(times), max=max(times), times=times)
    out["step"] = t.to_dict()
    out["images_per_second"] = out["batch"] / t.median
    out["memory"] = max((r["memory"] for r in runs), key=lambda m: m["peak_bytes"])
    out["round_medians"] = [r["step"]["median"] for r in runs]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarize(config: dict, check: dict, mv: dict, tt: dict) -> dict:
    """ratio_time: the median over rounds of minivgg's round median / torch's round median (a round
    runs both back to back, so load from elsewhere that comes and goes hits the pair alike)."""
    round_ratios = [a / b for a, b in zip(mv.get("round_medians", [mv["step"]["median"]]),
                                          tt.get("round_medians", [tt["step"]["median"]]))]
    return {"name": config["name"], "key": config["key"], "batch": config["batch"], "image": config["image"],
            "conv_algo": config.get("conv_algo", DEFAULT_CONV_ENGINE),
            "keep_freed_memory": bool(config.get("keep_freed_memory")),
            "model": config["model"], "check": check, "minivgg": mv, "torch": tt,
            "ratio_time": float(np.median(round_ratios)), "round_ratios": round_ratios,
            "ratio_memory": (mv["memory"]["peak_bytes"] / tt["memory"]["peak_bytes"]
                             if tt["memory"]["peak_bytes"] > 0 else float("nan"))}


def format_report(results: list[dict], device: str) -> str:
    mib = 2.0 ** 20
    rows = [[r["name"], r["batch"],
             f"{r['minivgg']['images_per_second']:.1f}", f"{r['torch']['images_per_second']:.1f}",
             common.fmt_ratio(r["ratio_time"]),
             common.fmt_ms(r["minivgg"]["step"]["median"]), common.fmt_ms(r["torch"]["step"]["median"]),
             f"{r['minivgg']['memory']['peak_bytes'] / mib:.0f}",
             f"{r['torch']['memory']['peak_bytes'] / mib:.0f}"]
            for r in results]
    checks = "; ".join(f"{r['name']}: logits rel err {r['check']['logits_rel_err']:.1e}, loss "
                       f"{r['check']['loss_rel_err']:.1e}, max gradient {r['check']['grad_max_rel_err']:.1e} "
                       f"({r['check']['grad_worst']})" for r in results)
    rounds = [f"{r['name']}: " + ", ".join(common.fmt_ratio(x) for x in r["round_ratios"])
              for r in results if len(r["round_ratios"]) > 1]
    lines = ["one training step (forward, loss, backward, Adam), median over the timed steps (of every "
             "round); ratio = minivgg step time / torch step time (above 1: minivgg is slower), the "
             "median of the rounds' ratios",
             common.table(["model", "batch", "minivgg img/s", "torch img/s", "ratio", "minivgg ms/step",
                           "torch ms/step", "peak MiB minivgg", "peak MiB torch"], rows),
             *([textwrap.fill("each round's ratio: " + "; ".join(rounds), 100)] if rounds else []),
             "",
             textwrap.fill(f"check (same weights, dropout off, one step): {checks}", 100),
             textwrap.fill(f"memory: {MEMORY_METHOD[device]}", 100)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n    PYTHONPATH")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            "Each framework is timed in its own fresh subprocess (so its peak memory is its "
            "own), after --warmup untimed steps; the report gives the median step. On the GPU "
            "every step is bracketed by device synchronisations and TF32 is off on both sides "
            "unless --tf32 (CuPy reads CUPY_TF32 from the environment, which this script sets "
            "before importing CuPy). Memory on the CPU: " + MEMORY_METHOD["cpu"] + ". On the GPU: "
            + MEMORY_METHOD["gpu"] + ".", 92))
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: NumPy vs torch CPU; gpu: CuPy vs torch CUDA (default: cpu)")
    p.add_argument("--models", choices=("all", "vgg11-32", "d2l-224", "quick-start"), default="all",
                   help="which workload(s) to run: all = vgg11-32 and d2l-224; quick-start = the quick "
                        "start's network, batch 128 (default: all)")
    p.add_argument("--batch", type=int, default=64, help="batch for VGG-11 @ 32x32 (default 64)")
    p.add_argument("--d2l-batch", type=int, default=None,
                   help="batch for d2l's VGG-11 @ 224x224 (default: 16 on the CPU, 128 on the GPU)")
    p.add_argument("--in-channels", type=int, default=1, choices=(1, 3),
                   help="input channels: 1 as Fashion-MNIST (default), 3 for RGB")
    p.add_argument("--batch-norm", action="store_true",
                   help="VGG-11-BN (BatchNorm after every conv) for the 32x32 workload")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time minivgg then torch, each in a fresh subprocess, this many times; steps are "
                        "pooled per framework and the ratio is the median of the rounds' ratios, so "
                        "load from elsewhere that comes and goes lands on both (default 1)")
    p.add_argument("--conv-algos", default=DEFAULT_CONV_ENGINE, metavar="A,B",
                   help="comma-separated convolution engines for minivgg (of CONV_ENGINES: "
                        f"{', '.join(sorted(CONV_ENGINES))}); with several, every round times each in "
                        f"turn, then torch (default: {DEFAULT_CONV_ENGINE})")
    p.add_argument("--host-memory", choices=("default", "keep", "both"), default="default",
                   help="default: glibc's malloc as it comes; keep: every subprocess (torch's too) after "
                        "minivgg.hostmem.keep_freed_memory(), as the training command runs; both: each "
                        "variant both ways, in turn (default: default)")
    p.add_argument("--grad-tol", type=float, default=GRAD_TOL,
                   help=f"tolerance of the gradient check after step 1 (default {GRAD_TOL}; see the docs "
                        "of check_first_step for why it is loose)")
    common.add_shared_options(p, checked="the loss check")
    args = p.parse_args(argv)
    args.conv_algos = [a.strip() for a in args.conv_algos.split(",") if a.strip()]
    unknown = sorted(set(args.conv_algos) - set(CONV_ENGINES))
    if unknown or not args.conv_algos:
        p.error(f"--conv-algos: unknown {unknown or 'empty'}; choose from {sorted(CONV_ENGINES)}")
    if args.host_memory != "default" and args.device != "cpu":
        p.error(f"--host-memory {args.host_memory} is about the host's malloc: use it with --device cpu")
    if args.d2l_batch is None:
        args.d2l_batch = 16 if args.device == "cpu" else 128
    if min(args.batch, args.d2l_batch, args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--batch, --d2l-batch, --steps and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tf32, threads_note, tol = common.start_run(args, TOL_FP32, TOL_TF32)
    configs = []
    if args.models in ("all", "vgg11-32"):
        configs.append(vgg11_32_config(args.batch, args.in_channels, args.batch_norm))
    if args.models in ("all", "d2l-224"):
        configs.append(d2l_224_config(args.d2l_batch, args.in_channels))
    if args.models == "quick-start":
        configs.append(quick_start_config(in_channels=args.in_channels))

    info = common.machine_info(args.device)
    print(common.header(info, f"{threads_note}; TF32 {'on' if args.tf32 else 'off'}"))
    print(f"benchmark: training step, float32, device {args.device}, median of {args.steps} steps "
          f"after {args.warmup} warm-up x {args.rounds} round(s), each framework in its own subprocess "
          f"each round; loss check tolerance {tol:g}")
    print(flush=True)

    algos = args.conv_algos
    keeps = {"default": [False], "keep": [True], "both": [False, True]}[args.host_memory]
    labels = [(a, k) for k in keeps for a in algos]
    progress = common.Progress(total=(len(algos) + (len(keeps) + len(labels)) * args.rounds) * len(configs),
                               desc="train_speed", enabled=not args.no_progress)
    results = []
    for base in configs:
        variants = {(a, k): with_algo(base, a, k) for a, k in labels}
        torch_variants = {k: dict(base, keep_freed_memory=k) for k in keeps}
        checks = {}   # one per engine: the check runs in this process, where the host-memory mode is not set
        for a in algos:
            config = variants[(a, keeps[0])]
            progress.step(f"{config['name']}: checking the losses agree")
            try:
                checks[a] = check_first_step(config, args.device, tol, args.seed, args.grad_tol)
            except common.MismatchError as e:
                progress.close()
                raise SystemExit(f"check failed, nothing timed: {e}")
        gc.collect()
        runs = {label: [] for label in labels}
        torch_runs = {k: [] for k in keeps}
        for i in range(args.rounds):   # each engine, then torch (per host-memory mode): alternating, in one run
            jobs = [("minivgg", variants[label], runs[label]) for label in labels]
            jobs += [("torch", torch_variants[k], torch_runs[k]) for k in keeps]
            for fw, config, into in jobs:
                progress.step(f"{config['key']}: round {i + 1}/{args.rounds}, timing {fw} "
                              f"{'[' + config.get('conv_algo', '') + '] ' if fw == 'minivgg' else ''}"
                              f"{'[keep-memory] ' if config['keep_freed_memory'] else ''}"
                              f"({args.warmup}+{args.steps} steps, subprocess)")
                into.append(run_isolated(framework=fw, config=config, device=args.device, steps=args.steps,
                                         warmup=args.warmup, seed=args.seed, threads=args.threads,
                                         tf32=args.tf32))
        torch_pooled = {k: pool_rounds(torch_runs[k]) for k in keeps}
        for a, k in labels:
            results.append(summarize(variants[(a, k)], checks[a], pool_rounds(runs[(a, k)]),
                                     torch_pooled[k]))
    progress.close()
    print(format_report(results, args.device))
    if len(labels) > 1:   # every variant against the first (first engine, glibc's default memory if run)
        first = {r["key"]: r for r in results
                 if (r["conv_algo"], r["keep_freed_memory"]) == labels[0]}
        for r in results:
            if (r["conv_algo"], r["keep_freed_memory"]) != labels[0]:
                base_row = first[r["key"]]
                speedup = r["minivgg"]["images_per_second"] / base_row["minivgg"]["images_per_second"]
                print(f"{r['name']}: {speedup:.2f}x the images/s of {base_row['name']} (same run)")
    if len(keeps) == 2:   # the setting moves memory, not numbers: the same losses, bit for bit
        by = {(r["key"], r["conv_algo"], r["keep_freed_memory"]): r for r in results}
        for (key, algo, keep), r in by.items():
            if keep:
                same = by[(key, algo, False)]["minivgg"]["losses"] == r["minivgg"]["losses"]
                print(f"{r['name']}: {'the same' if same else 'NOT the same'} {len(r['minivgg']['losses'])} "
                      f"losses as with glibc's default, bit for bit")

    payload = {"benchmark": "train_speed", "device": args.device, "dtype": "float32", "steps": args.steps,
               "rounds": args.rounds, "conv_algos": algos, "host_memory": args.host_memory,
               "warmup": args.warmup, "tolerance": tol, "tf32": tf32, "threads": args.threads,
               "threads_note": threads_note, "optimizer": {"name": "Adam", "lr": LR},
               "memory_method": MEMORY_METHOD[args.device], "machine": info, "results": results}
    if args.json:
        common.write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
