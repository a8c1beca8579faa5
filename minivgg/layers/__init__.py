"""The layer library: each layer's forward and backward on one screen.

Reading order for learners: base (the contract), linear, activation, conv
(im2col + GEMM beside a loop reference; conv_fast is the tuned engine), pool, norm, container; then
minivgg/losses.py and minivgg/gradcheck.py.
"""
from ..losses import SoftmaxCrossEntropy
from .activation import Dropout, ReLU
from .base import Layer
from .container import Sequential
from .conv import Conv2d, conv2d_naive, conv2d_naive_backward
from .conv_engines import CONV_ENGINES, make_conv2d
from .conv_fast import TunedConv2d
from .linear import Flatten, Linear
from .norm import BatchNorm2d, batchnorm2d_reference
from .pool import AdaptiveAvgPool2d, MaxPool2d, maxpool2d_naive

__all__ = ["Layer", "Conv2d", "TunedConv2d", "CONV_ENGINES", "make_conv2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Linear", "Flatten",
           "Dropout", "BatchNorm2d", "Sequential", "SoftmaxCrossEntropy",
           "conv2d_naive", "conv2d_naive_backward", "maxpool2d_naive", "batchnorm2d_reference"]
