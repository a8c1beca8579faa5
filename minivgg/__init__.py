"""minivgg: VGG networks from scratch in NumPy and CuPy, every backward pass by hand."""
__version__ = "0.1.0"

from . import backend, layers
from .backend import seed

__all__ = ["backend", "layers", "seed", "__version__"]
