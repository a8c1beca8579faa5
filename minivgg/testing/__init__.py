"""Tools for testing minivgg itself: `fakecupy`, a strict CuPy stand-in that runs the GPU path on the CPU."""
