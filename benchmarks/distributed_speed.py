"""How fast is data-parallel training on this machine: images/s and all-reduce time per step, 1 vs K ranks.

VGG-11 at 32x32 (1 channel, 10 classes, the classic head with hidden (512, 512), pool 1: the model of
train_speed.py), global batch 64, Adam. Each configuration runs in fresh processes:
  1 rank x 1 BLAS thread            the unit of work
  1 rank x K BLAS threads           the same cores as K ranks, used by threads instead
  K ranks x 1 BLAS thread (mpirun)  data parallel: each rank 64/K images, gradients all-reduced
and reports the step time (median), the wait for the slower rank before the all-reduce (a
barrier, timed apart), the time inside the gradient all-reduce, the all-reduce's share of a step, images/s and the scaling efficiency = images/s / (K x the 1-rank, 1-thread images/s).
It also measures the all-reduce alone on the gradient's size (bus bandwidth, as nccl-tests define it:
2(K-1)/K x bytes / time) and on 8 bytes (latency), the two figures the README's multi-GPU and
multi-node estimates start from. Before timing, the K ranks must hold bit-identical weights after a
step, and an all-reduce of known values must give their sum.

    PYTHONPATH=. python benchmarks/distributed_speed.py                 # 1 and 2 ranks, CPU
    PYTHONPATH=. python benchmarks/distributed_speed.py --ranks 2 --steps 10 --json out.json
    PYTHONPATH=. python benchmarks/distributed_speed.py --device gpu --ranks 8   # NCCL (GPU machine)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/distributed_speed.py` without PYTHONPATH=.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# -- one configuration, in its own process(es) ----------------------------------------------------
def sync(device: str) -> None:
    """Wait for the GPU's queued work (minivgg's only: torch is not involved here); no-op on the CPU."""
    if device != "cpu":
        from minivgg import backend
        backend.synchronize()


def worker(args) -> None:
    """Time training steps; rank 0 prints one JSON line with the medians."""
    import numpy as np
    from minivgg import backend, random_stream
    from minivgg.losses import SoftmaxCrossEntropy
    from minivgg.models import VGG
    from minivgg.optim import Adam
    from minivgg.train import skip_input_grad

    dist = None
    rank, world, device = 0, 1, args.device
    if args.distributed:
        from minivgg import distributed
        dist = distributed.init(args.device, bucket_mb=args.bucket_mb)
        dist.install_excepthook()
        rank, world, device = dist.rank, dist.world, dist.device
    random_stream.seed(0)
    model = VGG("vgg11", num_classes=10, in_channels=1, width_ratio=args.width_ratio, head="classic",
                hidden=(512, 512), pool_size=1, dropout=0.0).to(device)
    skip_input_grad(model)
    rng = np.random.default_rng(1)
    B = args.batch_size
    x_all = rng.standard_normal((B, 1, 32, 32)).astype(np.float32)                   # (B, 1, 32, 32)
    y_all = rng.integers(0, 10, B)
    from minivgg.data import shard_bounds
    a, b = shard_bounds(B, rank, world)
    x, y = backend.to_device(x_all[a:b], device), backend.to_device(y_all[a:b], device)
    loss_fn = SoftmaxCrossEntropy()
    opt = Adam(model, lr=1e-3)
    comm_times, wait_times = [], []
    if dist is not None:
        dist.broadcast_model(model)
        engine = dist.engine
        reduce = engine.allreduce_sum_

        def timed_allreduce(buf):   # the time spent inside the collective, device synchronised
            sync(device)
            t0 = time.perf_counter()
            reduce(buf)
            sync(device)
            comm_times[-1] += time.perf_counter() - t0
            return buf
        engine.allreduce_sum_ = timed_allreduce

    def step():
        comm_times.append(0.0)
        loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        if dist is not None:
            sync(device)
            t0 = time.perf_counter()
            dist.comm.Barrier()   # the wait for the slower rank, timed apart from the transfer
            wait_times.append(time.perf_counter() - t0)
            dist.allreduce_gradients(model, len(y))
        opt.step()

    # checks first: identical weights on every rank after a step, and a correct sum
    step()
    if dist is not None:
        digest = float(sum(float(backend.to_numpy(p).astype(np.float64).sum()) for _, p, _ in model.named_parameters()))
        digests = dist.comm.allgather(digest)
        if len(set(digests)) != 1:
            raise SystemExit(f"check failed: the ranks' weights differ after one step: {digests}")
        probe = backend.to_device(np.full(1000, rank + 1, dtype=np.float32), device)
        reduce(probe)
        if not np.all(backend.to_numpy(probe) == world * (world + 1) / 2):
            raise SystemExit("check failed: all-reduce of rank+1 did not give the sum 1+..+K")
    for _ in range(args.warmup - 1):
        step()
    comm_times.clear()
    wait_times.clear()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    result = {"ranks": world, "threads": int(os.environ.get("OPENBLAS_NUM_THREADS", "0") or 0),
              "device": device, "step_s": statistics.median(times), "step_times": times,
              "images_per_s": B / statistics.median(times),
              "params": int(sum(int(p.size) for _, p, _ in model.named_parameters()))}
    if dist is not None:
        result["allreduce_s"] = statistics.median(comm_times)
        result["allreduce_times"] = comm_times
        result["wait_s"], result["wait_times"] = statistics.median(wait_times), wait_times
        result["buckets_mb"] = dist._buckets.sizes_mb()
        result.update(bandwidth(dist, model, device, args.bw_repeats))
        slowest = dist.comm.allreduce(result["step_s"], op=dist.MPI.MAX)
        result["step_s_slowest_rank"] = slowest
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def bandwidth(dist, model, device, repeats) -> dict:
    """The all-reduce alone: one buffer the size of all gradients, and 8 bytes (latency)."""
    import numpy as np
    from minivgg import backend
    n = int(sum(int(p.size) for _, p, _ in model.named_parameters()))
    out = {}
    for name, size in (("grad_sized", n), ("tiny", 2)):
        buf = backend.to_device(np.ones(size, dtype=np.float32), device)
        dist.engine.allreduce_sum_(buf)   # warm-up
        ts = []
        for _ in range(repeats):
            dist.comm.Barrier()
            sync(device)
            t0 = time.perf_counter()
            dist.engine.allreduce_sum_(buf)
            sync(device)
            ts.append(time.perf_counter() - t0)
        out[f"allreduce_{name}_s"] = statistics.median(ts)
        out[f"allreduce_{name}_bytes"] = size * 4
    K = dist.world
    out["bus_bandwidth_GBps"] = 2 * (K - 1) / K * out["allreduce_grad_sized_bytes"] / out["allreduce_grad_sized_s"] / 1e9
    return out


# -- the driver ---------------------------------------------------------------------------------
def pool(rs: list) -> dict:
    """One configuration's rounds as one result: medians over all their timed steps."""
    out = dict(rs[-1])
    out["step_times"] = [t for r in rs for t in r["step_times"]]
    out["step_s"] = statistics.median(out["step_times"])
    out["images_per_s"] = rs[0]["images_per_s"] * rs[0]["step_s"] / out["step_s"]
    if "allreduce_times" in out:
        out["allreduce_times"] = [t for r in rs for t in r["allreduce_times"]]
        out["allreduce_s"] = statistics.median(out["allreduce_times"])
        out["wait_times"] = [t for r in rs for t in r["wait_times"]]
        out["wait_s"] = statistics.median(out["wait_times"])
        for key in ("allreduce_grad_sized_s", "allreduce_tiny_s"):
            out[key] = statistics.median(r[key] for r in rs)
        out["bus_bandwidth_GBps"] = statistics.median(r["bus_bandwidth_GBps"] for r in rs)
    out["rounds"] = len(rs)
    return out


def run_config(args, ranks, threads) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if threads:   # 0: the libraries' defaults (GPU runs)
        env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, HERE, "--worker", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--width-ratio", str(args.width_ratio),
           "--bw-repeats", str(args.bw_repeats), "--bucket-mb", str(args.bucket_mb)]
    if ranks > 1:
        from minivgg.distributed import mpirun_command
        cmd = mpirun_command(ranks) + cmd + ["--distributed"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="K, the data-parallel ranks to compare with 1")
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (each rank gets B/K)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one is checked)")
    p.add_argument("--width-ratio", type=int, default=1, help="divide VGG-11's conv widths (1 = the paper's)")
    p.add_argument("--device", default="cpu", help="cpu, or gpu (rank r uses gpu:r; NCCL)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size (MiB)")
    p.add_argument("--bw-repeats", type=int, default=10, help="repeats of the all-reduce-alone timings")
    p.add_argument("--rounds", type=int, default=2,
                   help="run the configurations in turn this many times and pool their steps, so a burst of "
                        "load from elsewhere on the machine does not land on one configuration only")
    p.add_argument("--timeout", type=int, default=600, help="seconds one configuration may take")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.ranks < 2:
        raise SystemExit(f"--ranks must be >= 2 (compared with 1), got {args.ranks}")
    K = args.ranks
    cpu = args.device == "cpu"
    if not cpu:   # a GPU figure must come from a GPU
        from minivgg import backend
        if getattr(backend.cupy, "is_fake", False):
            raise SystemExit("--device gpu: minivgg's GPU backend is the CuPy stand-in on the CPU "
                             "(MINIVGG_FAKE_CUPY=1), which measures no GPU speed; unset it, or use --device cpu")
        try:
            backend.get_xp(args.device)
        except RuntimeError as e:
            raise SystemExit(f"--device {args.device}: {e}")
    configs = [(1, 1), (1, K), (K, 1)] if cpu else [(1, 0), (K, 0)]
    info = common.machine_info("cpu")
    print(common.header(info, f"distributed_speed: VGG-11 @ 32x32 (width 1/{args.width_ratio}), global batch "
                              f"{args.batch_size}, Adam, {args.steps} timed steps after {args.warmup}; {args.device}"))
    load_start = os.getloadavg()
    runs = {c: [] for c in configs}
    for i in range(args.rounds):
        for ranks, threads in configs:
            print(f"round {i + 1}/{args.rounds}: {ranks} rank(s) x {threads or 'default'} thread(s) ...",
                  file=sys.stderr, flush=True)
            runs[(ranks, threads)].append(run_config(args, ranks, threads))
    results = [pool(rs) for rs in runs.values()]
    load = {"start": load_start, "end": os.getloadavg()}
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load['end']} on {os.cpu_count()} cores: "
          "other work on the machine slows every configuration")
    base = results[0]["images_per_s"]
    rows = []
    for r in results:
        cores = r["ranks"] * max(r["threads"], 1)
        eff = r["images_per_s"] / (cores * base) if cpu else r["images_per_s"] / (r["ranks"] * base)
        comm, wait = r.get("allreduce_s"), r.get("wait_s")
        rows.append([f"{r['ranks']} x {r['threads'] or '-'}", f"{r['step_s'] * 1e3:.0f}",
                     f"{wait * 1e3:.1f}" if wait is not None else "-",
                     f"{comm * 1e3:.1f}" if comm is not None else "-",
                     f"{100 * comm / r['step_s']:.1f}%" if comm is not None else "-",
                     f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / base:.2f}x", f"{100 * eff:.0f}%"])
    print(common.table(["ranks x threads", "step ms", "wait ms", "all-reduce ms", "comm share", "images/s",
                        "speed-up", "efficiency"], rows))
    dp = results[-1]
    print(f"gradients: {dp['params']:,} float32 = {dp['params'] * 4 / 2**20:.1f} MiB in buckets of "
          f"{', '.join(f'{b:.1f}' for b in dp['buckets_mb'])} MiB")
    print(f"all-reduce alone, {dp['ranks']} ranks: {dp['allreduce_grad_sized_s'] * 1e3:.1f} ms for "
          f"{dp['allreduce_grad_sized_bytes'] / 2**20:.1f} MiB (bus bandwidth {dp['bus_bandwidth_GBps']:.2f} GB/s), "
          f"{dp['allreduce_tiny_s'] * 1e6:.0f} us for 8 bytes (latency)")
    if args.json:
        common.write_json(args.json, {"benchmark": "distributed_speed", "machine": info, "args": vars(args),
                                      "command": " ".join(sys.argv), "load_average": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
