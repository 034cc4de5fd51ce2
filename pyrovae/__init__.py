"""pyrovae: deep latent-variable models as Pyro programs (Kingma & Welling 2019).

Models are Pyro model functions (`pyrovae.models`), recognition models are amortized Pyro
guides (`pyrovae.guides`); any guide can be swapped onto any model with the same latent
sites, trained by an inference method on an objective, and scored by importance sampling.

The names below are imported on first use, so that `pyrovae --help` and `pyrovae list` start
without loading torch and Pyro; `__init__.pyi` gives type checkers their types.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# exported name -> the module it lives in
_EXPORTS = {
    "AmortizedVI": "pyrovae.infer", "TrainSettings": "pyrovae.infer", "train": "pyrovae.infer",
    "DATASETS": "pyrovae.registry", "GUIDES": "pyrovae.registry", "METHODS": "pyrovae.registry",
    "MODELS": "pyrovae.registry", "OBJECTIVES": "pyrovae.registry",
    "Evaluation": "pyrovae.evaluate", "evaluate": "pyrovae.evaluate",
    "ModelSites": "pyrovae.sites", "data_plate": "pyrovae.sites", "inspect_model": "pyrovae.sites",
    "PyrovaeError": "pyrovae.errors", "TrainedRun": "pyrovae.trained", "load": "pyrovae.trained",
    "build_guide": "pyrovae.guides",
}
_SUBMODULES = ("data", "guides", "models", "objectives")
# the modules whose imports fill the registries
_REGISTERING = ("pyrovae.data", "pyrovae.nets", "pyrovae.objectives", "pyrovae.infer", "pyrovae.models", "pyrovae.guides")

__all__ = [
    "AmortizedVI", "DATASETS", "Evaluation", "GUIDES", "METHODS", "MODELS", "ModelSites", "OBJECTIVES", "PyrovaeError", "TrainSettings",
    "TrainedRun", "build_guide", "data", "data_plate", "evaluate", "guides", "inspect_model", "load", "models", "objectives", "train",
]


class _Package(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if _EXPORTS.get(name) == "pyrovae.registry":
            for module in _REGISTERING:
                importlib.import_module(module)
        if name in _EXPORTS:
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
        elif name in _SUBMODULES:
            value = importlib.import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # importing the submodule pyrovae.evaluate binds it on the package; the exported
        # function of that name keeps the attribute
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package
