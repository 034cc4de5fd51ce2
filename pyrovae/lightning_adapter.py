"""Any pyrovae inference method as a PyTorch Lightning module: `PyrovaeModule`.

A Lightning user keeps their `Trainer`, callbacks and loggers, and trains a pyrovae run under
them, on one device or under ``Trainer(strategy="ddp", devices=N)``::

    module = PyrovaeModule(build(Config(dataset="binarized-mnist", method="amortized")))
    Trainer(max_epochs=10, strategy="ddp", devices=2).fit(module)
    pyrovae.distributed.leave()  # gloo: every rank waits for the others before rank 0 exits

The method's own `step` is the training step (manual optimization: several methods keep two
or three optimizers, sparse per-example tables, or gradients from `autograd.grad`). Its data
order, shares and gradient averaging are those of ``pyrovae fit --nproc`` (`pyrovae.distributed`),
so N Lightning devices at batch B train as one process at batch N * B; Lightning's DDP wrapper
is kept from reducing gradients a second time. The method's state (optimizers, param store,
chains) and the minibatch order travel in Lightning's checkpoint. The epoch's mean loss is
logged as ``train_loss`` and the validation ELBO as ``valid_elbo`` (for Lightning's
callbacks: early stopping, checkpointing on the best). Limits: a resumed Lightning
run continues from its checkpoint, but the noise of each rank is not restored bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pyro
import torch
from torch import nn

from pyrovae import distributed
from pyrovae.data import minibatches
from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Experiment, scorable
from pyrovae.infer.loop import rank_seed, ranked_step, restore, synced_state, warmup_beta
from pyrovae.programs import program_modules, unique
from pyrovae.run import RunDir
from pyrovae.schedules import apply_schedule

__all__ = ["PyrovaeModule"]


class _Minibatches:
    """One epoch of global minibatch indices, the same on every rank (each takes its share in
    `training_step`); not a DataLoader, so that Lightning adds no sampler of its own."""

    def __init__(self, module: PyrovaeModule) -> None:
        self.module = module

    def __len__(self) -> int:
        return self.module.steps_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        module = self.module
        return minibatches(module.num_examples, module.ranks * module.experiment.config.batch_size, module.generator)


class PyrovaeModule(pl.LightningModule):
    """A built pyrovae run (`pyrovae.experiment.build`) trained by Lightning.

    Args:
        experiment: model, guide, method and data, as ``pyrovae fit`` builds them.
        threads: torch CPU threads per process (one: on CPUs, Lightning's DDP at the default
            thread count took 290 ms a step here, against 19 ms with one thread per process).
    """

    def __init__(self, experiment: Experiment, threads: int | None = 1) -> None:
        super().__init__()
        if experiment.config.labelled_per_batch:
            raise PyrovaeError("--labelled-per-batch (stratified minibatches) is not served by the Lightning adapter: use pyrovae fit")
        self.automatic_optimization = False
        self.experiment, self.method, self.threads = experiment, experiment.method, threads
        critic = getattr(self.method, "critic", None)
        networks = [critic.network] if critic is not None else []
        self.programs = nn.ModuleList(unique([*program_modules(experiment.model), *program_modules(experiment.guide), *networks]))
        self.generator = torch.Generator().manual_seed(experiment.config.seed)
        self.num_examples = len(experiment.data.split("train"))
        self.steps = 0
        self._stack = contextlib.ExitStack()
        self._averager: distributed.GradientAverager | None = None
        self._train_data = experiment.data

    @property
    def ranks(self) -> int:
        group = distributed.current()
        return 1 if group is None else group.size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / (self.ranks * self.experiment.config.batch_size))

    def train_dataloader(self) -> _Minibatches:
        return _Minibatches(self)

    def val_dataloader(self) -> list[torch.Tensor]:
        """One validation step an epoch, where the data has a valid split the run can score."""
        return [torch.zeros(1)] if "valid" in self.experiment.data.splits and scorable(self.experiment) else []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """The validation ELBO, as ``pyrovae fit`` computes it each epoch (sharded across ranks and
        gathered, so every rank logs the same value): ``valid_elbo``, for callbacks such as
        ``EarlyStopping(monitor="valid_elbo", mode="max")``."""
        quick: dict[str, Any] = {} if self.method.trains_guide else {"examples": 500, "proposal_steps": 30}
        with torch.inference_mode(False), torch.enable_grad():  # held-out proposals are fitted by gradient steps (methods without an encoder)
            value = self.experiment.evaluate("valid", num_samples=1, **quick).elbo.mean().item()
        self.experiment.train_mode(True)
        self.log("valid_elbo", value, prog_bar=True, batch_size=1)

    def configure_optimizers(self) -> None:
        return None  # the method's own optimizers (`InferenceMethod.optimizers`) step in training_step

    def on_fit_start(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        group = distributed.current()
        pyro.set_rng_seed(self.experiment.config.seed if group is None else rank_seed(self.experiment.config.seed, group.rank))
        self.experiment.device = self.device  # where Lightning put the modules: evaluation brings the data there
        self._train_data = self.experiment.data.to(self.device)
        if group is not None:
            distributed.broadcast_tensors(synced_state(self.method))
            self._averager = distributed.GradientAverager(self.method.optimizers(), group)
            self._stack.enter_context(self._averager.installed())
            wrapper = getattr(self.trainer.strategy, "model", None)
            if wrapper is not None and hasattr(wrapper, "require_backward_grad_sync"):
                wrapper.require_backward_grad_sync = False  # gradients are averaged at each optimizer step, weighted by share

    def on_fit_end(self) -> None:
        self._stack.close()

    def on_train_epoch_start(self) -> None:
        apply_schedule(self.method.optimizers(), self.experiment.config.schedule, self.current_epoch)

    def training_step(self, index: torch.Tensor, batch_idx: int) -> None:
        config = self.experiment.config
        x = self._train_data.batch("train", index, self.generator)
        beta = config.beta * warmup_beta(self.steps, int(config.warmup * self.steps_per_epoch), config.warmup_from)
        group = distributed.current()
        if group is None:
            loss, share = self.method.step(x, index, beta), 1.0
        else:
            loss, share = ranked_step(self.method, x, index, beta, group, self._averager)
        self.steps += 1
        value = torch.as_tensor(loss, dtype=torch.float32, device=self.device).detach() * share * self.ranks
        # averaged over the epoch, then over ranks (each rank's value is its share's loss times share * ranks): one
        # reduction an epoch, not a step (a gloo all-reduce costs about 2 ms here, a step 5 ms)
        self.log("train_loss", value, on_step=False, on_epoch=True, prog_bar=True, sync_dist=group is not None, batch_size=len(index))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pyrovae"] = {"method": self.method.state_dict(), "generator": self.generator.get_state(), "steps": self.steps,
                                 "config": self.experiment.config.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("pyrovae")
        if saved is None:
            raise PyrovaeError("this Lightning checkpoint was not written by a PyrovaeModule: it holds no pyrovae state")
        restore(self.method, saved["method"], RunDir("(Lightning checkpoint)"))
        self.generator.set_state(saved["generator"])
        self.steps = saved["steps"]
