"""The one prepared check of minivgg on a real GPU: every step a GPU run can show, in one command,
every log under one folder, a summary table at the end. Made for a machine with a GPU and no network.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu_check           # on a GPU: about 8 minutes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/dry --dry-run  # every step, tiny, on the CPU

The steps, each a subprocess with its own time limit (together they fit --budget, 470 s by default):
  env            nvidia-smi, the GPU, CUDA runtime and driver, CuPy and torch versions
  kernel_tests   tests/test_cuda_kernels.py, test_cuda_compile.py, test_gpu_path.py on real CuPy
  backend_tests  every backend-parametrised test case on real CuPy (pytest -k cupy, MINIVGG_FAKE_CUPY=0)
  layout         the memory layout of each layer's output and input gradient in a VGG-11-BN on the
                 device: CHWN (minivgg's layout inside a network), NCHW, or other (strides printed)
  conv_speed     benchmarks/conv_speed.py --device gpu (VGG-11's convs, 32x32): float32, TF32 off
  train_speed    benchmarks/train_speed.py --device gpu, one round: float32, TF32 off
  d2l            examples/train_vgg11.py --preset d2l --device gpu on 20,000 training images, for the
                 epochs that fit its limit (stopping there is not a failure), with the accuracy on
                 the 10,000 test images after each epoch (the preset's validation set)
Each step writes <out>/<step>.log (benchmarks also their .json); <out>/summary.md holds the table.
A step that fails or runs out of time is marked so and the next step runs. Fashion-MNIST is read from
--data-dir (default: ./data/fashion-mnist when it exists, a git-ignored folder a GPU machine without
network can be given; else the loader's usual search), never downloaded.

--dry-run runs every step at a tiny size on minivgg's CuPy stand-in (MINIVGG_FAKE_CUPY=1), so CI
proves the commands still run: the benchmarks refuse the stand-in for --device gpu on purpose (it
measures no GPU), so there they run --device cpu. No figure from a dry run is a GPU figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SMALL_TESTS = ["tests/test_cuda_kernels.py", "tests/test_cuda_compile.py", "tests/test_gpu_path.py"]


def steps(out: Path, dry: bool, data_dir: str | None) -> list[dict]:
    """name, command, environment, time limit (s), and how to read its result, for every step."""
    data = ["--data-dir", data_dir] if data_dir else []
    gpu_env = {"MINIVGG_FAKE_CUPY": "1" if dry else "0", "CUPY_TF32": "0"}
    bench_device = "cpu" if dry else "gpu"
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    return [
        dict(name="env", timeout=20, env=gpu_env, parse=parse_env,
             cmd=[PY, __file__, "--probe", "env"]),
        dict(name="kernel_tests", timeout=60, env=gpu_env, parse=parse_pytest,
             cmd=pytest + (["-k", "maxpool_on_the_gpu_backend and f32 or looked_up_once or philox"] if dry else [])
             + SMALL_TESTS),
        dict(name="backend_tests", timeout=130, env=gpu_env, parse=parse_pytest,
             cmd=pytest + ["-k", ("cupy and not fakecupy" + (" and batchnorm2d_fused" if dry else "")),
                           "tests/test_reference.py" if dry else "tests"]),
        dict(name="layout", timeout=25, env=gpu_env, parse=parse_layout,
             cmd=[PY, __file__, "--probe", "layout", "--batch", "2" if dry else "16"]),
        dict(name="conv_speed", timeout=45, env=gpu_env, parse=parse_conv_speed, fresh=["conv_speed.json"],
             cmd=[PY, "benchmarks/conv_speed.py", "--device", bench_device, "--no-progress",
                  "--json", str(out / "conv_speed.json")]
             + (["--layers", "conv1", "--batch", "2", "--repeats", "1", "--warmup", "0", "--min-time", "0"]
                if dry else ["--repeats", "3"])),
        dict(name="train_speed", timeout=70, env=gpu_env, parse=parse_train_speed, fresh=["train_speed.json"],
             cmd=[PY, "benchmarks/train_speed.py", "--device", bench_device, "--rounds", "1", "--no-progress",
                  "--json", str(out / "train_speed.json")]
             + (["--models", "vgg11-32", "--batch", "2", "--steps", "1", "--warmup", "0"] if dry else [])),
        dict(name="d2l", timeout=120, env=gpu_env, parse=parse_d2l, limit_ok=True, fresh=["d2l_run"],
             cmd=[PY, "examples/train_vgg11.py", "--preset", "d2l", "--device", "gpu", "--no-download",
                  "--no-progress", "--no-plots", "--out", str(out / "d2l_run"), *data]
             + (["--image-size", "32", "--train-subset", "64", "--test-subset", "32", "--epochs", "1",
                 "--batch-size", "32"] if dry else ["--train-subset", "20000"])),
    ]


# -- reading each step's result ------------------------------------------------------------------------------
def _tail_match(log: str, pattern: str) -> str | None:
    found = re.findall(pattern, log, flags=re.M)
    return found[-1] if found else None


def parse_env(out: Path, log: str) -> str:
    return _tail_match(log, r"^device: (.*)$") or "no device line"


def parse_pytest(out: Path, log: str) -> str:
    return _tail_match(log, r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$") or "no pytest summary"


def parse_layout(out: Path, log: str) -> str:
    return _tail_match(log, r"^layout: (.*)$") or "no layout line"


def parse_conv_speed(out: Path, log: str) -> str:
    s = json.loads((out / "conv_speed.json").read_text())["summary"]
    return (f"network {s['network_ratio_total']:.2f}x torch's time, {s['geomean_over_gemm_total']:.2f}x its "
            f"own GEMMs (geomean), worst layer {s['max_ratio_layer']} at {s['max_ratio_total']:.2f}x torch")


def parse_train_speed(out: Path, log: str) -> str:
    rs = json.loads((out / "train_speed.json").read_text())["results"]
    return "; ".join(f"{r['name']}: {r['minivgg']['images_per_second']:.0f} vs torch "
                     f"{r['torch']['images_per_second']:.0f} img/s ({r['ratio_time']:.2f}x its time)" for r in rs)


def parse_d2l(out: Path, log: str) -> str:
    history = json.loads((out / "d2l_run" / "history.json").read_text())
    last = history[-1]
    return (f"{len(history)} epoch(s): test top-1 {100 * last['val_top1']:.2f}% after epoch {last['epoch']}, "
            f"{last['images_per_s']:.0f} img/s training")


# -- running ---------------------------------------------------------------------------------------------------
def run_step(step: dict, out: Path, limit: float) -> dict:
    """Run one step into <out>/<name>.log within `limit` seconds; kill its whole process group past it."""
    log_path = out / f"{step['name']}.log"
    for name in step.get("fresh", ()):   # an earlier run's results must not pass for this one's
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **step["env"]}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(step["cmd"]) + "\n")
        log.write("# env: " + " ".join(f"{k}={v}" for k, v in step["env"].items()) + f"; limit {limit:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(step["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    try:
        result, parsed = step["parse"](out, text), True
    except Exception as e:   # no result file: the step failed or stopped before writing it
        result, parsed = f"no result ({type(e).__name__}: {e})", False
    if rc is None:   # stopped at its limit: fine for a step that reports as it goes, once it reported
        status = f"ok (stopped at its limit, {limit:.0f} s)" if step.get("limit_ok") and parsed \
            else f"time limit ({limit:.0f} s)"
    else:
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    if not status.startswith("ok") or result.startswith("no result"):   # the log's last line says why
        last = [line for line in text.splitlines() if line.strip()][-1:]
        result += f"; last line: {last[0].strip()[:200]}" if last else ""
    return {"step": step["name"], "status": status, "seconds": round(seconds, 1), "result": result,
            "log": log_path.name}


def summary_table(rows: list[dict], dry: bool, total: float) -> str:
    lines = ["# minivgg GPU check" + (" (dry run on the CPU stand-in: no GPU figure)" if dry else ""), "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total:.0f} s in all", "",
             "| step | status | seconds | result | log |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['result'].replace('|', '/')} "
                     f"| {r['log']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=False, metavar="DIR", help="folder for every log and summary.md")
    p.add_argument("--dry-run", action="store_true",
                   help="every step at a tiny size on the CuPy stand-in (what CI runs)")
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds for all steps together; a step's limit shrinks to what is left (default 470)")
    p.add_argument("--steps", default=None, metavar="A,B", help="run only these steps (default: all)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="Fashion-MNIST's folder (default: ./data/fashion-mnist if it exists)")
    p.add_argument("--probe", choices=("env", "layout"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return {"env": probe_env, "layout": probe_layout}[args.probe](args)
    if not args.out:
        p.error("--out DIR is required")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or (str(ROOT / "data" / "fashion-mnist")
                                 if (ROOT / "data" / "fashion-mnist").is_dir() else None)
    if data_dir and not Path(data_dir).is_dir():
        p.error(f"--data-dir {data_dir}: no such folder (expected the Fashion-MNIST .gz files there)")
    todo = steps(out, args.dry_run, data_dir)
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s["name"] for s in todo})
        if unknown:
            p.error(f"unknown step(s) {unknown}: choose from {[s['name'] for s in todo]}")
        todo = [s for s in todo if s["name"] in wanted]
    start, rows = time.perf_counter(), []
    for i, step in enumerate(todo):
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            rows.append({"step": step["name"], "status": "not run (budget spent)", "seconds": 0.0,
                         "result": "", "log": "-"})
            continue
        print(f"[{i + 1}/{len(todo)}] {step['name']} (limit {min(step['timeout'], left):.0f} s) ...", flush=True)
        rows.append(run_step(step, out, min(step["timeout"], left)))
        print(f"    {rows[-1]['status']}, {rows[-1]['seconds']:.0f} s: {rows[-1]['result']}", flush=True)
    table = summary_table(rows, args.dry_run, time.perf_counter() - start)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(table)
    os.replace(tmp, out / "summary.md")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


# -- the probes (run as steps, in their own process) ------------------------------------------------------------
def probe_env(args) -> int:
    from minivgg import backend
    if not getattr(backend.cupy, "is_fake", False):
        try:
            subprocess.run(["nvidia-smi"], check=False, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"nvidia-smi: {e}")
    try:
        import torch
        torch_line = f"torch {torch.__version__} (CUDA {torch.version.cuda}, sees a GPU: {torch.cuda.is_available()})"
    except ImportError:
        torch_line = "torch not installed"
    print(f"python {sys.version.split()[0]}, MINIVGG_FAKE_CUPY={os.environ.get('MINIVGG_FAKE_CUPY')}, "
          f"CuPy {getattr(backend.cupy, '__version__', None)}, {torch_line}", flush=True)
    cp = backend.get_xp("gpu")
    if getattr(cp, "is_fake", False):
        print("device: the CuPy stand-in on the CPU (dry run)")
        return 0
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name}, sm_{props['major']}{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB; "
          f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver "
          f"{cp.cuda.runtime.driverGetVersion()}, NVRTC {cp.cuda.nvrtc.getVersion()}; {torch_line}")
    return 0


def probe_layout(args) -> int:
    """Each layer's output (forward) and input gradient (backward) layout in a VGG-11-BN on the GPU backend."""
    import numpy as np

    import minivgg
    from minivgg import backend
    from minivgg.models import VGG

    def layout(a) -> str:
        if a.ndim != 4:
            return f"{a.ndim}-D"
        N, C, H, W = a.shape
        item = a.dtype.itemsize
        if a.strides == (item, H * W * N * item, W * N * item, N * item):
            return "CHWN"
        return "NCHW" if a.strides == (C * H * W * item, H * W * item, W * item, item) else "other"

    backend.get_xp("gpu")
    minivgg.seed(0)
    model = VGG("vgg11_bn", num_classes=10, in_channels=1, width_ratio=8, pool_size=1, hidden=(64, 64)).to("gpu")
    rows = []
    for i, layer in enumerate(model.features):
        fwd, bwd = layer.forward, layer.backward
        name = f"{i:2d} {type(layer).__name__}"
        layer.forward = lambda x, f=fwd, n=name: (lambda y: (rows.append((n, "out", y)), y)[1])(f(x))
        layer.backward = lambda d, f=bwd, n=name: (lambda y: (rows.append((n, "dx", y)), y)[1])(f(d))
    x = backend.to_device(np.random.default_rng(0).standard_normal((args.batch, 1, 32, 32), dtype=np.float32), "gpu")
    logits = model.forward(x)
    model.backward(backend.to_device(np.ones(logits.shape, np.float32) / logits.size, "gpu"))
    backend.synchronize()
    print(f"{'layer':22s} {'what':4s} {'shape':20s} {'strides (bytes)':34s} layout")
    for name, what, a in rows:
        print(f"{name:22s} {what:4s} {str(tuple(a.shape)):20s} {str(tuple(a.strides)):34s} {layout(a)}")
    four_d = [(n, w, layout(a)) for n, w, a in rows if a.ndim == 4]
    chwn = sum(k == "CHWN" for _, _, k in four_d)
    off = sorted({f"{n.split()[1]} {w}" for n, w, k in four_d if k != "CHWN"})
    print(f"layout: {chwn} of {len(four_d)} 4-D outputs and input gradients are CHWN"
          + (f"; not CHWN: {', '.join(off)}" if off else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
