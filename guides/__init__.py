"""Recognition models q(z|x) as amortized Pyro guides, installed as ``pyrovae.guides``."""

if __name__ != "pyrovae.guides":
    raise ImportError(f"import pyrovae.guides, not {__name__!r}: this folder is installed as pyrovae.guides")

from pyrovae.guides.base import AmortizedGuide, build_guide
from pyrovae.guides.diagonal import DiagonalGaussian
from pyrovae.guides.exact import ExactPosterior

__all__ = ["AmortizedGuide", "DiagonalGaussian", "ExactPosterior", "build_guide"]
