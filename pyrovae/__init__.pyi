# The types of the names `pyrovae/__init__.py` imports on first use.
from pyrovae import data as data
from pyrovae import guides as guides
from pyrovae import models as models
from pyrovae import objectives as objectives
from pyrovae.errors import PyrovaeError as PyrovaeError
from pyrovae.evaluate import Evaluation as Evaluation
from pyrovae.evaluate import evaluate as evaluate
from pyrovae.guides import build_guide as build_guide
from pyrovae.infer import AmortizedVI as AmortizedVI
from pyrovae.infer import TrainSettings as TrainSettings
from pyrovae.infer import train as train
from pyrovae.registry import DATASETS as DATASETS
from pyrovae.registry import GUIDES as GUIDES
from pyrovae.registry import METHODS as METHODS
from pyrovae.registry import MODELS as MODELS
from pyrovae.registry import OBJECTIVES as OBJECTIVES
from pyrovae.sites import ModelSites as ModelSites
from pyrovae.sites import data_plate as data_plate
from pyrovae.sites import inspect_model as inspect_model
from pyrovae.trained import TrainedRun as TrainedRun
from pyrovae.trained import load as load

__version__: str
__all__: list[str]
