"""Shared by the deployment tests (ONNX export, HTTP server): a small model with non-trivial BatchNorm
statistics, saved as a checkpoint carrying the preprocessing that train_vgg11.py records."""
import numpy as np

import minivgg
from minivgg.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from minivgg.models import VGG
from minivgg.train import save_checkpoint


def small_model(arch="vgg11_bn", seed=0, **kw):
    """A width-1/16 VGG whose BatchNorm layers hold random statistics, so eval-mode BN is not an identity."""
    minivgg.seed(seed)
    kw = {"width_ratio": 16, "num_classes": 10, "hidden": (16,), "pool_size": 1, **kw}
    model = VGG(arch, **kw)
    rng = np.random.default_rng(seed + 100)
    for _, m in model.modules():
        if "running_mean" in m.buffers:
            C = m.buffers["running_mean"].shape
            m.buffers["running_mean"] = rng.normal(0, 0.2, C).astype(np.float32)     # (C,)
            m.buffers["running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)   # (C,)
            m.params["weight"][...] = rng.uniform(0.5, 1.5, C).astype(np.float32)
            m.params["bias"][...] = rng.normal(0, 0.1, C).astype(np.float32)
    return model.eval()


def fashion_checkpoint(path, arch="vgg11_bn", image_size=32, **kw):
    """A checkpoint of a grayscale Fashion-MNIST model at image_size, with the extra train_vgg11.py writes."""
    model = small_model(arch, in_channels=1, **kw)
    extra = {"image_size": [image_size, image_size], "channels": 1, "class_names": list(FASHION_MNIST_CLASSES),
             "normalize": {"mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)}}
    return save_checkpoint(path, model, extra=extra), model
