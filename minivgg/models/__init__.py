"""The model zoo: VGG-11/13/16/19 (plain and BatchNorm) and tools to inspect them.

vgg.py builds the networks from one configuration table; summary.py prints
a layer table with shapes, parameters and multiply-adds; draw.py renders the
architecture as a PNG; torch_interop.py (torch imported only when called)
moves weights to and from PyTorch/torchvision.
"""
from .draw import draw_architecture
from .summary import summary
from .vgg import (ARCHS, CONFIGS, MIN_IMAGE_SIZE, VGG, build_model, init_weights, vgg11, vgg11_bn,
                  vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn)

__all__ = ["VGG", "CONFIGS", "ARCHS", "MIN_IMAGE_SIZE", "build_model", "init_weights",
           "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
           "summary", "draw_architecture"]
