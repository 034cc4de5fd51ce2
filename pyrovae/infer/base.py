"""The interface every inference method shares: one minibatch step, and its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.batch import Data, as_batch
from pyrovae.errors import PyrovaeError
from pyrovae.programs import ProgramParameters, check_complete, program_modules, unique
from pyrovae.protocols import guide_traits
from pyrovae.sites import DATA_PLATE, ModelSites, call_kwargs, direct_parameters, inspect_model

__all__ = ["InferenceMethod", "TrainSettings", "adam", "unique_parameters"]


@dataclass(frozen=True)
class TrainSettings:
    """What every method is trained with; the objective is a choice apart from the method."""

    objective: str = "elbo"
    particles: int = 1
    lr: float = 1e-3
    batch_size: int = 100
    max_plate_nesting: int = 1
    free_bits: float = 0.0
    capture: bool = True  # replay the loss from a captured graph where it can (pyrovae.capture)
    plate: str | None = None  # the per-example plate; None: "data", else the one sized like the data
    labelled_per_batch: int = 0  # > 0: stratified minibatches of that many labelled examples (`pyrovae.data.stratified_minibatches`)
    objective_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the objective's own (tcvae's beta)


class InferenceMethod:
    """Learns a model (and, where it has one, a guide) from minibatches of a data set.

    Model and guide are Pyro programs of any form (`pyrovae.programs`). Subclasses implement
    `step` and `add_parameters`; `prepare` (run by the first `step`, and by `train` before a
    checkpoint is written or read) traces both programs once to find the parameters they keep
    in Pyro's param store. `state_dict`/`load_state_dict` cover every module, store entry and
    optimizer so that a resumed run continues exactly.
    """

    name: ClassVar[str] = ""
    gives_elbo: ClassVar[bool] = True
    trains_guide: ClassVar[bool] = True  # leaves an amortized guide that can score held-out data
    trains_baselines: ClassVar[bool] = False  # fits the guide's score-function baselines (amortized VI's elbo-graph)
    objective: Any = None  # the bound it ascends, where it has one (`pyrovae.objectives`)
    checks_guide: ClassVar[bool] = True  # the guide given is the one trained and scored: it must serve the model
    own_objectives: ClassVar[bool] = False  # trains on objectives of its own (MAP, wake-sleep, MCMC-EM), not the settings' bound
    scores_groups: ClassVar[bool] = False  # scores a batch's labelled and unlabelled examples as calls apart (`pyrovae.batch.Batch.groups`)
    # objectives that reshape the bound (not a bound on log p(x)): a method of its own objectives would drop that silently
    SHAPED_OBJECTIVES: ClassVar[tuple[str, ...]] = ("tcvae", "dip-vae")

    def __init__(self, model: Callable, guide: Callable, settings: TrainSettings, num_examples: int, *, sites: ModelSites | None = None) -> None:
        """`sites`: the model's sites (`pyrovae.sites.inspect_model`), where the guide does not carry them."""
        self.model = model
        self.guide = guide
        self.settings = settings
        self.num_examples = num_examples
        self._validated = False
        self._index_keys: tuple[str, ...] | None = None
        self.model_parameters = ProgramParameters(model)
        self.guide_parameters = ProgramParameters(guide)
        self.prepared = False
        self.sites = sites or guide_traits(guide).sites
        self.plate = settings.plate or (self.sites.plate if self.sites else DATA_PLATE)
        self.refuse_objective(settings)

    @classmethod
    def refuse_objective(cls, settings: TrainSettings) -> None:
        """Refuse, in one line, an objective a method of its own objectives would not train on."""
        if cls.own_objectives and (settings.objective in cls.SHAPED_OBJECTIVES or settings.objective_options):
            raise PyrovaeError(f"the {cls.name} method trains on objectives of its own: --objective {settings.objective} "
                               f"{'and --objective-option need' if settings.objective_options else 'needs'} --method amortized or local")

    def step(self, x: Data, index: torch.Tensor, beta: float = 1.0) -> float | torch.Tensor:
        """One update on a minibatch; returns the minibatch loss in nats per example, as a float
        or as a 0-dim tensor left on the device (the training loop reads those in groups)."""
        raise NotImplementedError

    def prepare(self, data: Data) -> None:
        """Find the param-store parameters of model and guide on `data` (a training batch: a
        program may size a `pyro.param` by it) and hand them to the optimizers (`add_parameters`); once."""
        if self.prepared:
            return
        batch = as_batch(data)
        if batch.omit is not None and not self.scores_groups:
            raise PyrovaeError(f"the {self.name} method calls the program once per minibatch, so it cannot leave the labels out of the unlabelled examples: use amortized VI")
        extra, _ = self.minibatch_kwargs(batch, None)
        if self.settings.plate is not None or self.sites is None:
            self.sites = inspect_model(self.model, batch, plate=self.settings.plate, **extra)
            self.plate = self.sites.plate
            if hasattr(self.objective, "plate"):
                self.objective.plate = self.plate
        if self.sites.max_plate_nesting > self.settings.max_plate_nesting:  # plates inside the per-example one
            self.settings = dataclasses.replace(self.settings, max_plate_nesting=self.sites.max_plate_nesting)
            if hasattr(self.objective, "max_plate_nesting"):
                self.objective.max_plate_nesting = self.sites.max_plate_nesting
        self.check_sites(self.sites)
        model_store = self.model_parameters.discover(batch, **extra)
        held = {id(t) for t in model_store}
        guide_store = [t for t in self.guide_parameters.discover(batch, **extra) if id(t) not in held]
        if self.checks_guide:
            check_guide(self.sites, self.guide_parameters.trace, self.settings.objective, self.name if not self.trains_baselines else None)
        if model_store or guide_store:
            self.add_parameters(model_store, guide_store)
        self.prepared = True

    def check_sites(self, sites: ModelSites) -> None:
        """Refuse, in one line, a model whose latent sites this method cannot infer."""
        if sites.global_latents and self.settings.objective == "iwae":
            raise PyrovaeError(
                f"--objective iwae is a per-example bound, but the model has global latent(s) {', '.join(map(repr, sites.global_latents))}: use --objective elbo"
            )
        if sites.enumerated and self.settings.objective != "elbo-enum":
            raise PyrovaeError(
                f"the model sums {', '.join(map(repr, sites.enumerated))} out by enumeration: train it with --objective elbo-enum"
            )

    def add_parameters(self, model: list[torch.Tensor], guide: list[torch.Tensor]) -> None:
        """Give the optimizers the model's and the guide's param-store tensors."""
        raise PyrovaeError(f"the {self.name} method cannot train parameters kept in Pyro's param store")

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter of model and guide that this method knows (after `prepare`)."""
        return unique([*self.model_parameters.all(), *self.guide_parameters.all()])

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every torch optimizer this method steps: its attributes', and those of its own helper
        objects one level down (a critic's, the local method's pair); for schedules and
        gradient averaging across processes."""
        found: list[torch.optim.Optimizer] = []
        for value in vars(self).values():
            inner = vars(value).values() if type(value).__module__.startswith("pyrovae.") and not isinstance(value, nn.Module) else ()
            for candidate in (value, *inner):
                if isinstance(candidate, torch.optim.Optimizer) and all(candidate is not f for f in found):
                    found.append(candidate)
        return found

    def per_example_state(self) -> list[torch.Tensor]:
        """Tensors with one row per training example that a step changes at its minibatch's rows
        without a gradient (MCMC-EM's chains); data-parallel ranks exchange those rows."""
        return []

    def check_complete(self, loss: torch.Tensor) -> None:
        """Refuse a loss that reaches a tensor this method neither optimizes nor checkpoints."""
        check_complete(loss, self.parameters(), self.optimizers())

    def minibatch_kwargs(self, x: Data, index: torch.Tensor | None) -> tuple[dict[str, Any], float]:
        """Keyword arguments for model and guide, and the factor that scales their loss to the data set.

        Programs that take `index`/`size` subsample their ``"data"`` plate themselves (exact
        scaling, and local parameters can be indexed by it): the factor is 1. A user's
        program that takes only `x` is scored on the minibatch and its loss multiplied by N / B.
        """
        if index is None:
            return {}, 1.0
        x = as_batch(x)
        if self._index_keys is None:  # read the signature once, not every step
            # only a program that names them subsamples itself: Pyro's AIR passes its **kwargs on to its prior
            self._index_keys = tuple(call_kwargs(self.model, named=True, index=index, size=self.num_examples))
        if self._index_keys:
            return {k: v for k, v in (("index", index), ("size", self.num_examples)) if k in self._index_keys}, 1.0
        return {}, self.num_examples / len(x)

    @contextmanager
    def fast_path(self) -> Iterator[None]:
        """Pyro's shape and support checks on the first step only; no per-step param registration."""
        validate = not self._validated
        self._validated = True
        with direct_parameters(), pyro.validation_enabled(validate and is_validation_enabled()):
            yield

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model_parameters.module_state(), "guide": self.guide_parameters.module_state()}
        store = {**self.model_parameters.store_state(), **self.guide_parameters.store_state()}
        return {**state, "param_store": store} if store else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict`; one with param-store entries needs `prepare` to have run."""
        self.model_parameters.load_module_state(state["model"])
        self.guide_parameters.load_module_state(state["guide"])
        store = state.get("param_store", {})
        if store and not self.prepared:
            raise RuntimeError("this state holds param-store entries: call prepare(data) before load_state_dict")
        names = self.model_parameters.store_names + self.guide_parameters.store_names
        if sorted(store) != sorted(set(names)):
            raise KeyError("param_store")
        for part in (self.model_parameters, self.guide_parameters):
            part.load_store_state({n: store[n] for n in part.store_names})


def check_guide(sites: ModelSites, guide_trace: Any, objective: str, method: str | None = None) -> None:
    """The guide samples every latent the model does not enumerate, (for IWAE) by reparameterization,
    and gives a site a baseline only where it is trained: by amortized VI on elbo-graph (`method`
    names another method, which fits none)."""
    sampled = {n: s for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    wanted = [*sites.latents, *sites.global_latents]
    missing = [n for n in wanted if n not in sampled]
    if missing:
        raise PyrovaeError(
            f"the guide does not sample the model's latent site(s) {', '.join(map(repr, missing))}: sample them in the guide, "
            "or, for a discrete site, mark it infer={'enumerate': 'parallel'} in the model and use --objective elbo-enum"
        )
    baselined = [n for n, s in sampled.items() if s["infer"].get("baseline")]
    if baselined and (objective != "elbo-graph" or method is not None):
        raise PyrovaeError(
            f"the guide gives {', '.join(map(repr, baselined))} a score-function baseline (infer={{'baseline': ...}}), which only "
            f"--method amortized with --objective elbo-graph trains: under {method or 'amortized'} / {objective} it would stay untrained; "
            "use those, or a guide without it (AIR's: --guide-option baseline=false)"
        )
    averaged = [n for n in baselined if sampled[n]["infer"]["baseline"].get("use_decaying_avg_baseline")]
    if averaged:
        raise PyrovaeError(
            f"{', '.join(map(repr, averaged))} asks for use_decaying_avg_baseline, whose running average Pyro keeps per position of "
            "the first minibatch, in its param store: minibatches of other sizes break it and checkpoints would not hold it; "
            "give the site an nn_baseline or a baseline_value instead"
        )
    if objective == "iwae":
        pathwise = [n for n, s in sampled.items() if not s["fn"].has_rsample]
        if pathwise:
            raise PyrovaeError(
                f"--objective iwae takes pathwise gradients, but the guide samples {', '.join(map(repr, pathwise))} without "
                "reparameterization: use --objective elbo (score-function terms) or enumerate the site with elbo-enum"
            )


def unique_parameters(*programs: Any) -> list[nn.Parameter]:
    """Module parameters of all `programs` (modules, bound methods, partials), each once (a guide
    may share the model's)."""
    return unique(p for program in programs for module in program_modules(program) for p in module.parameters())


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one (one kernel, not a Python loop per tensor).

    A program whose parameters all live in Pyro's param store has no module parameters until
    `InferenceMethod.prepare` finds them: it gets one empty placeholder (torch's optimizers
    refuse an empty list), which no step changes.
    """
    params = params or [nn.Parameter(torch.empty(0))]
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)
