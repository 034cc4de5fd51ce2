"""Recognition models q(z|x) as amortized Pyro guides, installed as ``pyrovae.guides``."""

if __name__ != "pyrovae.guides":
    raise ImportError(f"import pyrovae.guides, not {__name__!r}: this folder is installed as pyrovae.guides")

from pyrovae.guides.air import AIRGuide
from pyrovae.guides.base import AmortizedGuide, build_guide
from pyrovae.guides.delta import DeltaGuide
from pyrovae.guides.diagonal import DiagonalGaussian
from pyrovae.guides.draw import DRAWGuide
from pyrovae.guides.exact import ExactPosterior
from pyrovae.guides.flows import FlowGuide, PlanarFlow, RadialFlow, SplineFlow, SylvesterFlow
from pyrovae.guides.full import FullGaussian
from pyrovae.guides.hierarchical import BottomUpGuide, TopDownGuide
from pyrovae.guides.iaf import InverseAutoregressiveFlow
from pyrovae.guides.local import LocalGaussian
from pyrovae.guides.m2 import ADGMGuide, M2Guide
from pyrovae.guides.none import NoGuide
from pyrovae.guides.sequential import DMMGuide, VRNNGuide

__all__ = [
    "AIRGuide",
    "AmortizedGuide",
    "BottomUpGuide",
    "DeltaGuide",
    "DMMGuide",
    "DRAWGuide",
    "DiagonalGaussian",
    "ExactPosterior",
    "FlowGuide",
    "FullGaussian",
    "InverseAutoregressiveFlow",
    "LocalGaussian",
    "ADGMGuide",
    "M2Guide",
    "NoGuide",
    "PlanarFlow",
    "RadialFlow",
    "SplineFlow",
    "SylvesterFlow",
    "TopDownGuide",
    "VRNNGuide",
    "build_guide",
]
