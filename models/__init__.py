"""Generative models p(x|z)p(z) as Pyro programs, installed as ``pyrovae.models``."""

if __name__ != "pyrovae.models":
    raise ImportError(f"import pyrovae.models, not {__name__!r}: this folder is installed as pyrovae.models")

from pyrovae.models.linear_gaussian import LinearGaussian
from pyrovae.models.vae import VAE

__all__ = ["LinearGaussian", "VAE"]
