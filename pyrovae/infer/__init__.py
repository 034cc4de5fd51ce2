"""Inference methods: interchangeable ways to learn a model, each one file."""

from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import InferenceMethod, TrainSettings
from pyrovae.infer.loop import History, train

__all__ = ["AmortizedVI", "History", "InferenceMethod", "TrainSettings", "train"]
