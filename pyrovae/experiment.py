"""The Python API behind the command line: build a run from a config, fit, evaluate, sample."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from tqdm.auto import tqdm

import pyrovae.models  # noqa: F401  (registers the built-in models)
from pyrovae import distributed, plots, usercode
from pyrovae.ais import AISResult, AISSettings, BDMCResult, ais, bdmc
from pyrovae.batch import Batch, as_batch
from pyrovae.config import Config
from pyrovae.data import UNLABELLED, Dataset, load_dataset
from pyrovae.dataset_bound import dataset_elbo
from pyrovae.diagnostics import active_units, kl_per_site
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import Evaluation, evaluate
from pyrovae.files import check_writable, locked
from pyrovae.guides import build_guide
from pyrovae.heldout import ProposalSettings, heldout_scores
from pyrovae.infer import History, TrainSettings, train
from pyrovae.infer.local import model_sites
from pyrovae.infer.loop import restore
from pyrovae.logs import EpochLog, parse_kinds
from pyrovae.memory import capped, check_fits, meta_parameters, proc_bytes
from pyrovae.nets import LIKELIHOODS
from pyrovae.programs import program_modules
from pyrovae.protocols import guide_traits
from pyrovae.registry import METHODS, MODELS
from pyrovae.run import RunDir
from pyrovae.sampling import moments, sample, why_no_images
from pyrovae.sites import ModelSites, call_kwargs, inspect_model

__all__ = ["Config", "Experiment", "build", "fit", "load", "evaluate_run"]

DEFAULT_LIKELIHOOD = {"binary": "bernoulli", "grayscale": "continuous-bernoulli", "sequence": "bernoulli", "real": "gaussian"}


@dataclass
class Experiment:
    """A data set, a model, a guide and the method that learns them."""

    config: Config
    data: Dataset
    model: Callable
    guide: Callable
    method: Any
    device: torch.device

    def split(self, name: str) -> torch.Tensor | Batch:
        """A whole split as model input on the run's device: a tensor, or a `Batch` of the data's fields."""
        split = self.data.split(name)
        return self.data.batch(name, torch.arange(len(split)), torch.Generator().manual_seed(self.config.seed)).to(self.device)

    @property
    def amortized_guide(self) -> Callable | None:
        """The trained guide where the method leaves one that gives an ELBO, else None."""
        return self.guide if self.method.trains_guide and guide_traits(self.guide).gives_elbo else None

    def anneal(self, split: str = "valid", settings: AISSettings = AISSettings(), examples: int | None = None) -> AISResult:
        """AIS log p(x) per example of a split (`pyrovae.ais`): one estimator for any method's
        decoder, started from the prior, or from the trained guide with ``settings.start == "guide"``."""
        x = as_batch(self.split(split))[:examples]
        self.train_mode(False)
        return ais(self.model, x, self.amortized_guide, settings, plate=self.method.plate)

    def sandwich(self, split: str = "valid", settings: AISSettings = AISSettings(), examples: int = 100) -> BDMCResult:
        """BDMC bounds on log p(x) of data simulated from the trained model, with the other
        arguments (labels, conditions) of the first `examples` of a split."""
        x = as_batch(self.split(split))[:examples]
        self.train_mode(False)
        return bdmc(self.model, x, self.amortized_guide, settings, plate=self.method.plate)

    def train_mode(self, training: bool) -> None:
        """Training or evaluation mode for every module of model and guide."""
        for module in (*program_modules(self.model), *program_modules(self.guide)):
            module.train(training)

    def evaluate(self, split: str = "valid", num_samples: int = 1000, examples: int | None = None, proposal_steps: int = 100,
                 proposal: str = "auto", progress: Callable[[int], None] | None = None) -> Evaluation:
        """ELBO and IS log p(x) per example of a split, whatever method trained the model.

        `proposal` ``"guide"``: the trained amortized guide proposes; ``"fitted"``: a Gaussian
        fitted per held-out example, `proposal_steps` Adam steps with the decoder frozen (the
        only way to score local, map and mcmc-em runs, and point-estimate guides such as
        delta); ``"auto"``: the guide where it gives an ELBO, else fitted. `progress` is called
        with the examples each scored chunk held (guide proposals).
        """
        if proposal not in PROPOSALS:
            raise PyrovaeError(f"unknown --proposal {proposal!r}: choose from {', '.join(PROPOSALS)}")
        if proposal == "guide" and not self.method.trains_guide:
            raise PyrovaeError(f"a {self.config.method} run has no trained guide to propose with: use --proposal fitted")
        x = as_batch(self.split(split))[:examples]
        self.train_mode(False)
        group = distributed.current()  # in a data-parallel run each rank scores its slice of the examples
        mine = x if group is None else x[distributed.split_examples(len(x), group)]
        if group is not None and len(mine) == 0:  # fewer examples than ranks: this one scores none
            nothing = torch.empty(0, device=self.device)
            result = Evaluation(elbo=nothing, log_likelihood=nothing, iwae=None, num_samples=num_samples, iwae_k=None)
        elif proposal == "guide" or (proposal == "auto" and self.amortized_guide is not None):
            result = evaluate(self.model, self.guide, mine.chunks(500), num_samples=num_samples, plate=self.method.plate, progress=progress)
        else:
            sites = self.method.sites or model_sites(self.model, self.guide, x)
            result = heldout_scores(self.model, mine, sites, ProposalSettings(steps=proposal_steps, samples=num_samples))
        if group is None:
            return result
        return Evaluation(elbo=distributed.gather_examples(result.elbo, group), log_likelihood=distributed.gather_examples(result.log_likelihood, group),
                          iwae=None, num_samples=result.num_samples, iwae_k=None)


    def lengths(self, split: str) -> torch.Tensor | None:
        """The lengths of a split's sequences (for figures per time step), else None."""
        return self.data.split(split).lengths if self.data.kind == "sequence" else None

    @torch.no_grad()
    def classification_error(self, split: str) -> float | None:
        """The error rate of the model's classifier (its ``classify(x)``, q(y|x) of M2) on the
        labelled examples of a split; None for a model without one or a split without labels."""
        predictions = self.predictions(split)
        return None if predictions is None else (predictions[0] != predictions[1]).float().mean().item()

    @torch.no_grad()
    def counts(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the true object counts, those of one draw of the trained guide's scene) of a split's
        scenes, on the CPU (the guide's ``scenes(x)``: AIR); None for a guide without one or a
        split whose objects are not known (no boxes)."""
        scenes, boxes = getattr(self.guide, "scenes", None), self.data.split(split).boxes
        if not callable(scenes) or boxes is None or not self.method.trains_guide:
            return None
        self.train_mode(False)
        x = as_batch(self.split(split)).primary
        return (~boxes[..., 0].isnan()).sum(-1), torch.cat([scenes(chunk)[0].cpu() for chunk in x.split(1000)])

    def count_accuracy(self, split: str) -> float | None:
        """The share of a split's scenes whose count one draw of the guide gets right (`counts`;
        Eslami et al. 2016, sec. 3.1; Pyro's AIR example also counts one draw)."""
        counts = self.counts(split)
        return None if counts is None else (counts[0] == counts[1]).float().mean().item()

    @torch.no_grad()
    def predictions(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(labels, the classifier's most probable classes) on the labelled examples of a split,
        on the CPU; None for a model without a classifier or a split without labels. The
        classifier is the model's ``classify(x)`` (q(y|x) of M2), else for a program called
        without labels on unlabelled examples (``--unlabelled omit``) its guide's q(y|x) there
        (Pyro's ss_vae_M2 classifies so)."""
        labels, own = self.data.split(split).y, getattr(self.model, "classify", None)
        if labels is None or not bool((labels >= 0).any()):
            return None
        classify = (lambda chunk: own(chunk.primary)) if callable(own) else self._guide_classifier()
        if classify is None:
            return None
        self.train_mode(False)
        labelled = (labels >= 0).nonzero().squeeze(-1)
        batch = as_batch(self.split(split))[labelled.to(self.device)]
        return labels[labelled].cpu(), torch.cat([classify(chunk).probs.argmax(-1).cpu() for chunk in batch.chunks(1000)])

    def _guide_classifier(self) -> Callable[[Batch], Any] | None:
        """q(y|x) of the guide at the label site, called as on an unlabelled example."""
        label = self.method.sites.label if self.method.sites is not None else None
        if label is None or not self.data.omit_unlabelled or self.amortized_guide is None:
            return None
        guide = self.amortized_guide
        return lambda chunk: chunk.without_label().call(poutine.trace(guide).get_trace).nodes[label]["fn"]


PROPOSALS = ("auto", "guide", "fitted")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise PyrovaeError(f"unknown --device {name!r}: use cpu or cuda") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError("--device cuda was asked for, but this machine has no usable CUDA GPU")
    return device


def _check_data(data: Dataset, model: Callable, chunk: int = 10000) -> None:
    """Every split, in chunks: no NaN or infinity, and values the model's likelihood can score."""
    for split, part in data.splits.items():
        for start in range(0, len(part), chunk):
            batch = as_batch(data.batch(split, torch.arange(start, min(start + chunk, len(part))), torch.Generator().manual_seed(0)))
            if not all(torch.isfinite(v).all() for v in batch.entries() if torch.is_tensor(v) and v.is_floating_point()):
                raise PyrovaeError(f"the {split} data holds NaN or infinite values: clean it first")
            if hasattr(model, "check_data"):
                model.check_data(batch.primary)


def build(config: Config) -> Experiment:
    """Load the data, build model, guide and method, and check that they fit together."""
    config.check()
    user_model = usercode.is_spec(config.model)
    model_cls = None if user_model else MODELS.get(config.model)
    method_cls = METHODS.get(config.method)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir, **config.dataset_options)
    if config.features is not None:
        data = encoded(data, config.features, config.data_dir, config.device)
    if config.fields != "x":
        data = data.with_fields(config.fields)
    if config.collate is not None:
        collate = usercode.load_object(config.collate)
        if not callable(collate):
            raise PyrovaeError(f"--collate {config.collate} is a {type(collate).__name__}, not a function collate(args, kwargs)")
        data = dataclasses.replace(data, collate=collate)
    if config.unlabelled == "omit":
        data = data.omitting_unlabelled()
        if not method_cls.scores_groups:
            raise PyrovaeError(f"--unlabelled omit calls the program on labelled and unlabelled examples apart, which the {config.method} method does not: use --method amortized")
    with capped(device):  # an allocation beyond the memory available fails here, in one line, rather than being killed
        instances: dict[str, object] = {}  # FILE:Class.model and FILE:Class.guide share one Class
        if user_model:
            model = usercode.build_program(config.model, data.event_shape, instances, **config.model_options)
            _to(model, device)
        else:
            likelihood = config.likelihood or DEFAULT_LIKELIHOOD[data.kind]
            if likelihood not in LIKELIHOODS:
                raise PyrovaeError(f"unknown likelihood {likelihood!r}: choose from {', '.join(LIKELIHOODS)}")
            common = dict(data_shape=data.event_shape, latent=config.latent, hidden=config.hidden, activation=config.activation, likelihood=likelihood)
            check_fits(meta_parameters(lambda: _construct(model_cls, f"model {config.model!r}", common, _chosen(config), config.model_options)), device)
            model = _construct(model_cls, f"model {config.model!r}", common, _chosen(config), config.model_options).to(device)
        _check_data(data, model)
        if hasattr(model, "init_from_data"):
            model.init_from_data(data.batch("train", torch.arange(min(len(data.split("train")), 10000)), torch.Generator().manual_seed(0)))
        num_train = len(data.split("train"))
        example = as_batch(data.batch("train", data.first_rows("train", 100), torch.Generator().manual_seed(0))).to(device)
        if usercode.is_spec(config.guide):
            guide = usercode.build_program(config.guide, data.event_shape, instances, model=model, num_examples=num_train, **config.guide_options)
            _to(guide, device)
        else:
            guide = build_guide(config.guide, model, example, plate=config.plate, hidden=config.hidden, activation=config.activation,
                                num_examples=num_train, **config.guide_options).to(device)
        sites = inspect_model(model, example, plate=config.plate)
        settings = TrainSettings(config.objective, config.particles, config.lr, config.batch_size, sites.max_plate_nesting, config.free_bits,
                                 config.capture, config.plate, config.labelled_per_batch, config.objective_options)
        if config.labelled_per_batch:
            _check_stratified(config, data, sites)
        common = dict(model=model, guide=guide, settings=settings, num_examples=num_train, sites=sites)
        method = _construct(method_cls, f"method {config.method!r}", common, {}, config.method_options, flag="--method-option")
        parameters = method.parameters()
        check_fits(sum(p.numel() for p in parameters), device, held=sum(p.nbytes for p in parameters))
    first = as_batch(data.batch("train", data.first_rows("train", config.batch_size), torch.Generator().manual_seed(0))).to(device)
    method.prepare(first)  # param-store parameters exist, and the program is checked, before any checkpoint is read
    return Experiment(config, data, model, guide, method, device)


@torch.no_grad()
def encoded(data: Dataset, run: str, data_dir: str | None = None, device: str | None = None, chunk: int = 5000) -> Dataset:
    """`data` with each example's x replaced by the posterior of the trained run `run`'s encoder,
    labels and splits kept: M1+M2 trains M2 on the latents of a VAE, M1, trained first (Kingma
    et al. 2014, sec. 3.1.3). Each row holds the posterior's means and standard deviations, and
    every batch draws from it with the batch's seeded generator (as dynamic binarization
    draws), so runs resume exactly: a diagonal Gaussian, exactly the posterior of the diagonal
    guides. With means alone, a Gaussian p(x|y,z) learns to copy them through z at ever smaller
    scales and y is left unused."""
    source = load(run, data_dir, device)
    if source.amortized_guide is None:
        raise PyrovaeError(f"--features {run}: a {source.config.method} run has no trained encoder whose latents could be the data")
    if data.kind == "sequence" or tuple(source.data.event_shape) != tuple(data.event_shape):
        raise PyrovaeError(f"--features {run}: its encoder reads examples of shape {tuple(source.data.event_shape)}, "
                           f"but {data.name} holds {data.kind} examples of shape {tuple(data.event_shape)}")
    source.train_mode(False)
    sites = source.method.sites
    splits = {}
    for name, part in data.splits.items():
        means, deviations = [], []
        for start in range(0, len(part), chunk):
            x = as_batch(data.batch(name, torch.arange(start, min(start + chunk, len(part))), torch.Generator().manual_seed(0))).to(source.device)
            flat = lambda latents: torch.cat([v.reshape(len(v), -1) for v in latents.values()], -1).cpu()  # noqa: E731
            mean, deviation = moments(source.guide, sites, x.primary)
            means.append(flat(mean))
            deviations.append(flat(deviation))
        splits[name] = dataclasses.replace(part, x=torch.cat(means), noise=torch.cat(deviations))
    width = splits[next(iter(splits))].x.shape[1]
    return Dataset(f"{data.name} as the latents of {run}", splits, (width,), "real")


def _check_stratified(config: Config, data: Dataset, sites: ModelSites) -> None:
    """Stratified minibatches weight each example's terms: for amortized VI on labelled and
    unlabelled examples, and a model whose every latent is per example."""
    labels = data.split("train").y
    if config.method != "amortized":
        raise PyrovaeError(f"--labelled-per-batch trains with amortized VI only, not --method {config.method}")
    if labels is None or "y" not in data.fields:
        raise PyrovaeError("--labelled-per-batch needs labels as data: --fields x,y on a data set with labels")
    if not ((labels == UNLABELLED).any() and (labels != UNLABELLED).any()):
        raise PyrovaeError("--labelled-per-batch needs both labelled and unlabelled training examples (e.g. --data-option labels=100)")
    if sites.global_latents:
        raise PyrovaeError(f"--labelled-per-batch weights each example's terms; the model's global latent(s) {', '.join(sites.global_latents)} are not per example")


def _to(program: Callable, device: torch.device) -> None:
    """A user's modules to the run's device (a function program has none of its own)."""
    for module in program_modules(program):
        module.to(device)


def _chosen(config: Config) -> dict[str, Any]:
    """Architecture flags set away from their defaults: a model must take them or refuse."""
    defaults = Config()
    return {k: getattr(config, k) for k in ("layers", "prior", "decoder") if getattr(config, k) != getattr(defaults, k)}


def _construct(cls: type, what: str, common: dict[str, Any], chosen: dict[str, Any], options: dict[str, Any], flag: str = "--model-option") -> Any:
    """`cls(**...)` with the common options it takes; chosen and explicit options it must take."""
    takes = call_kwargs(cls.__init__, **common, **chosen, **options)
    refused = [k for k in (*chosen, *options) if k not in takes]
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')}" if k in chosen else f"{flag} {k}" for k in refused)
        raise PyrovaeError(f"{what} does not take {flags}")
    try:
        return cls(**takes)
    except TypeError as error:
        raise PyrovaeError(f"{what}: {error}") from error


def _peak_memory_mb() -> float:
    """Peak resident memory of this process. Linux's VmHWM, where there is one: ru_maxrss carries
    the parent's peak over into a process it starts (a benchmark's subprocess read 1688 MB, the
    parent's figure, for its own ~800 MB)."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak / 2**20 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Settings `--resume` may change: the epochs to train to, the final evaluation's samples and the
# live logs (saved as the run's new settings), and where the run is and its data are (not saved).
RESUMABLE = ("epochs", "eval_samples", "device", "data_dir", "logs")
SAVED_ON_RESUME = ("epochs", "eval_samples", "logs")
FLAGS = {"logs": "--log", "dataset_options": "--data-option", "model_options": "--model-option", "guide_options": "--guide-option", "method_options": "--method-option",
         "objective_options": "--objective-option", "capture": "--eager"}


def _flag(name: str, value: Any) -> str:
    """How the command line sets `name` to `value`."""
    if name == "capture":
        return "--eager" if not value else "captured training (no --eager)"
    shown = value if isinstance(value, str) else ",".join(map(str, value)) if name == "hidden" else json.dumps(_plain(value))
    return f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {shown}"


def _plain(value: Any) -> Any:
    """JSON's view of a setting, the form config.json keeps: tuples are lists."""
    return json.loads(json.dumps(value, default=repr))


def _given(config: Config) -> set[str]:
    """The fields of `config` set away from Config's defaults."""
    defaults = Config()
    return {f.name for f in dataclasses.fields(Config) if _plain(getattr(config, f.name)) != _plain(getattr(defaults, f.name))}


def saved_config(run: RunDir) -> Config:
    """A run's config.json, checked against Config's fields and types."""
    return Config.from_dict(run.config(), str(run.path / "config.json"))


def _resumed(run: RunDir, config: Config, given: Collection[str] | None, log: Callable[[str], None]) -> tuple[Config, bool]:
    """The saved config with the RESUMABLE settings the caller gave applied (and reported), and
    whether config.json must be rewritten; any other given setting must equal the saved one."""
    saved = saved_config(run)
    given = _given(config) if given is None else set(given)
    changed = [f.name for f in dataclasses.fields(Config) if f.name in given and _plain(getattr(config, f.name)) != _plain(getattr(saved, f.name))]
    for name in changed:
        if name not in RESUMABLE:
            raise PyrovaeError(
                f"{_flag(name, getattr(config, name))} differs from the run's saved {_flag(name, getattr(saved, name))}: "
                f"drop it to continue {run.path} as it was started, or start a new run with another --out"
            )
    if changed:
        log(f"resuming {run.path} with " + ", ".join(f"{_flag(n, getattr(config, n))} (was {_flag(n, getattr(saved, n))})" for n in changed))
    resumed = dataclasses.replace(saved, **{n: getattr(config, n) for n in changed})
    return resumed, any(n in SAVED_ON_RESUME for n in changed)


def fit(
    config: Config, out: str | Path | None = None, resume: bool = False, progress: bool = True,
    log: Callable[[str], None] = print, given: Collection[str] | None = None,
) -> tuple[Experiment, dict[str, Any]]:
    """Train as `config` says; with `out`, write the run directory (config, checkpoint, metrics, plots).

    Everything is validated before anything is written, so bad input leaves no files behind.
    With `resume`, the run in `out` continues from its checkpoint (or from the start when it was
    stopped before its first one), with its saved config: `given` names the fields of `config`
    the caller set (default: those away from Config's defaults); those in RESUMABLE are applied
    and reported through `log`, any other must equal the saved value. Temporary files a killed
    process left in the run directory are removed.
    """
    group = distributed.from_environment(_device(config.device))  # torchrun's, or `pyrovae fit --nproc`'s, process group
    main = group is None or group.main  # rank 0 alone writes the run directory and logs
    progress = progress and main
    run = RunDir(out) if out is not None else None
    checkpoint, rewrite = None, False
    config = dataclasses.replace(config, model=usercode.describe(config.model), guide=usercode.describe(config.guide),
                                 collate=config.collate and usercode.describe(config.collate))
    if resume:
        if run is None:
            raise PyrovaeError("--resume needs the run directory (--out)")
        config, rewrite = _resumed(run, config, given, log)
        checkpoint = run.load_checkpoint() if run.checkpoint.exists() else None
    if run is not None and main:
        if not resume:
            run.check_new()
        check_writable(run.path)
    logs = parse_kinds(config.logs, explicit=config.logs != Config.logs and (given is None or "logs" in given))
    start = time.perf_counter()
    if progress:
        log(f"loading {config.dataset} and building {config.model} / {config.guide} / {config.method}")
    experiment = build(config)
    if progress:
        parameters = sum(p.numel() for p in experiment.method.parameters())
        log(f"ready in {time.perf_counter() - start:.1f} s: {len(experiment.data.split('train'))} training examples, {parameters:,} parameters")
    with locked(run.path) if run is not None and main else contextlib.nullcontext():
        return _fit(experiment, run, resume, checkpoint, rewrite, progress, log, logs, main)


def _fit(experiment: Experiment, run: RunDir | None, resume: bool, checkpoint: dict[str, Any] | None, rewrite: bool, progress: bool,
         log: Callable[[str], None], logs: tuple[str, ...], main: bool = True) -> tuple[Experiment, dict[str, Any]]:
    """`fit` once everything is checked, holding the run directory's lock (rank 0 of a
    data-parallel run alone writes: `main`)."""
    config = experiment.config
    if run is not None and not resume and main:
        run.create(config.to_dict())
    elif run is not None and resume:
        if checkpoint is not None:
            restore(experiment.method, checkpoint["method"], run)  # a mismatch is refused before anything is written
        if main:
            run.remove_temporary()
        if rewrite and main:
            run.save_config(config.to_dict())
        if checkpoint is None and main:
            log(f"{run.path} has no checkpoint yet (it was stopped before its first one): training it from the start")
    has_valid = "valid" in experiment.data.splits and scorable(experiment)

    def validate() -> float:
        """The validation ELBO; methods without an encoder get quick per-example proposals on 500 examples."""
        quick = {} if experiment.method.trains_guide else {"examples": 500, "proposal_steps": 30}
        score = experiment.evaluate("valid", num_samples=1, **quick).elbo.mean().item()
        experiment.train_mode(True)
        return score

    epoch_log = EpochLog(run.path, logs, len(checkpoint["history"]) if checkpoint else 0) if run is not None and logs and main else None
    try:
        history = train(
            experiment.method, experiment.data, config.epochs, seed=config.seed, warmup_epochs=config.warmup, warmup_from=config.warmup_from, beta=config.beta, schedule=config.schedule,
            patience=config.patience, run=run, resume=checkpoint is not None, checkpoint=checkpoint, validate=validate if has_valid else None,
            device=experiment.device, progress=progress, log=log if progress else None,
            on_epoch=None if epoch_log is None else lambda history: epoch_log.write(*_epoch_metrics(experiment, history, epoch_log.writer is not None)),
        )
    finally:
        if epoch_log is not None:
            epoch_log.close()
    if config.eval_samples > 0 and progress and scorable(experiment):
        log(f"scoring the {'valid' if 'valid' in experiment.data.splits else 'train'} split (IS-{config.eval_samples})")
    metrics = _metrics(experiment, history, progress)
    if run is not None and main:
        run.write_json("metrics.json", metrics)
        plots.write_run_plots(experiment, history, run.path)
    return experiment, metrics


def _epoch_metrics(experiment: Experiment, history: History, images: bool, examples: int = 200) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The live log's row for the epoch just ended (`pyrovae.logs`): the history's row, the
    learning rate, examples per second and elapsed training seconds; with a trained guide each
    latent site's KL and active units on `examples` held-out examples; and a sample grid."""
    row = history.rows[-1]
    metrics = {**row, "lr": experiment.config.lr, "examples_per_second": len(experiment.data.split("train")) / max(row["seconds"], 1e-9),
               "elapsed_seconds": history.train_seconds}
    split = "valid" if "valid" in experiment.data.splits else "train"
    guide = experiment.amortized_guide
    if guide is None and not images:
        return metrics, None
    x = as_batch(experiment.split(split))[:examples]
    experiment.train_mode(False)
    try:
        if guide is not None and scorable(experiment):
            metrics.update({f"kl.{name}": value for name, value in kl_per_site(experiment.model, guide, x).items()})
            if x.is_tensor:  # (active units read a guide called on the data tensor alone)
                units = active_units(experiment.model, guide, x.primary, num_samples=10)
                metrics.update({f"active_units.{name}": count for name, count in units.per_site.items()})
        shape = experiment.data.image_shape
        grid = None
        if images and shape is not None and why_no_images(experiment.model, x) is None:
            grid = sample(experiment.model, x, 64).reshape(64, 1, *shape).clamp(0, 1)
    finally:
        experiment.train_mode(True)
    return metrics, grid


def scorable(experiment: Experiment) -> bool:
    """Whether held-out examples can be scored one by one (by the guide where it gives an ELBO,
    else by fitted proposals): no global latent or self-subsampled plate (the bound of such a
    model does not split per example: its training bound is what there is)."""
    sites = experiment.method.sites
    per_example = sites is None or not (sites.global_latents or sites.subsampled)
    return per_example


def _global_bound(experiment: Experiment, split: str, num_samples: int) -> dict[str, Any]:
    """The data set's ELBO of a model with global latents (`pyrovae.dataset_bound`), per example,
    and why its log p(x) is not reported."""
    sites = experiment.method.sites
    assert sites is not None
    names = ", ".join(map(repr, sites.global_latents))
    if experiment.amortized_guide is None:
        raise PyrovaeError(f"the model has global latent(s) {names} and the run no amortized guide for them: there is no held-out bound to report; "
                           "its training bound is in metrics.json")
    experiment.train_mode(False)
    bound = dataset_elbo(experiment.model, experiment.guide, experiment.split(split), num_samples=num_samples, plate=experiment.method.plate)
    return {
        "examples": bound.examples, "elbo": bound.per_example, "elbo_total": bound.elbo,
        "elbo_stderr": None if math.isnan(bound.stderr) else bound.stderr / bound.examples, "num_samples": num_samples,
        "log_likelihood": None, "gap": None,
        "log_likelihood_refused": f"global latent(s) {names}: log p(x) does not factor per example, so only the data set's ELBO is reported",
    }


@contextlib.contextmanager
def scoring_bar(examples: int, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A bar over the examples being scored, where stderr is a terminal and `show`; it stays."""
    if not show or not sys.stderr.isatty():
        yield None
        return
    with tqdm(total=examples, unit="example", desc="scoring", dynamic_ncols=True) as bar:
        yield bar.update


def scored_quantity(model: Callable) -> str:
    """What a run's log-likelihood figures are of: log p(x), or a conditional model's own
    (``scores``: the CVAE's log p(x_out | x_in))."""
    return str(getattr(model, "scores", "log p(x)"))


def _metrics(experiment: Experiment, history: History, progress: bool = False) -> dict[str, Any]:
    config = experiment.config
    split = "valid" if "valid" in experiment.data.splits else "train"
    metrics: dict[str, Any] = {
        "model": config.model, "guide": config.guide, "method": config.method, "objective": config.objective,
        "dataset": config.dataset, "split": split, "examples": len(experiment.data.split(split)), "scores": scored_quantity(experiment.model),
        "elbo": None, "log_likelihood": None, "num_samples": config.eval_samples,
        "epochs": history.epochs, "stopped_early": history.stopped_early,
        "train_seconds": history.train_seconds,
        "examples_per_second": history.epochs * len(experiment.data.split("train")) / max(history.train_seconds, 1e-9),
        "peak_memory_mb": _peak_memory_mb(),
        "history": history.rows,
    }
    if config.eval_samples > 0 and scorable(experiment):
        start = time.perf_counter()
        with scoring_bar(len(experiment.data.split(split)), progress) as advance:
            summary = experiment.evaluate(split, config.eval_samples, progress=advance).summary(experiment.lengths(split))
        metrics.update(elbo=summary["elbo"], log_likelihood=summary["log_likelihood"], gap=summary["gap"], eval_seconds=time.perf_counter() - start,
                       **{k: v for k, v in summary.items() if k.endswith("_per_step")})
    elif config.eval_samples > 0 and experiment.method.sites is not None and experiment.method.sites.global_latents and experiment.method.trains_guide:
        start = time.perf_counter()
        bound = _global_bound(experiment, split, config.eval_samples)
        metrics.update(elbo=bound["elbo"], elbo_stderr=bound["elbo_stderr"], log_likelihood_refused=bound["log_likelihood_refused"],
                       eval_seconds=time.perf_counter() - start)
    elif history.rows and "valid_elbo" in history.rows[-1]:
        metrics["elbo"] = history.rows[-1]["valid_elbo"]
    labelled = [name for name in ("test", "valid") if name in experiment.data.splits]
    error = experiment.classification_error(labelled[0]) if labelled else None
    if error is not None:
        metrics.update(classification_error=error, classification_split=labelled[0])
    counted = "valid" if "valid" in experiment.data.splits else "train"
    accuracy = experiment.count_accuracy(counted)
    if accuracy is not None:
        metrics.update(count_accuracy=accuracy, count_split=counted)
    return metrics


def load(path: str | Path, data_dir: str | None = None, device: str | None = None) -> Experiment:
    """Rebuild a trained run from its directory."""
    run = RunDir(path)
    config = dataclasses.replace(saved_config(run), **({"data_dir": data_dir} if data_dir else {}), **({"device": device} if device else {}))
    checkpoint = run.load_checkpoint()
    experiment = build(config)
    restore(experiment.method, checkpoint["method"], run)
    return experiment


def evaluate_run(path: str | Path, split: str = "valid", num_samples: int = 1000, data_dir: str | None = None, device: str | None = None,
                 estimator: str = "is", annealing: AISSettings = AISSettings(), bdmc_examples: int = 0, proposal: str = "auto",
                 proposal_steps: int = 100) -> dict[str, Any]:
    """Held-out log-likelihood of a run on a split (nats per example).

    ``estimator="is"``: importance sampling with `num_samples` draws from `proposal` (see
    `Experiment.evaluate`) and the ELBO, and the active units (Burda et al. 2016, appendix C)
    where the run has an amortized guide with latents.
    ``estimator="ais"``: annealed importance sampling with `annealing`, and with `bdmc_examples`
    the BDMC sandwich on that many examples simulated from the model.
    """
    if estimator not in ("is", "ais"):
        raise PyrovaeError(f"--estimator must be 'is' or 'ais', got {estimator!r}")
    if bdmc_examples < 0 or (bdmc_examples and estimator != "ais"):
        raise PyrovaeError(f"--bdmc takes a positive number of simulated examples, with --estimator ais (got {bdmc_examples})")
    annealing.check()
    experiment = load(path, data_dir, device)
    experiment.data.split(split)
    config = experiment.config
    head = {"model": config.model, "guide": config.guide, "method": config.method, "objective": config.objective, "dataset": config.dataset, "split": split,
            "scores": scored_quantity(experiment.model)}
    start = time.perf_counter()
    if estimator == "ais":
        result: dict[str, Any] = {**head, "estimator": "ais", **experiment.anneal(split, annealing).summary(), "eval_seconds": time.perf_counter() - start}
        if bdmc_examples:
            start = time.perf_counter()
            sandwich = experiment.sandwich(split, annealing, bdmc_examples).summary()
            result.update({f"bdmc_{k}": v for k, v in sandwich.items() if k in ("examples", "lower", "upper", "width")}, bdmc_seconds=time.perf_counter() - start)
        return result
    sites = experiment.method.sites
    if sites is not None and sites.global_latents:
        return {**head, "estimator": "is", **_global_bound(experiment, split, num_samples), "eval_seconds": time.perf_counter() - start}
    fitted = proposal == "fitted" or (proposal == "auto" and experiment.amortized_guide is None)
    summary = experiment.evaluate(split, num_samples, proposal=proposal, proposal_steps=proposal_steps).summary(experiment.lengths(split))
    summary["proposal"] = f"a diagonal Gaussian fitted per example ({proposal_steps} Adam steps)" if fitted else f"the run's {config.guide} guide"
    error = experiment.classification_error(split)
    if error is not None:
        summary["classification_error"] = error
    accuracy = experiment.count_accuracy(split)
    if accuracy is not None:
        summary["count_accuracy"] = accuracy
    x = as_batch(experiment.split(split))
    if experiment.amortized_guide is not None and x.is_tensor and experiment.method.sites.latents:
        summary.update(active_units(experiment.model, experiment.guide, x.primary[:1000].split(500)).summary())
    return {**head, "estimator": "is", **summary, "eval_seconds": time.perf_counter() - start}
