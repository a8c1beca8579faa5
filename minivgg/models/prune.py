"""Channel pruning: a smaller dense VGG made from a trained one, not the same one with zeros.

Which channels go (two rules):
    'bn'  network slimming (Liu et al. 2017): train with an L1 penalty on every BatchNorm
          scale gamma (BatchNorm2d.l1_penalty), so that unneeded channels' gammas shrink
          towards 0; then drop every channel whose |gamma| falls below one global threshold,
          the `ratio` quantile of all |gamma|s of the network.
    'l1'  filter norms (Li et al. 2017), for networks without BatchNorm: a filter's
          importance is the L1 norm of its weights, sum |W[f]|, divided by the layer's mean
          so that layers of different scale compare; the same global quantile rule.
Every layer keeps at least `min_channels`.

What is rebuilt, for kept output channels O of conv i and kept channels I of the conv before:
    conv i      weight[O][:, I], bias[O]            (F', C', 3, 3), (F',)
    its BN      weight, bias, running_mean, running_var [O]
    classifier.0 (the first Linear) takes the last conv's maps flattened (c, h, w), P*P
                numbers per channel: its columns c*P*P + j for the kept c, for every j.
A dropped channel contributes nothing downstream exactly when its BN output is 0, so the
pruned network equals the unpruned one with those channels' gamma and beta set to 0
(tests/test_prune.py checks this before any fine-tuning).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..layers import BatchNorm2d, Conv2d, Linear
from .vgg import VGG

RULES = ("bn", "l1")


def _convs(model: VGG) -> list[tuple[str, Conv2d, str | None, BatchNorm2d | None]]:
    """Every conv of the trunk with its name, and the BatchNorm after it (or None) with its name."""
    layers = model.features.layers
    out = []
    for i, m in enumerate(layers):
        if isinstance(m, Conv2d):
            bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], BatchNorm2d) \
                else None
            out.append((f"features.{i}", m, f"features.{i + 1}" if bn is not None else None, bn))
    return out


def channel_scores(model: VGG, rule: str = "bn") -> list[np.ndarray]:
    """Per conv, one importance score per output channel (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"prune: rule must be one of {RULES}, got {rule!r}")
    scores = []
    for _, conv, _, bn in _convs(model):
        if rule == "bn":
            if bn is None:
                raise ValueError("prune: rule 'bn' needs a BatchNorm after every convolution; "
                                 "this VGG has none (use rule 'l1')")
            scores.append(np.abs(backend.to_numpy(bn.params["weight"])))
        else:
            w = np.abs(backend.to_numpy(conv.params["weight"])).sum(axis=(1, 2, 3))   # (F,)
            scores.append(w / w.mean())
    return scores


def select_channels(model: VGG, ratio: float, rule: str = "bn", min_channels: int = 1):
    """The kept channel indices of every conv: those scoring above the global `ratio` quantile."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune: ratio (the fraction of channels to remove) must be in [0, 1), "
                         f"got {ratio}")
    scores = channel_scores(model, rule)
    threshold = np.quantile(np.concatenate(scores), ratio) if ratio > 0 else -np.inf
    keep = []
    for s in scores:
        k = np.flatnonzero(s > threshold) if ratio > 0 else np.arange(len(s))
        if len(k) < min_channels:     # keep the best few rather than cut the network in two
            k = np.sort(np.argsort(-s, kind="stable")[:min(min_channels, len(s))])
        keep.append(k)
    return keep


def prune(model: VGG, ratio: float, rule: str = "bn", min_channels: int = 1) -> VGG:
    """A new, smaller VGG holding the kept channels' weights; `model` is left as it was."""
    if not isinstance(model, VGG):
        raise TypeError(f"prune: expected a minivgg VGG, got {type(model).__name__}")
    keep = select_channels(model, ratio, rule, min_channels)
    small = VGG(**dict(model.config, channels=[len(k) for k in keep]))
    convs = _convs(model)
    state, new = model.state_dict(), {}
    prev = np.arange(model.in_channels)                  # the kept inputs of the next conv
    for (conv_name, _, bn_name, _), k in zip(convs, keep):
        new[f"{conv_name}.weight"] = state[f"{conv_name}.weight"][k][:, prev]   # (F', C', 3, 3)
        if f"{conv_name}.bias" in state:
            new[f"{conv_name}.bias"] = state[f"{conv_name}.bias"][k]
        if bn_name is not None:
            for key in ("weight", "bias", "running_mean", "running_var"):
                new[f"{bn_name}.{key}"] = state[f"{bn_name}.{key}"][k]
            new[f"{bn_name}.num_batches_tracked"] = state[f"{bn_name}.num_batches_tracked"]
        prev = k
    first = next(name for name, m in model.modules() if isinstance(m, Linear))
    w = state[f"{first}.weight"]                                       # (H, C*P*P)
    pp = w.shape[1] // convs[-1][1].out_channels                       # P*P (1 for the gap head)
    cols = (prev[:, None] * pp + np.arange(pp)[None, :]).reshape(-1)   # (C'*P*P,)
    new[f"{first}.weight"] = w[:, cols]
    for k in state:
        if k not in new and not k.startswith("features."):
            new[k] = state[k]                                          # the rest of the head
    small.load_state_dict(new)
    small.train(model.training)
    return small


def zero_pruned_channels(model: VGG, keep) -> None:
    """In place: every dropped channel's output made 0, the equivalence's other side: gamma and
    beta of its BatchNorm set to 0, or without BatchNorm its filter and bias."""
    for (_, conv, _, bn), k in zip(_convs(model), keep):
        drop = np.setdiff1d(np.arange(conv.out_channels), k)
        for layer, keys in ((bn, ("weight", "bias")),) if bn is not None else \
                ((conv, ("weight", "bias")),):
            for key in keys:
                if layer.params.get(key) is not None:
                    layer.params[key][drop] = 0
