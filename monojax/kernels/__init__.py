"""monojax's CPU kernels (C++ through the XLA FFI), compiled on first use: see build.py.

  available()   compiled and registered (else one warning; callers use their pure-JAX path)
"""
from monojax.kernels.build import available

__all__ = ["available"]
