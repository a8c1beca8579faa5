"""ImageNet VGG weights as people have them, read without pickle, mapped onto minivgg's VGG.

Three files are read:
    .safetensors   read here, without torch and without pickle: an 8-byte little-endian
                   header length, a JSON header naming each tensor's dtype, shape and byte
                   range, then the raw little-endian bytes (the format's whole definition)
    .pth / .pt     torchvision's downloads, through torch.load(weights_only=True), which
                   refuses anything but tensors and plain containers; needs torch
    .npz           plain arrays (minivgg.models.torch_interop.export_npz), allow_pickle=False

Two key layouts are understood:
    torchvision    features.N.weight ... classifier.{0,3,6}.{weight,bias}: minivgg's own names
    timm           the same features, then its head stored as convolutions:
                   pre_logits.fc1 (4096, 512, 7, 7), pre_logits.fc2 (4096, 4096, 1, 1),
                   head.fc (1000, 4096). A 7x7 convolution over a 7x7 map is a Linear layer
                   over the flattened map, flattened (C, H, W) as torch.flatten does, so
                   fc1's kernel reshaped to (4096, 512*7*7) is classifier.0's weight.

The architecture is read off the weights (how many convolutions, their widths, BatchNorm or
not, the head's widths), so a file of another architecture than the one asked for is an error
that names the first layer that does not fit, before anything is copied.
"""
from __future__ import annotations

import json
import math
import os
import re
from importlib import resources

import numpy as np

from .torch_interop import load_torchvision_weights
from .vgg import ARCHS, CONFIGS, VGG

IMAGENET_SIZE = 224            # the side torchvision's VGG weights were trained at
IMAGENET_RESIZE = 256          # shorter side before the center crop (torchvision's eval transform)


def imagenet_preprocess(image) -> np.ndarray:
    """A PIL image -> the (1, 3, 224, 224) float32 batch ImageNet's VGG weights expect.

    As torchvision's evaluation transform for them: RGB; the shorter side resized to 256
    (bilinear, PIL's antialiased filter); the central 224x224 crop; scaled to [0, 1]; then
    (x - mean) / std per channel with ImageNet's mean and std.
    """
    from PIL import Image

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    image = image.convert("RGB")
    w, h = image.size
    s = IMAGENET_RESIZE / min(w, h)
    w2, h2 = max(IMAGENET_SIZE, round(w * s)), max(IMAGENET_SIZE, round(h * s))
    image = image.resize((w2, h2), Image.BILINEAR)
    left, top = (w2 - IMAGENET_SIZE) // 2, (h2 - IMAGENET_SIZE) // 2
    image = image.crop((left, top, left + IMAGENET_SIZE, top + IMAGENET_SIZE))
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)  # (3, 224, 224)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return ((x - mean) / std)[None]                                               # (1, 3, 224, 224)


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order (torchvision's spelling)."""
    text = resources.files("minivgg.models").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = text.splitlines()
    assert len(names) == 1000, "imagenet_classes.txt must hold 1000 lines"
    return names


# ---------------------------------------------------------------------------------------------
# Reading the files

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
_MAX_HEADER = 100 * 2 ** 20    # the format caps its JSON header at 100 MB


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a NumPy array (bfloat16 widened to float32).

    The arrays are views of one memory map of the file, read-only; nothing is executed.
    Raises ValueError naming the file and what is wrong (truncated, overlapping or
    mis-sized byte ranges, an unknown dtype, a header that is not JSON).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the "
                             f"8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file, or truncated: its header claims "
                             f"{n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else \
        np.zeros(0, np.uint8)
    spans, out = [], {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], \
                info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has no dtype, shape and data_offsets in "
                             f"the header: {info!r}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; minivgg reads "
                             f"{', '.join(_SAFETENSORS_DTYPES)}")
        item = np.dtype(_SAFETENSORS_DTYPES[dtype])
        want = math.prod(shape) * item.itemsize
        if not (0 <= begin <= end <= data.size) or end - begin != want:
            raise ValueError(f"{path}: tensor {name!r} {dtype}{shape} needs {want} bytes but its "
                             f"range is [{begin}, {end}) of {data.size} (truncated or corrupt)")
        spans.append((begin, end, name))
        a = data[begin:end].view(item).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return out


def read_weights(path) -> dict[str, np.ndarray]:
    """A state_dict of NumPy arrays from .safetensors, .pth/.pt (torch needed) or .npz."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz of arrays ({e})") from None
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path} is a PyTorch pickle, and reading one needs PyTorch "
                              f"(pip install torch). Without it, use the .safetensors file of "
                              f"the same weights, which minivgg reads by itself.") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
            raise ValueError(f"{path}: not a file of weights that torch.load(weights_only=True) "
                             f"accepts ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        for key in ("state_dict", "model"):   # {'state_dict': {...}} as training scripts save it
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
        return {str(k): v.detach().cpu().float().numpy() if v.dtype == torch.bfloat16
                else v.detach().cpu().numpy() for k, v in obj.items()}
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth, "
                     f".pt or .npz")


# ---------------------------------------------------------------------------------------------
# Layouts and architectures

def from_timm(state: dict) -> dict:
    """timm's vgg*.tv_in1k keys and shapes -> torchvision's (a no-op on torchvision keys).

    pre_logits.fc1.weight (H1, C, P, P) -> classifier.0.weight (H1, C*P*P)
    pre_logits.fc2.weight (H2, H1, 1, 1) -> classifier.3.weight (H2, H1)
    head.fc.*                            -> classifier.6.*
    """
    if "pre_logits.fc1.weight" not in state:
        return dict(state)
    rename = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3",
              "head.fc": "classifier.6"}
    out = {}
    for k, v in state.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in rename:
            k = f"{rename[prefix]}.{leaf}"
            if leaf == "weight" and v.ndim == 4:
                v = v.reshape(v.shape[0], -1)       # a conv over the whole map is a Linear
        out[k] = v
    return out


def _indexed(state: dict, module: str, leaf: str, ndim: int) -> list[tuple[int, np.ndarray]]:
    pat = re.compile(rf"{module}\.(\d+)\.{leaf}$")
    found = [(int(m.group(1)), v) for k, v in state.items()
             if (m := pat.match(k)) and np.ndim(v) == ndim]
    return sorted(found, key=lambda t: t[0])


def vgg_config_of(state: dict) -> dict:
    """The VGG configuration (arch, classes, channels, width, head) that a state_dict holds.

    Raises ValueError naming what does not match any of VGG-11/13/16/19 (with or without BN).
    """
    state = from_timm(state)
    convs = _indexed(state, "features", "weight", 4)
    linears = _indexed(state, "classifier", "weight", 2)
    if not convs or not linears:
        raise ValueError(f"not VGG weights: found {len(convs)} convolution kernels under "
                         f"features.N.weight and {len(linears)} Linear weights under "
                         f"classifier.N.weight (first keys: {', '.join(list(state)[:4])})")
    widths = [int(w.shape[0]) for _, w in convs]
    by_count = {sum(v != "M" for v in CONFIGS[c]): a for a, c in ARCHS.items()}
    if len(widths) not in by_count:
        raise ValueError(f"not a VGG: {len(widths)} convolutions; VGG-11/13/16/19 have "
                         f"{', '.join(map(str, sorted(by_count)))}")
    base = by_count[len(widths)]
    cfg = [v for v in CONFIGS[ARCHS[base]] if v != "M"]
    ratio = max(1, cfg[0] // widths[0])
    expect = [v // ratio for v in cfg]
    if widths != expect:
        i = next(i for i, (a, b) in enumerate(zip(widths, expect)) if a != b)
        raise ValueError(f"not a {base}: convolution {i} ({'features.%d' % convs[i][0]}) has "
                         f"{widths[i]} filters where {base} at width 1/{ratio} has {expect[i]}")
    bn = any(k.startswith("features.") and k.endswith(".running_mean") for k in state)
    first_in = int(linears[0][1].shape[1])
    pool = math.isqrt(first_in // widths[-1]) if first_in % widths[-1] == 0 else 0
    if pool < 1 or pool * pool * widths[-1] != first_in:
        raise ValueError(f"the first Linear layer takes {first_in} inputs, which is not "
                         f"{widths[-1]} channels times a square pooled map")
    return {"arch": base + ("_bn" if bn else ""), "num_classes": int(linears[-1][1].shape[0]),
            "in_channels": int(convs[0][1].shape[1]), "width_ratio": ratio, "head": "classic",
            "hidden": [int(w.shape[0]) for _, w in linears[:-1]], "pool_size": pool}


def load_pretrained(path, num_classes: int | None = None, arch: str | None = None,
                    dropout: float = 0.5) -> VGG:
    """A VGG built to fit the weights in `path`, with those weights loaded.

    arch: if given ('vgg16', 'vgg16_bn', ...), the file must hold that architecture.
    num_classes: if given and not the file's (1000 for ImageNet), the last Linear layer is
    made anew with that many outputs and left at its initialisation, for fine-tuning.
    """
    state = from_timm(read_weights(path))
    try:
        config = vgg_config_of(state)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
    if arch is not None and str(arch).lower() != config["arch"]:
        raise ValueError(f"{os.fspath(path)} holds {config['arch']} weights, not {arch}")
    skip = ()
    if num_classes is not None and int(num_classes) != config["num_classes"]:
        config["num_classes"] = int(num_classes)
        skip = (f"classifier.{_indexed(state, 'classifier', 'weight', 2)[-1][0]}.",)
    model = VGG(dropout=dropout, **config)
    load_torchvision_weights(model, state, skip=skip)   # load_state_dict casts to the model's dtype
    return model
