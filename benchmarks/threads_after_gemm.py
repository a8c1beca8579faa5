"""Do minivgg's CPU threads get a core right after a GEMM? OpenBLAS's, by default, keep spinning.

After every GEMM OpenBLAS's worker threads wait for more work by spinning (2^28 cycles unless
OPENBLAS_THREAD_TIMEOUT=n asks for 2^n), and in a training step minivgg's copies and adds come
right after a GEMM. This times one of them, conv2's col2im (VGG-11 at 32x32: 64 channels,
16x16, batch 64), right after a GEMM of conv2's size, on one thread and on minivgg's default
count, alternating, under three environments, each in a fresh process (OpenBLAS reads its
variables when NumPy loads it):
  default                    OpenBLAS as NumPy ships it
  OPENBLAS_THREAD_TIMEOUT=4  its workers spin 2^4 cycles, then sleep
  OPENBLAS_NUM_THREADS=1     no worker threads (the GEMM itself runs on one core)
Before timing, each process checks that both thread counts give the same bits.

    PYTHONPATH=. python benchmarks/threads_after_gemm.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
ENVIRONMENTS = {"default": {}, "OPENBLAS_THREAD_TIMEOUT=4": {"OPENBLAS_THREAD_TIMEOUT": "4"},
                "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"}}


def worker(repeats: int) -> dict:
    """In this process: median ms of col2im after a GEMM, on 1 thread and on the default count."""
    import numpy as np
    from minivgg.kernels import cpu, threads as pool
    N, C, H = 64, 64, 16
    rng = np.random.default_rng(0)
    A = rng.standard_normal((C * 9, 2 * C), dtype=np.float32)        # conv2's dx GEMM: (K, F) @ (F, M)
    B = rng.standard_normal((2 * C, H * H * N), dtype=np.float32)
    cols = rng.standard_normal((C * 9, H * H * N), dtype=np.float32)
    threads = {"one thread": 1, f"{pool.get_num_threads()} threads": pool.get_num_threads()}
    results = {}
    for name, n in threads.items():
        pool.set_num_threads(n)
        results[name] = cpu.col2im_cpu(cols, (N, C, H, H), 3, 3, (1, 1), (1, 1))
    first = next(iter(results.values()))
    if not all(np.array_equal(r, first) for r in results.values()):
        raise SystemExit("col2im gave different bits on different thread counts: nothing timed")
    times = {name: [] for name in threads}
    for _ in range(repeats):
        for name, n in threads.items():
            pool.set_num_threads(n)
            A @ B
            t0 = time.perf_counter()
            cpu.col2im_cpu(cols, (N, C, H, H), 3, 3, (1, 1), (1, 1))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n    PYTHONPATH")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=25, help="timed calls per thread count (median reported)")
    p.add_argument("--rounds", type=int, default=2, help="times through the three environments (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be >= 1")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.repeats)), flush=True)
        return {}
    sys.path.insert(0, ROOT)
    from benchmarks import common
    info = common.machine_info("cpu")
    print(common.header(info, "threads_after_gemm: conv2's col2im (64 channels, 16x16, batch 64) right after "
                              f"a GEMM, median of {args.repeats}, ms"))
    rows, runs = [], []
    for i in range(args.rounds):
        for label, extra in ENVIRONMENTS.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS")}
            env.update(PYTHONPATH=ROOT, **extra)
            out = subprocess.run([sys.executable, HERE, "--worker", "--repeats", str(args.repeats)], env=env,
                                 capture_output=True, text=True, timeout=600)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"the worker under {label} failed ({out.returncode}):\n{out.stderr[-2000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            runs.append({"round": i + 1, "environment": label, "ms": result})
            rows.append([i + 1, label] + [f"{v:.2f}" for v in result.values()])
    print(common.table(["round", "environment"] + list(runs[0]["ms"]), rows))
    payload = {"benchmark": "threads_after_gemm", "machine": info, "repeats": args.repeats, "runs": runs}
    if args.json:
        common.write_json(args.json, payload)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
