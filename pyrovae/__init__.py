"""pyrovae: deep latent-variable models as Pyro programs (Kingma & Welling 2019).

Models are Pyro model functions (`pyrovae.models`), recognition models are amortized Pyro
guides (`pyrovae.guides`); any guide can be swapped onto any model with the same latent
sites, trained by an inference method on an objective, and scored by importance sampling.
"""

__version__ = "0.1.0"

from pyrovae import data, guides, models, objectives
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import Evaluation, evaluate
from pyrovae.guides import build_guide
from pyrovae.infer import AmortizedVI, TrainSettings, train
from pyrovae.registry import DATASETS, GUIDES, METHODS, MODELS, OBJECTIVES
from pyrovae.sites import ModelSites, data_plate, inspect_model
from pyrovae.trained import TrainedRun, load

__all__ = [
    "AmortizedVI", "DATASETS", "Evaluation", "GUIDES", "METHODS", "MODELS", "ModelSites", "OBJECTIVES",
    "PyrovaeError", "TrainSettings", "TrainedRun", "build_guide", "data", "data_plate", "evaluate", "guides", "inspect_model",
    "load", "models", "objectives", "train",
]
