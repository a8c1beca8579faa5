"""VGG-11/13/16/19 (Simonyan & Zisserman, configurations A, B, D, E) built from one table.

The layer indices and names follow torchvision's ``VGG``, so ``state_dict()``
keys are the same (features.0.weight ... classifier.6.bias) and weights move
between the two without renaming (see minivgg.models.torch_interop).

Notation: N batch, C channels, H W image size, K classes.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, random_stream
from ..layers import (CONV_ENGINES, AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Layer, Linear,
                      MaxPool2d, ReLU, Sequential, make_conv2d)
from ..layers.conv_engines import DEFAULT_CONV_ENGINE
from ..layers.container import chain_backward

# The paper's Table 1: a number is a 3x3 conv (padding 1) with that many
# output channels, each followed by ReLU; "M" is a 2x2 max-pool, stride 2.
CONFIGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
ARCHS: dict[str, str] = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

NUM_POOLS = 5                      # every configuration halves the image five times
MIN_IMAGE_SIZE = 2 ** NUM_POOLS    # 32: the smallest side that survives five 2x2 pools
HEADS = ("classic", "gap")
INITS = ("kaiming", "xavier")


def parse_arch(arch: str) -> tuple[str, bool]:
    """'vgg16_bn' -> ('vgg16', True); 'vgg11' -> ('vgg11', False)."""
    name = str(arch).lower()
    base, bn = (name[:-3], True) if name.endswith("_bn") else (name, False)
    if base not in ARCHS:
        choices = ", ".join(f"{a}, {a}_bn" for a in ARCHS)
        raise ValueError(f"unknown VGG architecture {arch!r}; choose one of {choices}")
    return base, bn


def make_features(cfg: list, in_channels: int = 3, batch_norm: bool = False,
                  width_ratio: int = 1, channels=None, conv_algo: str = DEFAULT_CONV_ENGINE) -> Sequential:
    """The convolutional trunk: conv3 (+BN) + ReLU per number, MaxPool2d per 'M'.

    width_ratio divides every conv channel count (d2l's small_conv_arch), so
    width_ratio=4 turns 64..512 into 16..128. channels, if given, is every
    conv's width in order (a pruned network's), in place of cfg // width_ratio.
    conv_algo names the convolution engine of every conv (one of CONV_ENGINES).
    """
    layers: list[Layer] = []
    c = in_channels
    widths = iter(channels if channels is not None else
                  [v // width_ratio for v in cfg if v != "M"])
    for v in cfg:
        if v == "M":
            layers.append(MaxPool2d(kernel_size=2, stride=2))
            continue
        f = next(widths)
        layers.append(make_conv2d(c, f, kernel_size=3, padding=1, algo=conv_algo))
        if batch_norm:
            layers.append(BatchNorm2d(f))
        layers.append(ReLU())
        c = f
    return Sequential(*layers)


def make_classifier(in_features: int, num_classes: int, hidden: tuple, dropout: float) -> Sequential:
    """Linear + ReLU + Dropout for each hidden width, then Linear to the K logits.

    With hidden=(4096, 4096) the Linear layers sit at indices 0, 3, 6: torchvision's.
    """
    layers: list[Layer] = []
    d = in_features
    for h in hidden:
        layers += [Linear(d, h), ReLU(), Dropout(dropout)]
        d = h
    layers.append(Linear(d, num_classes))
    return Sequential(*layers)


class VGG(Layer):
    """features -> avgpool -> flatten -> classifier, as torchvision's VGG.

    Shapes (classic head, 224x224 input, width_ratio=1):
        x (N, C, 224, 224) -> features (N, 512, 7, 7) -> avgpool (N, 512, P, P)
        -> flatten (N, 512*P*P) -> classifier (N, K)            P = pool_size
    The gap head pools to 1x1 instead: (N, 512, 1, 1) -> (N, 512) -> (N, K).

    Backward runs the same children in reverse; each stores its own cache, so
    dL/dx = features.backward(avgpool.backward(flatten.backward(classifier.backward(dL/dlogits)))).

    Arguments (all recorded in ``.config``, which ``build_model`` turns back into a VGG):
        arch         'vgg11' 'vgg13' 'vgg16' 'vgg19', with '_bn' for BatchNorm after every conv
        num_classes  K, the number of logits
        in_channels  1 for grayscale, 3 for RGB
        width_ratio  divides every conv channel count (the hidden widths are set by `hidden`)
        head         'classic': AdaptiveAvgPool2d(pool_size) + the Linear stack of `hidden`;
                     'gap': global average pool + Linear(C, K) (Keras' pooling='avg' + Dense)
        hidden       widths of the hidden Linear layers; None means (4096, 4096) for the
                     classic head and () for the gap head
        pool_size    the classic head's pooled side: 7 as torchvision, 1 for 32x32 inputs
        dropout      p of the Dropout after each hidden Linear
        init         'kaiming' (torchvision's) or 'xavier' (d2l's), see init_weights
        channels     every conv's width in order, overriding width_ratio (a pruned VGG's;
                     see minivgg.models.prune)
    And conv_algo, the convolution engine of every conv (one of CONV_ENGINES: 'im2col-fast'
    by default, 'winograd2', 'winograd4', 'auto', or the textbook 'im2col'). It changes how
    the convolutions are computed, not what (the results agree to rounding), so it is not part
    of .config: a checkpoint loads into a VGG of any engine.
    """

    def __init__(self, arch: str = "vgg16", num_classes: int = 1000, in_channels: int = 3,
                 width_ratio: int = 1, head: str = "classic", hidden=None, pool_size: int = 7,
                 dropout: float = 0.5, init: str = "kaiming", channels=None,
                 conv_algo: str = DEFAULT_CONV_ENGINE):
        super().__init__()
        if conv_algo not in CONV_ENGINES:
            raise ValueError(f"conv_algo must be one of {sorted(CONV_ENGINES)}, got {conv_algo!r}")
        self.conv_algo = conv_algo
        base, batch_norm = parse_arch(arch)
        _check_int("num_classes", num_classes, 1)
        _check_int("in_channels", in_channels, 1)
        _check_int("width_ratio", width_ratio, 1)
        _check_int("pool_size", pool_size, 1)
        if 64 // width_ratio < 1:
            raise ValueError(f"width_ratio={width_ratio} leaves no channels in the first block "
                             "(64 // width_ratio == 0); use a width_ratio of 64 or less")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden is None:
            hidden = (4096, 4096) if head == "classic" else ()
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive integers, got {hidden}")

        self.arch = f"{base}_bn" if batch_norm else base
        self.cfg = CONFIGS[ARCHS[base]]
        n_convs = sum(v != "M" for v in self.cfg)
        if channels is not None:
            channels = [int(c) for c in channels]
            if len(channels) != n_convs or min(channels) < 1:
                raise ValueError(f"channels must list {n_convs} positive widths, one per "
                                 f"convolution of {self.arch}, got {channels}")
        self.in_channels = int(in_channels)
        self.config = {"arch": self.arch, "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "width_ratio": int(width_ratio),
                       "head": head, "hidden": list(hidden), "pool_size": int(pool_size),
                       "dropout": float(dropout), "init": init}
        if channels is not None:
            self.config["channels"] = channels

        self.features = make_features(self.cfg, in_channels, batch_norm, width_ratio, channels, conv_algo)
        c_last = channels[-1] if channels is not None else \
            [v for v in self.cfg if v != "M"][-1] // width_ratio
        p = pool_size if head == "classic" else 1
        self.avgpool = AdaptiveAvgPool2d(p)
        self.flatten = Flatten()  # torchvision calls torch.flatten(x, 1) here: no parameters
        self.classifier = make_classifier(c_last * p * p, num_classes, hidden, dropout)
        init_weights(self, init)

    def children(self):
        return [("features", self.features), ("avgpool", self.avgpool),
                ("flatten", self.flatten), ("classifier", self.classifier)]

    # -- forward and backward --------------------------------------------------------
    def check_input_shape(self, shape) -> None:
        """Reject an input VGG cannot take, before any compute, with the fix in the message."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"{self.arch}: expected a 4-D input (N, C, H, W), got shape {shape}")
        N, C, H, W = shape
        if C != self.in_channels:
            hint = ""
            if W == self.in_channels:
                hint = " It looks like NHWC: transpose with x.transpose(0, 3, 1, 2)."
            elif self.in_channels == 3 and C == 1:
                hint = " Repeat the gray channel (channels=3 when preparing images) or build with in_channels=1."
            elif self.in_channels == 1 and C == 3:
                hint = " Convert to grayscale, or build the model with in_channels=3."
            raise ValueError(f"{self.arch}: the model was built for in_channels={self.in_channels}, "
                             f"but the input has {C} channels (shape {shape}, NCHW).{hint}")
        if H < MIN_IMAGE_SIZE or W < MIN_IMAGE_SIZE:
            raise ValueError(f"{self.arch}: input of {H}x{W} is too small: VGG halves the image "
                             f"{NUM_POOLS} times, so each side must be at least {MIN_IMAGE_SIZE} "
                             f"({H}x{W} would shrink to "
                             f"{H >> NUM_POOLS}x{W >> NUM_POOLS}). The input must be at least "
                             f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}.")

    def forward(self, x):
        if not hasattr(x, "shape"):
            raise TypeError(f"{self.arch}: expected a numpy or cupy array, got {type(x).__name__}")
        self.check_input_shape(x.shape)
        h = self.features.forward(x)          # (N, C', H/32, W/32)
        h = self.avgpool.forward(h)           # (N, C', P, P)
        h = self.flatten.forward(h)           # (N, C'*P*P)
        return self.classifier.forward(h)     # (N, K)

    def backward(self, dout):
        # classifier (N, K) -> (N, C'*P*P), flatten -> (N, C', P, P), avgpool -> (N, C', H/32, W/32),
        # features -> (N, C, H, W); chain_backward skips what no one needs (frozen blocks' dL/dW,
        # and everything below the lowest trainable layer when the images need no gradient)
        return chain_backward([self.features, self.avgpool, self.flatten, self.classifier], dout)

    def __repr__(self):
        inner = "\n".join(f"  ({n}): {m!r}".replace("\n", "\n  ") for n, m in self.children())
        return f"VGG(arch={self.arch!r},\n{inner}\n)"


def init_weights(model: Layer, scheme: str = "kaiming") -> None:
    """Fill every Conv2d, Linear and BatchNorm2d from minivgg's shared generator.

    'kaiming' (torchvision): conv W ~ N(0, 2/fan_out), fan_out = F*KH*KW
        (kaiming_normal_, mode='fan_out', relu); Linear W ~ N(0, 0.01^2).
    'xavier' (d2l): conv and Linear W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)),
        with fan_in = C*KH*KW (or in_features) and fan_out = F*KH*KW (or out_features).
    Both: biases 0, BatchNorm weight 1 and bias 0. minivgg.seed(s) makes it repeatable.
    """
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")
    rng = random_stream.get_rng()
    for _, m in model.modules():
        if isinstance(m, (Conv2d, Linear)):
            W = m.params["weight"]
            fan_in = int(np.prod(W.shape[1:]))        # C*KH*KW, or in_features
            fan_out = W.shape[0] * int(np.prod(W.shape[2:]))  # F*KH*KW, or out_features
            if scheme == "kaiming":
                std = math.sqrt(2.0 / fan_out) if isinstance(m, Conv2d) else 0.01
                new = rng.standard_normal(W.shape, dtype=np.float32)    # N(0, 1)
                new *= np.float32(std)
            else:
                a = math.sqrt(6.0 / (fan_in + fan_out))
                new = rng.random(W.shape, dtype=np.float32)             # U[0, 1)
                new *= np.float32(2 * a)
                new -= np.float32(a)
            m.params["weight"] = backend.to_device(new.astype(W.dtype, copy=False), backend.device_of(W))
            if "bias" in m.params:
                m.params["bias"][...] = 0
        elif isinstance(m, BatchNorm2d):
            m.params["weight"][...] = 1
            m.params["bias"][...] = 0


def build_model(config: dict) -> VGG:
    """Rebuild a VGG from its ``.config`` (e.g. read back from a checkpoint's JSON)."""
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(f"build_model: expected a dict with at least an 'arch' key, got {config!r}")
    allowed = {"arch", "num_classes", "in_channels", "width_ratio", "head", "hidden",
               "pool_size", "dropout", "init", "channels"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"build_model: unknown config keys {unknown}; expected some of {sorted(allowed)}")
    return VGG(**config)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# torchvision's constructor names; each takes VGG's keyword arguments.
def vgg11(**kwargs) -> VGG:
    """VGG-11, configuration A: 8 conv + 3 Linear layers."""
    return VGG("vgg11", **kwargs)


def vgg13(**kwargs) -> VGG:
    """VGG-13, configuration B: 10 conv + 3 Linear layers."""
    return VGG("vgg13", **kwargs)


def vgg16(**kwargs) -> VGG:
    """VGG-16, configuration D: 13 conv + 3 Linear layers."""
    return VGG("vgg16", **kwargs)


def vgg19(**kwargs) -> VGG:
    """VGG-19, configuration E: 16 conv + 3 Linear layers."""
    return VGG("vgg19", **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with BatchNorm2d after every conv."""
    return VGG("vgg11_bn", **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 with BatchNorm2d after every conv."""
    return VGG("vgg13_bn", **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BatchNorm2d after every conv."""
    return VGG("vgg16_bn", **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with BatchNorm2d after every conv."""
    return VGG("vgg19_bn", **kwargs)
