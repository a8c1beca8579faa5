"""Weights to and from PyTorch: a torch twin of any minivgg VGG, and torchvision state_dicts in.

torch is only an optional oracle here, imported inside the functions that
need it: minivgg trains without it. Because VGG's layer names follow
torchvision's (features.N, avgpool, classifier.N), every mapping is one to one.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .. import backend
from ..layers import Layer
from .registry import torch_module
from .vgg import VGG

_TORCH_VGG = None  # the torch twin's class, made on first use (it subclasses torch.nn.Module)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed in the test environment
        raise ImportError("minivgg.models.torch_interop needs PyTorch (pip install torch); "
                          "minivgg itself does not") from e
    return torch


def _torch_vgg_class():
    """torchvision's VGG module without torchvision: features -> avgpool -> flatten -> classifier."""
    global _TORCH_VGG
    if _TORCH_VGG is None:
        torch = _torch()

        class TorchVGG(torch.nn.Module):
            def __init__(self, features, avgpool, classifier):
                super().__init__()
                self.features, self.avgpool, self.classifier = features, avgpool, classifier

            def forward(self, x):
                x = self.features(x)
                x = self.avgpool(x)
                x = torch.flatten(x, 1)
                return self.classifier(x)

        _TORCH_VGG = TorchVGG
    return _TORCH_VGG


def _torch_layer(layer: Layer):
    """The torch.nn module that computes what one minivgg layer computes (see registry.py)."""
    return torch_module(layer, _torch().nn, "to_torch")


def to_torch(model: Layer):
    """A torch.nn.Module twin of `model`: same structure and names, identical weights and buffers,
    the same dtype, the same train/eval mode per layer, frozen layers with requires_grad=False.

    For a VGG the twin has torchvision's attributes (features, avgpool, classifier),
    so its state_dict() loads into torchvision.models.vgg*() and back.
    """
    torch = _torch()
    if isinstance(model, VGG):
        twin = _torch_vgg_class()(_torch_layer(model.features), _torch_layer(model.avgpool),
                                  _torch_layer(model.classifier))
    else:
        twin = _torch_layer(model)
    state = {k: torch.from_numpy(np.ascontiguousarray(backend.to_numpy(v)))
             for k, v in model.state_dict().items()}
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:
        twin = twin.to(floats[0])
    twin.load_state_dict(state, strict=True)
    twin_modules = dict(twin.named_modules())
    for name, m in model.modules():
        if name in twin_modules:
            twin_modules[name].training = m.training
            for p in twin_modules[name].parameters(recurse=False):
                p.requires_grad_(not m.frozen)
    return twin


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, on any device
        return v.detach().cpu().numpy()
    return backend.to_numpy(v)


def export_npz(state_dict: Mapping, path) -> str:
    """Save a (torchvision) state_dict of tensors as an .npz that loads without torch or pickle."""
    arrays = {str(k): _as_numpy(v) for k, v in state_dict.items()}
    path = os.fspath(path)
    np.savez(path, **arrays)
    return path if path.endswith(".npz") else path + ".npz"


def load_torchvision_weights(model: Layer, src, skip=()) -> list[str]:
    """Copy a torchvision-style state_dict into `model`, name for name; returns the keys loaded.

    src: a dict of torch tensors or arrays (e.g. torchvision.models.vgg16(weights=...).state_dict()),
    or the path of an .npz made by export_npz (read with allow_pickle=False).
    skip: key prefixes left as they are, e.g. ('classifier.6',) to keep a new head with
    another number of classes when fine-tuning.
    Every key and shape is checked before anything is copied; a mismatch raises naming it.
    """
    if isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise FileNotFoundError(f"load_torchvision_weights: no file at {os.fspath(src)!r}")
        with np.load(src, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    elif isinstance(src, Mapping):
        state = {str(k): _as_numpy(v) for k, v in src.items()}
    else:
        raise TypeError(f"load_torchvision_weights: src must be a state_dict (dict of tensors) or the "
                        f"path of an .npz, got {type(src).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}

    skip = tuple(skip)
    own = model.state_dict()
    wanted = {k for k in own if not k.startswith(skip)}
    given = {k for k in state if not k.startswith(skip)}
    # Old BatchNorm checkpoints have no num_batches_tracked; torch tolerates that, and so do we.
    missing = sorted(k for k in wanted - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - wanted)
    bad_shapes = [f"{k}: source {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                  for k in sorted(wanted & given) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shapes:
        arch = getattr(model, "arch", type(model).__name__)
        lines = [f"load_torchvision_weights: the weights do not fit {arch}:"]
        if missing:
            lines.append(f"  missing from the source ({len(missing)}): {', '.join(missing[:6])}"
                         f"{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:6])}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
        if bad_shapes:
            lines.append(f"  shape mismatch ({len(bad_shapes)}): " + "; ".join(bad_shapes[:6]))
        src_bn = any(k.endswith("running_mean") for k in state)
        own_bn = any(k.endswith("running_mean") for k in own)
        if src_bn != own_bn:
            lines.append("  hint: the source " + ("has" if src_bn else "has no") + " BatchNorm layers and "
                         "the model " + ("has" if own_bn else "has none") + "; pick the matching "
                         "constructor (e.g. vgg16 vs vgg16_bn)")
        last = [k for k in own if k.startswith("classifier.") and k.endswith(".weight")]
        if last and any(s.startswith(last[-1]) for s in bad_shapes):
            lines.append(f"  hint: the last layer differs in size (another number of classes); to "
                         f"fine-tune, pass skip=('{last[-1][:-len('.weight')]}',) and train the new head")
        raise ValueError("\n".join(lines))

    merged = dict(own)
    merged.update({k: state[k] for k in wanted & given})
    model.load_state_dict(merged)
    return sorted(wanted & given)
