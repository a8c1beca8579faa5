"""The convolution engines, registered once: a name for each Conv2d that computes the same thing.

"im2col" is the textbook (layers/conv.py), "im2col-fast" the tuned engine (layers/conv_fast.py).
Every engine takes Conv2d's arguments and keeps its parameters and state_dict names; a new
algorithm registers here with one line, and the tests run it against the textbook and the loop.
"""
from __future__ import annotations

from .conv import Conv2d
from .conv_fast import TunedConv2d

CONV_ENGINES = {"im2col": Conv2d, "im2col-fast": TunedConv2d}
DEFAULT_CONV_ENGINE = "im2col-fast"      # what the models build


def make_conv2d(in_channels, out_channels, kernel_size, *, algo: str = DEFAULT_CONV_ENGINE, **kwargs):
    """A Conv2d computed by the engine named `algo` (one of CONV_ENGINES)."""
    if algo not in CONV_ENGINES:
        raise ValueError(f"make_conv2d: unknown algo {algo!r}; expected one of {sorted(CONV_ENGINES)}")
    return CONV_ENGINES[algo](in_channels, out_channels, kernel_size, **kwargs)
