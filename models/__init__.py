"""Generative models p(x|z)p(z) as Pyro programs, installed as ``pyrovae.models``."""

if __name__ != "pyrovae.models":
    raise ImportError(f"import pyrovae.models, not {__name__!r}: this folder is installed as pyrovae.models")

from pyrovae.models.air import AIR
from pyrovae.models.conditional import CVAE, CompletionNet
from pyrovae.models.draw import DRAW
from pyrovae.models.fully_observed import MADEModel, RealNVPModel
from pyrovae.models.hierarchical import Hierarchical
from pyrovae.models.linear_gaussian import LinearGaussian
from pyrovae.models.priors import FlowPrior, StandardPrior, VampPrior
from pyrovae.models.semi_supervised import ADGM, M2
from pyrovae.models.sequential import DMM, VRNN
from pyrovae.models.vae import VAE

__all__ = ["ADGM", "AIR", "CVAE", "DMM", "DRAW", "CompletionNet", "FlowPrior", "Hierarchical", "LinearGaussian", "M2", "MADEModel", "RealNVPModel", "StandardPrior", "VAE", "VRNN", "VampPrior"]
