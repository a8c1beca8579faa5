"""The convolution engines, registered once: a name for each Conv2d that computes the same thing.

"im2col" is the textbook (layers/conv.py), "im2col-fast" the tuned engine (layers/conv_fast.py),
"winograd2" / "winograd4" Winograd's F(2x2, 3x3) / F(4x4, 3x3) (layers/conv_winograd.py), and
"auto" picks one of those per layer by a rule from its shapes (AutoConv2d.algorithm).
Every engine takes Conv2d's arguments and keeps its parameters and state_dict names; a new
algorithm registers here with one line, and the tests run it against the textbook and the loop.
"""
from __future__ import annotations

from .conv import Conv2d
from .conv_fast import TunedConv2d
from .conv_winograd import AutoConv2d, Winograd4Conv2d, WinogradConv2d

CONV_ENGINES = {"im2col": Conv2d, "im2col-fast": TunedConv2d, "winograd2": WinogradConv2d,
                "winograd4": Winograd4Conv2d, "auto": AutoConv2d}
DEFAULT_CONV_ENGINE = "im2col-fast"      # what the models build


def make_conv2d(in_channels, out_channels, kernel_size, *, algo: str = DEFAULT_CONV_ENGINE, **kwargs):
    """A Conv2d computed by the engine named `algo` (one of CONV_ENGINES)."""
    if algo not in CONV_ENGINES:
        raise ValueError(f"make_conv2d: unknown algo {algo!r}; expected one of {sorted(CONV_ENGINES)}")
    return CONV_ENGINES[algo](in_channels, out_channels, kernel_size, **kwargs)
