"""CuPy's own compiler on minivgg's kernels, without a GPU: NVRTC through cupy.RawModule, as a GPU run would.

NVRTC needs no GPU, and `import cupy` needs no driver (CuPy 14 loads libcuda only when a device is
first touched), so on a CPU machine with the `cuda13` extra installed this file builds kernels.cu
through the real `cupy.RawModule`, with exactly the code, options and name expressions that
minivgg/kernels/gpu.py hands it, and CuPy's own additions (its include paths, -ftz=true,
--device-as-default-execution-space, the -arch it derives). Only two driver calls are replaced:
the device query that picks the architecture (`cupy.cuda.compiler._get_arch`, and the per-device
memo around CuPy's module cache) and the module load (`Module.load`, which keeps the image instead
of handing it to cuModuleLoadData). It compiles for sm_80 (A100), sm_90 (H100/H200) and PTX, then
checks what the driver would otherwise only find at run time:
  * every name gpu.py looks up is a kernel entry of each image (ELF symbols of the cubins,
    `.entry` lines of the PTX), under the lowered name NVRTC reports;
  * every launch gpu.py makes, recorded by running its launchers on a shape-only stand-in
    (float16/32/64 and VGG-16's largest 224x224 batch-128 layer), passes arguments that match the
    compiled parameters: each scalar typed as CuPy's own CScalar types it (a Python int is 8 bytes,
    a Python float a double) against the `.param` size in the PTX and the C type in the source,
    each array as an 8-byte pointer to C-contiguous memory of the kernel's element type, every
    scalar within its C type, the grid and block within CUDA's limits.
Planted faults (a compile error, a lost `extern "C"`, a Python int for an `int`, an int64 argmax)
show each check fails. Without CuPy this file skips, saying so; `.ci/run` installs the `cuda13`
extra, as the README tells users to, and sets MINIVGG_REQUIRE_CUPY=1, under which a missing CuPy
fails instead of skipping. The last test (the kernel cache) runs on the GPU backend, not NVRTC.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import struct
import types
from pathlib import Path

import numpy as np
import pytest

from minivgg import backend
from minivgg.kernels import gpu

try:   # the real CuPy (minivgg's stand-in is minivgg.testing.fakecupy, never importable as `cupy`)
    import cupy as real_cupy
    import cupy._core.core as cupy_core
    import cupy._core.raw as cupy_raw
    import cupy.cuda.compiler as cupy_compiler
    from cupy._core._scalar import CScalar
    from cupy.cuda import function as cupy_function
    CUPY_ERROR = None
except Exception as e:   # not installed, or a build that cannot load
    real_cupy, CUPY_ERROR = None, e

if real_cupy is None and os.environ.get("MINIVGG_REQUIRE_CUPY") == "1":
    raise RuntimeError(f"MINIVGG_REQUIRE_CUPY=1 but CuPy does not import ({CUPY_ERROR}): "
                       "pip install -e '.[cuda13]' (the README's GPU install)")
needs_cupy = pytest.mark.skipif(real_cupy is None, reason=f"CuPy is not installed ({CUPY_ERROR}); "
                                "pip install -e '.[cuda13]' to compile the kernels with NVRTC")
TARGETS = ["sm_80", "sm_90", "ptx"]

# The C types kernels.cu declares, as NumPy dtypes (a kernel with another type: teach it here).
C_TYPES = {"__half": np.float16, "float": np.float32, "double": np.float64, "int": np.int32,
           "unsigned int": np.uint32, "long long": np.int64, "unsigned long long": np.uint64}
PTX_SIZES = {"8": 1, "16": 2, "32": 4, "64": 8}


# -- gpu.py's launches, recorded on a shape-only array module ---------------------------------------------
class ShapeArray:
    """A device array's shape, dtype and strides, and no memory (VGG-16 sizes cost nothing)."""

    def __init__(self, shape, dtype, strides=None):
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.strides = tuple(strides) if strides is not None else self._c_strides()

    def _c_strides(self):
        strides, step = [], self.dtype.itemsize
        for s in reversed(self.shape):
            strides.insert(0, step)
            step *= s
        return tuple(strides)

    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    ndim = property(lambda self: len(self.shape))
    itemsize = property(lambda self: self.dtype.itemsize)
    c_contiguous = property(lambda self: self.strides == self._c_strides()
                            or self.size <= 1)

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = axes or tuple(reversed(range(self.ndim)))
        return ShapeArray([self.shape[a] for a in axes], self.dtype, [self.strides[a] for a in axes])

    def astype(self, dtype, copy=True):
        same = np.dtype(dtype) == self.dtype
        return self if same and not copy else ShapeArray(self.shape, dtype)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        assert self.c_contiguous, "reshape of a non-contiguous array: the recorder cannot tell the copy"
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        shape = [self.size // known if d == -1 else d for d in shape]
        assert int(np.prod(shape, dtype=np.int64)) == self.size, f"cannot reshape {self.shape} into {shape}"
        return ShapeArray(shape, self.dtype)


class Recorder(types.SimpleNamespace):
    """Stands in for `cupy` inside gpu.py: records the RawModule gpu.py asks for and every launch."""

    def __init__(self):
        super().__init__(float16=np.float16, float32=np.float32, float64=np.float64, int32=np.int32,
                         int64=np.int64, request=None, launches=[])
        recorder = self

        class RawModule:
            def __init__(self, **kwargs):
                assert recorder.request is None, "gpu.py compiled its module twice"
                recorder.request = kwargs

            def get_function(self, name):
                def launch(grid, block, args, **kwargs):
                    recorder.launches.append((name, grid, block, args))
                return launch
        self.RawModule = RawModule

    def __getattr__(self, name):
        raise AttributeError(f"gpu.py calls cupy.{name}, which the launch recorder of tests/test_cuda_compile.py "
                             "does not have yet: add it to Recorder (shapes and dtypes only)")

    @staticmethod
    def empty(shape, dtype=np.float64, order="C"):
        assert order == "C", "the recorder makes C-order arrays only"
        return ShapeArray(shape if isinstance(shape, tuple) else (shape,), dtype)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        return a if a.c_contiguous and dtype is None else ShapeArray(a.shape, dtype or a.dtype)


SMALL = dict(N=2, C=3, H=7, W=6)
VGG16 = dict(N=128, C=64, H=224, W=224)   # conv1_2 of VGG-16 at 224x224, batch 128: the largest maps


def drive(g, cp, dtype, N, C, H, W):
    """Every launcher of gpu.py: a 3x3 pad-1 convolution's im2col/col2im and its Winograd F(4x4,3x3) tiles, a 2x2 max-pool."""
    x = cp.empty((N, C, H, W), dtype)
    cols = g.im2col_gpu(x, 3, 3, (1, 1), (1, 1))
    g.col2im_gpu(cols, x.shape, 3, 3, (1, 1), (1, 1))
    out, argmax = g.maxpool_forward_gpu(x, 2, 2, (2, 2), (0, 0))
    g.maxpool_backward_gpu(out, argmax, x.shape, 2, 2, (2, 2), (0, 0))
    g.uniform_gpu((N, C * H * W), seed=2**63 + 5, offset=2**40)
    m, a = 4, 6                     # Winograd F(4x4, 3x3): 6x6 input tiles, 4x4 output tiles
    tiles = (-(-H // m), -(-W // m))
    V = g.winograd_tiles_gpu(x, cp.empty((a, a), np.float64), m, (1, 1), tiles)    # (a*a, C, P): B^T d B
    Y = cp.empty((m * m, C, tiles[0] * tiles[1] * N), dtype)
    g.winograd_untile_gpu(Y, m, m, (0, 0), (N, C, H, W), tiles, cp.empty(C, dtype))    # forward: + bias
    g.winograd_untile_gpu(V, a, m, (1, 1), (N, C, H, W), tiles)                        # backward: dx


def record(g, monkeypatch):
    """(what gpu.py asks cupy.RawModule for, [(kernel name, grid, block, args) of every launch])."""
    cp = Recorder()
    monkeypatch.setattr(g, "cp", cp)
    monkeypatch.setattr(g, "_module", None)
    monkeypatch.setattr(g, "_functions", {}, raising=False)
    for dtype in (np.float16, np.float32, np.float64):
        drive(g, cp, dtype, **SMALL)
    drive(g, cp, np.float32, **VGG16)
    assert cp.request is not None, "gpu.py launched nothing"
    return cp.request, cp.launches


# -- CuPy's compiler, with the two driver calls replaced ----------------------------------------------------
@contextlib.contextmanager
def cupy_without_a_driver(monkeypatch, target):
    """CuPy's compile path as it runs on a GPU of `target` ('sm_80', 'sm_90', 'ptx'), minus the driver."""

    class KeptModule(cupy_function.Module):   # the module load: keep the image, call no driver
        def load(self, image):
            self.image = bytes(image)

    with monkeypatch.context() as m:
        m.setenv("CUPY_CACHE_IN_MEMORY", "1")                       # compile every time, write nothing
        m.setattr(cupy_compiler, "function", types.SimpleNamespace(Module=KeptModule))
        m.setattr(cupy_compiler, "_get_arch", lambda: "90" if target == "sm_90" else "80")
        m.setattr(cupy_compiler, "_use_ptx", target == "ptx")       # CuPy's CUPY_COMPILE_WITH_PTX switch
        # CuPy memoizes these per device (runtime.getDevice, a driver call); unwrapped, they run as written
        m.setattr(cupy_compiler, "_get_arch_for_options_for_nvrtc",
                  cupy_compiler._get_arch_for_options_for_nvrtc.__wrapped__)
        m.setattr(cupy_raw, "_get_raw_module", cupy_raw._get_raw_module.__wrapped__)
        yield KeptModule


def compile_with_cupy(request, target, monkeypatch):
    """The image CuPy would load for `target` and NVRTC's lowered names, from gpu.py's own request."""
    with cupy_without_a_driver(monkeypatch, target) as KeptModule:
        module = real_cupy.RawModule(**request).module
    assert isinstance(module, KeptModule)
    return module.image, dict(module.mapping or {})


def elf_entries(image: bytes) -> set:
    """Kernel entry points of a cubin: ELF64 function symbols flagged STO_CUDA_ENTRY (0x10)."""
    assert image[:4] == b"\x7fELF" and image[4] == 2, "not an ELF64 cubin"
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    entries = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in headers:
        if sh_type != 2:   # SHT_SYMTAB
            continue
        strtab = headers[link][4]
        for at in range(offset, offset + size, entsize):
            name, info, other = struct.unpack_from("<IBB", image, at)
            if info & 0xF == 2 and other & 0x10:   # STT_FUNC, STO_CUDA_ENTRY
                entries.add(image[strtab + name:image.index(b"\0", strtab + name)].decode())
    return entries


def ptx_params(ptx: str) -> dict:
    """{entry name: [size in bytes of each parameter]} from a PTX module's `.entry` declarations."""
    out = {}
    for name, params in re.findall(r"\.entry\s+([\w$]+)\s*\(([^)]*)\)", ptx):
        sizes = []
        for width, count in re.findall(r"\.param\s+(?:\.align\s+\d+\s+)?\.[busf](\d+)\s+[\w$]+(?:\[(\d+)\])?",
                                       params):
            sizes.append(PTX_SIZES[width] * int(count or 1))
        out[name] = sizes
    return out


def source_params(code: str, expression: str) -> list:
    """[(C type, is a pointer)] of kernel `expression` ('im2col<float>' or 'uniform'), read from the source."""
    kernel, _, targ = expression.partition("<")
    found = re.findall(rf"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?{kernel}\s*\(([^)]*)\)", code)
    assert len(found) == 1, f"{kernel}: {len(found)} __global__ definitions in the source"
    params = []
    for decl in found[0].split(","):
        words = decl.replace("*", " * ").split()
        pointer = "*" in words
        ctype = " ".join(w for w in words[:-1] if w not in ("const", "*", "__restrict__"))
        params.append((targ.rstrip(">") if ctype == "T" else ctype, pointer))
    return params


def check(request, launches, images):
    """Every problem found, one line each ([] when gpu.py's launches match what NVRTC built)."""
    problems = []
    code, names = request["code"], list(request.get("name_expressions") or [])
    for target, (image, mapping) in images.items():
        entries = set(ptx_params(image.decode())) if target == "ptx" else elf_entries(image)
        for looked_up in sorted(set(names) | {name for name, *_ in launches}):
            if mapping.get(looked_up, looked_up) not in entries:
                problems.append(f"{target}: {looked_up!r} (as {mapping.get(looked_up, looked_up)!r}) is not a "
                                f"kernel entry of the image (a lost extern \"C\"?); entries: {sorted(entries)}")
    ptx, mapping = images["ptx"]
    compiled = ptx_params(ptx.decode())
    for name, grid, block, args in launches:
        where = f"{name} (grid {grid}, block {block})"
        sizes = compiled.get(mapping.get(name, name))
        if sizes is None:
            continue   # reported above
        declared = source_params(code, name)
        if len(args) != len(sizes) or len(declared) != len(sizes):
            problems.append(f"{where}: {len(args)} arguments for {len(sizes)} compiled parameters "
                            f"({len(declared)} in the source)")
            continue
        if not (np.prod(block) <= 1024 and 1 <= grid[0] <= 2**31 - 1):
            problems.append(f"{where}: outside CUDA's launch limits")
        for i, (a, size, (ctype, pointer)) in enumerate(zip(args, sizes, declared)):
            assert ctype in C_TYPES, f"{name} parameter {i} is a {ctype}: add its NumPy dtype to C_TYPES"
            want = np.dtype(C_TYPES[ctype])
            if pointer:
                if not isinstance(a, ShapeArray):
                    problems.append(f"{where} argument {i}: a {type(a).__name__} where the kernel takes {ctype}*")
                elif size != 8 or a.dtype != want or not a.c_contiguous:
                    problems.append(f"{where} argument {i}: a {a.dtype} array (strides {a.strides}) where the "
                                    f"kernel reads C-contiguous {ctype} ({want}), through a {size}-byte parameter")
                continue
            if isinstance(a, ShapeArray):
                problems.append(f"{where} argument {i}: an array where the kernel takes a {ctype}")
                continue
            passed = CScalar(a).dtype   # how CuPy will put it in the argument buffer
            if passed.itemsize != size or passed != want:
                problems.append(f"{where} argument {i}: CuPy passes this {type(a).__name__} as {passed} "
                                f"({passed.itemsize} bytes) into a {size}-byte {ctype} parameter")
            elif want.kind in "iu" and not np.iinfo(want).min <= int(a) <= np.iinfo(want).max:
                problems.append(f"{where} argument {i}: {int(a)} does not fit {ctype}")
    return problems


def compile_all(request, monkeypatch):
    return {target: compile_with_cupy(request, target, monkeypatch) for target in TARGETS}


# -- the tests ------------------------------------------------------------------------------------------------
@needs_cupy
def test_the_extra_brings_nvrtc_cublas_and_the_runtime_headers(monkeypatch):
    """What cupy-cuda1Nx alone lacks (CuPy 14 requires only numpy and cuda-pathfinder): NVRTC, cuBLAS
    (every matmul) and the CUDA runtime headers, which CuPy's own elementwise and reduction kernels
    include (minivgg's ReLU, BatchNorm, loss and optimizers are those)."""
    from cuda.pathfinder import find_nvidia_header_directory, load_nvidia_dynamic_lib
    from cupy.cuda import cublas, nvrtc
    assert nvrtc.getVersion() >= (12, 0) and cublas.getVersion is not None
    # from pip's wheels, not from a CUDA toolkit this machine happens to have
    wheels = {str(f.locate().resolve().parent) for d in importlib.metadata.distributions() for f in d.files or ()
              if f.name in ("cuda_fp16.h", "libnvrtc.so.12", "libnvrtc.so.13")}
    assert str(Path(find_nvidia_header_directory("cudart")).resolve()) in wheels, "CUDA headers not from a wheel"
    assert str(Path(load_nvidia_dynamic_lib("nvrtc").abs_path).resolve().parent) in wheels, "NVRTC not from a wheel"
    source = ('#include <cupy/float16.cuh>\n'      # what CuPy adds for float16 arrays (the AMP path)
              'extern "C" __global__ void relu(CArray<float16, 1> x, CArray<float16, 1> y, complex<float> z) '
              '{ y[0] = x[0] > float16(0.0f) ? x[0] : float16(z.real()); }')
    with cupy_without_a_driver(monkeypatch, "sm_80"):
        module = cupy_core.compile_with_cache(source)      # with CuPy's header prelude, as its kernels are
    assert "relu" in elf_entries(module.image)


NCCL = [d.metadata["Name"] for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").startswith("nvidia-nccl-cu")]


@pytest.mark.skipif(real_cupy is None or not (NCCL or os.environ.get("MINIVGG_REQUIRE_CUPY") == "1"),
                    reason="CuPy or the nccl12/nccl13 extra is not installed")
def test_the_nccl_extra_gives_cupy_nccl():
    from cupy.cuda import nccl
    assert nccl.available, f"cupy.cuda.nccl finds no NCCL library (installed: {NCCL})"


@needs_cupy
def test_cupy_builds_every_kernel_and_every_launch_matches_it(monkeypatch):
    request, launches = record(gpu, monkeypatch)
    assert request["code"] == gpu.SOURCE.read_text() and request["options"] == ("-std=c++17",)
    images = compile_all(request, monkeypatch)
    assert images["sm_80"][0] != images["sm_90"][0]
    assert b".target sm_80" in images["ptx"][0]
    assert check(request, launches, images) == []
    launched = {name for name, *_ in launches}
    assert launched == set(request["name_expressions"]) | {"uniform"}, \
        "a kernel gpu.py can look up is not driven here: add its launcher to drive()"
    big = [a for _, _, _, args in launches for a in args if isinstance(a, ShapeArray) and a.size > 2**31]
    assert big, "the VGG-16 layer no longer passes a buffer over 2^31 elements: the test lost its large case"


@needs_cupy
def test_a_compile_error_fails(monkeypatch):
    request, _ = record(gpu, monkeypatch)
    request = dict(request, code=request["code"].replace("const int b  = t % N;   t /= N;",
                                                         "const int b  = t % N    t /= N;", 1))
    assert request["code"] != gpu.SOURCE.read_text(), "the planted error no longer applies"
    with pytest.raises(cupy_compiler.CompileException, match="expected"):
        compile_with_cupy(request, "sm_80", monkeypatch)


@needs_cupy
def test_a_missing_extern_c_fails(monkeypatch):
    request, launches = record(gpu, monkeypatch)
    code = request["code"]
    assert code.count('extern "C" __global__ void uniform') == 1, "the planted fault no longer applies"
    request = dict(request, code=code.replace('extern "C" __global__ void uniform', '__global__ void uniform'))
    problems = check(request, launches, compile_all(request, monkeypatch))
    assert problems and all("'uniform'" in p and "not a kernel entry" in p for p in problems)


@needs_cupy
def test_a_python_int_for_an_int_parameter_fails(monkeypatch):
    monkeypatch.setattr(gpu, "_i32", lambda *values: tuple(int(v) for v in values))
    request, launches = record(gpu, monkeypatch)
    problems = check(request, launches, compile_all(request, monkeypatch))
    assert problems and all("CuPy passes this int as int64 (8 bytes) into a 4-byte int parameter" in p
                            for p in problems)


@needs_cupy
def test_an_int64_argmax_fails(monkeypatch, tmp_path):
    """A copy of gpu.py whose max-pool makes its argmax int64: the kernel reads int (4 bytes)."""
    text = gpu.SOURCE.with_name("gpu.py").read_text()
    planted = "argmax = cp.empty((C, OH, OW, N), dtype=cp.int32)"
    assert text.count(planted) == 1, "the planted fault no longer applies: update it with gpu.py"
    (tmp_path / "gpu.py").write_text(text.replace(planted, planted.replace("int32", "int64")))
    shutil.copy(gpu.SOURCE, tmp_path / gpu.SOURCE.name)
    spec = importlib.util.spec_from_file_location("minivgg.kernels._planted_gpu", tmp_path / "gpu.py")
    planted_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted_gpu)
    request, launches = record(planted_gpu, monkeypatch)
    problems = check(request, launches, compile_all(request, monkeypatch))
    assert problems and all("maxpool_forward" in p and "int64 array" in p and "reads C-contiguous int" in p
                            for p in problems)


@pytest.mark.skipif(not backend.gpu_available(), reason="no GPU backend (CuPy or its stand-in)")
def test_each_kernel_is_looked_up_once(monkeypatch):
    """gpu.py keeps its RawKernels: CuPy's get_function makes a new one (and a driver call) each time."""
    backend.get_xp("gpu")
    calls = []

    class Counting:
        def __init__(self, module):
            self.module = module

        def get_function(self, name):
            calls.append(name)
            return self.module.get_function(name)

    monkeypatch.setattr(gpu, "_module", Counting(backend.cupy.RawModule(
        code=gpu.SOURCE.read_text(), options=("-std=c++17",), name_expressions=gpu.NAME_EXPRESSIONS)))
    x = backend.to_device(np.ones((2, 3, 4, 4), np.float32), "gpu")
    for _ in range(3):
        gpu.im2col_gpu(x, 3, 3, (1, 1), (1, 1))
        gpu.uniform_gpu((5,), 0, 0)
    assert sorted(calls) == ["im2col<float>", "uniform"]
