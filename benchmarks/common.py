"""What every benchmark shares: honest timing (warm-up, device sync, median of repeats),
the correctness check that runs before it, the machine/version header, tables and JSON.

Nothing here imports CuPy or minivgg at module level: a script first decides CUPY_TF32
(set_cupy_tf32_env), and only then imports minivgg, whose backend imports CuPy.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

# What `import minivgg` does when it comes before NumPy (minivgg/__init__.py): OpenBLAS's idle
# threads sleep at once. Set here because the scripts import this module, and so NumPy, before
# minivgg (which must come after set_cupy_tf32_env). A value already set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Devices: TF32 switches, synchronisation, a clear error when the GPU is missing
# ---------------------------------------------------------------------------------------------
def set_cupy_tf32_env(enabled: bool) -> None:
    """CuPy takes TF32 for float32 matmuls from the environment variable CUPY_TF32 (default 0).
    It reads the variable once, at its first float32 matmul, and keeps the answer for the
    rest of the process: set it before anything imports CuPy to be safe.

    Each script calls this at its top, before `import minivgg` (whose backend imports CuPy),
    with enabled = '--tf32' in sys.argv, so one flag switches TF32 for CuPy and torch alike.
    Child processes (train_speed's memory runs) inherit it through the environment.
    """
    os.environ["CUPY_TF32"] = "1" if enabled else "0"


def set_torch_tf32(enabled: bool) -> dict:
    """Switch TF32 for torch's float32 matmuls (cuBLAS) and convolutions (cuDNN); return the flags."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return {"torch.backends.cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "torch.backends.cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "torch.backends.cudnn.benchmark": bool(torch.backends.cudnn.benchmark),  # torch's default
            "CUPY_TF32": os.environ.get("CUPY_TF32", "0")}


def require_gpu() -> None:
    """Exit with a message naming what is missing when --device gpu cannot run here."""
    from minivgg import backend
    problems = []
    if getattr(backend.cupy, "is_fake", False):
        problems.append("minivgg's GPU backend is the CuPy stand-in on the CPU (MINIVGG_FAKE_CUPY=1): it "
                        "proves the code path and measures no GPU speed; unset MINIVGG_FAKE_CUPY")
    elif not backend.gpu_available():
        try:
            backend.get_xp("gpu")           # raises with the install / driver hint
            problems.append("CuPy sees no CUDA device")
        except RuntimeError as e:
            problems.append(f"minivgg: {e}")
    import torch
    if not torch.cuda.is_available():
        build = torch.version.cuda or "CPU-only"
        problems.append(f"PyTorch {torch.__version__} ({build} build) sees no CUDA device: "
                        "the reference needs a CUDA build of torch (pip install torch from the CUDA "
                        "wheel index) and a working driver (check `nvidia-smi`)")
    if problems:
        raise SystemExit("--device gpu needs CuPy and PyTorch, both on a CUDA GPU:\n  - "
                         + "\n  - ".join(problems) + "\nRun with --device cpu instead.")


def synchronize(device: str) -> None:
    """Wait for queued GPU work of both frameworks (a no-op on the CPU).

    Without it a timer measures how fast kernels are *launched*, not how fast they run.
    """
    if device == "cpu":
        return
    from minivgg import backend
    backend.synchronize()
    import torch
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call: the median over `repeats`, each the mean of `number` back-to-back calls."""
    median: float
    min: float
    max: float
    times: list = field(default_factory=list)   # one entry per repeat, seconds per call
    number: int = 1                               # calls per repeat (more for sub-millisecond work)

    @property
    def ms(self) -> float:
        return self.median * 1e3

    def to_dict(self) -> dict:
        return asdict(self)


def measure(fn, device: str = "cpu", repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> Timing:
    """Time fn(): `warmup` untimed calls, then `repeats` timed ones; report the median."""
    return measure_many({"fn": fn}, device, repeats, warmup, min_time)["fn"]


def measure_many(fns: dict, device: str = "cpu", repeats: int = 5, warmup: int = 1,
                 min_time: float = 0.0, on_round=None) -> dict:
    """Time several zero-argument callables, interleaved: name -> Timing (seconds per call).

    Each callable first gets `warmup` untimed calls. Then come `repeats` rounds, and each
    round times every callable once, so a burst of load from elsewhere on the machine
    lands on minivgg and on the reference alike instead of on whichever ran during it.
    Each timed repeat is bracketed by device synchronisations. When one call takes less
    than `min_time` seconds (small layers, GPU kernels), a repeat runs it `number` times
    back to back, number = ceil(min_time / one call), and divides, as timeit's autorange does.
    on_round(i) is called before round i (0 = the warm-up), for a progress display.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if on_round is not None:
        on_round(0)
    numbers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        numbers[name] = 1
        if min_time > 0:        # one more, warm, call tells how many make a long-enough repeat
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            one = time.perf_counter() - t0
            if one < min_time:
                numbers[name] = max(1, math.ceil(min_time / max(one, 1e-9)))
        synchronize(device)
    times = {name: [] for name in fns}
    for i in range(repeats):
        if on_round is not None:
            on_round(i + 1)
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / numbers[name])
    return {name: Timing(median=statistics.median(t), min=min(t), max=max(t), times=t, number=numbers[name])
            for name, t in times.items()}


def geomean(values) -> float:
    values = [float(v) for v in values]
    if not values or any(v <= 0 for v in values):
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---------------------------------------------------------------------------------------------
# The correctness check that gates every timing
# ---------------------------------------------------------------------------------------------
class MismatchError(AssertionError):
    """minivgg and the reference disagree: the timings would compare different computations."""


def rel_err(a, b, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor), on the host in float64: a normwise relative error,
    which unlike an elementwise one does not blow up on entries that are nearly zero. `floor`
    keeps a tensor that is all but zero (a conv bias just before BatchNorm has gradient ~0)
    from turning rounding noise into a large relative error."""
    from minivgg import backend
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else backend.to_numpy(b),
                   dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    scale = max(float(np.abs(b).max()), floor)
    diff = float(np.abs(a - b).max())
    return diff / scale if scale > 0 else diff


def check_close(pairs: dict, tol: float, what: str = "", floor: float = 0.0) -> dict:
    """pairs: name -> (minivgg array, reference array or tensor). Raises MismatchError naming
    every quantity whose rel_err exceeds tol (or whose shape differs); returns the errors."""
    errors = {name: rel_err(a, b, floor) for name, (a, b) in pairs.items()}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        detail = ", ".join(f"{k}: rel err {v:.3g}" for k, v in bad.items())
        raise MismatchError(f"{what}: minivgg disagrees with PyTorch ({detail}; tolerance {tol:g}). "
                            "Not timing a computation that gives different results.")
    return errors


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
             "openblas_get_num_threads64_", "openblas_get_num_threads", "MKL_Get_Max_Threads")
_BLAS_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads", "MKL_Set_Num_Threads")


def _numpy_blas_lib():
    """The BLAS library NumPy loaded, found in /proc/self/maps (Linux); None elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for p in sorted(paths):
        name = os.path.basename(p).lower()
        if "site-packages" in p and ("openblas" in name or "mkl_rt" in name) and "torch" not in p:
            try:
                return ctypes.CDLL(p)
            except OSError:
                continue
    return None


def numpy_blas_threads(set_to: int | None = None) -> int | None:
    """NumPy's BLAS thread count (OpenBLAS or MKL), optionally setting it first; None if unknown."""
    lib = _numpy_blas_lib()
    if lib is None:
        return None
    if set_to is not None:
        for s in _BLAS_SET:
            if hasattr(lib, s):
                getattr(lib, s)(ctypes.c_int(int(set_to)))
                break
    for s in _BLAS_GET:
        if hasattr(lib, s):
            fn = getattr(lib, s)
            fn.restype = ctypes.c_int
            return int(fn())
    return None


def set_threads(n: int | None) -> str:
    """--threads N: torch.set_num_threads(N) and the same for NumPy's BLAS, so both sides
    get the same cores. None keeps each library's default (one thread per core)."""
    import torch
    if n is None:
        return f"threads: library defaults (torch {torch.get_num_threads()}, numpy BLAS {numpy_blas_threads()})"
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    blas = numpy_blas_threads(set_to=n)
    note = f"threads: --threads {n} (torch {torch.get_num_threads()}, numpy BLAS {blas})"
    if blas is None:
        note += ("; NumPy's BLAS could not be reached, set OPENBLAS_NUM_THREADS / MKL_NUM_THREADS "
                 "before starting Python")
    return note


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name', '?')} {cfg.get('version', '')}".strip()
    except Exception:
        return "unknown"


def blas_core() -> str:
    """The kernel family NumPy's OpenBLAS runs ('Haswell', 'SkylakeX', ...), or 'unknown'.

    OpenBLAS picks it from the CPU when it loads, unless $OPENBLAS_CORETYPE pins
    one; benchmarks print it because GEMM speed depends on it (AVX2 vs AVX-512).
    """
    import ctypes
    import glob
    import os
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def machine_info(device: str = "cpu") -> dict:
    """Everything a reader needs to compare two runs: CPU, cores, library versions, threads, GPU."""
    import torch
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
        "numpy_blas": _numpy_blas(),
        "numpy_blas_threads": numpy_blas_threads(),
        "numpy_blas_core": blas_core(),
        "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE", "(unset: OpenBLAS detects the CPU)"),
        "openblas_thread_timeout_env": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "(unset: OpenBLAS's 28)"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "device": device,
    }
    if device != "cpu":
        from minivgg import backend
        cupy = backend.cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info.update({
            "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
            "gpu": name,
            "torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version(),
            "torch_gpu": torch.cuda.get_device_name(),
        })
    return info


def header(info: dict, extra: str = "") -> str:
    """The lines printed above every result: which machine, which versions."""
    lines = [f"machine: {info['cpu']}, {info['cores_usable']}/{info['cores']} cores usable, "
             f"python {info['python']}, {info['platform']}",
             f"numpy {info['numpy']} ({info['numpy_blas']}, {info['numpy_blas_core']} kernels, "
             f"OPENBLAS_CORETYPE={info['openblas_coretype_env']}, "
             f"OPENBLAS_THREAD_TIMEOUT={info.get('openblas_thread_timeout_env', '?')}, "
             f"{info['numpy_blas_threads']} BLAS threads); "
             f"torch {info['torch']} ({info['torch_threads']} threads, mkldnn={info['torch_mkldnn']})"]
    if info.get("device", "cpu") != "cpu":
        lines.append(f"gpu: {info['gpu']}; cupy {info['cupy']} (CUDA runtime {info['cuda_runtime']}, "
                     f"driver {info['cuda_driver']}); torch CUDA {info['torch_cuda']}, "
                     f"cuDNN {info['torch_cudnn']}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Progress, tables, JSON
# ---------------------------------------------------------------------------------------------
class Progress:
    """A progress bar on stderr (tqdm when installed, else one rewritten line), so stdout
    keeps only the results."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        """Announce the task about to run; call it before each timed task."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            if self.n:
                self._bar.update(1)
        else:
            end = "" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"\r[{self.n + 1}/{self.total}] {label:<60.60}{end}")
            sys.stderr.flush()
        self.n += 1

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def table(headers: list, rows: list, align: str | None = None) -> str:
    """A plain-text table; align is one character per column, 'l' or 'r' (default: first
    column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]])


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Timing):
        return o.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path: str, payload: dict) -> None:
    """Write results atomically (a temporary file, then a rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if math.isfinite(r) else "n/a"


def add_shared_options(p, checked: str = "the check") -> None:
    """The options both benchmarks take: threads, TF32, tolerance, seed, JSON output, progress."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N), and the same for NumPy's BLAS "
                        "(default: each library's default, one thread per core)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in float32 matmuls/convs on the GPU for both CuPy and torch "
                        f"(default off; {checked}'s tolerance becomes 1e-2)")
    p.add_argument("--tol", type=float, default=None, help=f"override {checked}'s tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure and the machine info here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def start_run(args, tol_fp32: float, tol_tf32: float):
    """What both benchmarks do first: check the GPU, set TF32 and threads, pick the tolerance.

    Returns (tf32 flags, threads note, tolerance).
    """
    if args.device == "gpu":
        require_gpu()
        from minivgg import backend
        backend.get_xp("gpu")
    tf32 = set_torch_tf32(args.tf32)
    threads_note = set_threads(args.threads)
    tol = args.tol if args.tol is not None else (tol_tf32 if args.tf32 else tol_fp32)
    return tf32, threads_note, tol

