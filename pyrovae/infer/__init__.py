"""Inference methods: interchangeable ways to learn a model, each one file."""

from pyrovae.infer.adversarial import VAEGAN, AdversarialAE
from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import InferenceMethod, TrainSettings
from pyrovae.infer.factor_vae import FactorVAE
from pyrovae.infer.local import LocalVI
from pyrovae.infer.loop import History, train
from pyrovae.infer.map import MAP
from pyrovae.infer.mcmc_em import MCMCEM
from pyrovae.infer.wake_sleep import WakeSleep

__all__ = ["AdversarialAE", "AmortizedVI", "FactorVAE", "History", "InferenceMethod", "LocalVI", "MAP", "MCMCEM", "TrainSettings", "VAEGAN", "WakeSleep", "train"]
