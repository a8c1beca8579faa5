"""Data for minivgg: Fashion-MNIST and image folders as uint8 arrays, augmentation, and a DataLoader.

load_dataset (datasets.py) gives a training run its train / validation / test sets by name.

Datasets load once into memory as uint8 (N, C, H, W), or stream from disk batch by batch
(StreamingImageFolder, for folders larger than memory); the DataLoader turns them into
shuffled, augmented, normalised float32 batches on the CPU or the GPU.
"""
from . import transforms
from .datasets import RunData, data_digest, files_digest, load_dataset
from .errors import DataError
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                            DatasetNotFoundError, find_fashion_mnist, load_fashion_mnist)
from .folder import ImageFolder, load_image, prepare_images
from .idx import read_idx, write_idx
from .loader import DataLoader
from .shard import ShardedLoader, shard_bounds
from .stream import LazyImages, StreamingImageFolder, sample_mean_std
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Compose, Normalize, RandomCrop,
                         RandomHorizontalFlip, RandomRotation, compute_mean_std)

__all__ = ["load_dataset", "RunData", "data_digest", "files_digest", "DataError", "load_fashion_mnist", "find_fashion_mnist", "DatasetNotFoundError", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "prepare_images", "ImageFolder", "load_image",
           "read_idx", "write_idx", "DataLoader", "ShardedLoader", "shard_bounds", "StreamingImageFolder",
           "LazyImages", "sample_mean_std", "transforms", "Compose", "Normalize",
           "RandomHorizontalFlip", "RandomCrop", "RandomRotation", "ColorJitter", "compute_mean_std",
           "IMAGENET_MEAN", "IMAGENET_STD"]
