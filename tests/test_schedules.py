"""Burda et al.'s schedule: its stages, the rates every optimizer of every method trains at, resume."""

import math

import pytest
import torch

from pyrovae.errors import PyrovaeError
from pyrovae.experiment import Config, build, fit
from pyrovae.registry import METHODS
from pyrovae.schedules import apply_schedule, burda_stage, lr_factor, stage_ends

SMALL = dict(dataset="digits", hidden=(16,), latent=2, batch_size=500, eval_samples=0, lr=3e-3, logs="none")


def test_the_stages_are_3_to_the_i_epochs_and_3280_in_all():
    assert stage_ends() == [1, 4, 13, 40, 121, 364, 1093, 3280]
    assert [burda_stage(e) for e in (0, 1, 3, 4, 12, 13, 3279, 3280, 10**6)] == [0, 1, 1, 2, 2, 3, 7, 7, 7]
    assert lr_factor("burda", 0) == 1.0 and lr_factor("burda", 3279) == pytest.approx(0.1)
    assert lr_factor("constant", 3279) == 1.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_parameter_a_step_moves_is_held_by_an_optimizer_the_method_reports(method):
    experiment = build(Config(epochs=0, method=method, **SMALL))
    x = experiment.split("train")[:50]
    experiment.method.step(x, torch.arange(50))
    held = {id(p) for optimizer in experiment.method.optimizers() for group in optimizer.param_groups for p in group["params"]}
    critic = getattr(experiment.method, "critic", None)
    params = [*experiment.method.parameters(), *(critic.parameters() if critic is not None else [])]
    stepped = [p for p in params if p.grad is not None]
    assert stepped and all(id(p) in held for p in stepped)


def test_each_epoch_trains_at_its_stage_rate_with_burdas_epsilon_and_resumes_exactly(tmp_path):
    experiment, _ = fit(Config(epochs=2, schedule="burda", **SMALL), tmp_path / "a", progress=False)
    (group,) = experiment.method.optimizer.param_groups
    assert group["lr"] == pytest.approx(3e-3 * 10 ** (-1 / 7)) and group["initial_lr"] == 3e-3 and group["eps"] == 1e-4
    fit(Config(epochs=1, schedule="burda", **SMALL), tmp_path / "b", progress=False)
    resumed, _ = fit(Config(epochs=2), tmp_path / "b", resume=True, progress=False)
    for a, b in zip(experiment.method.parameters(), resumed.method.parameters()):
        assert torch.equal(a, b)
    constant, _ = fit(Config(epochs=2, **SMALL), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(experiment.method.parameters(), constant.method.parameters()))


def test_the_rate_is_set_from_the_initial_rate_not_compounded():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for epoch in range(5):
        apply_schedule([optimizer], "burda", epoch)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert math.isclose(optimizer.param_groups[0]["initial_lr"], 1e-3)


def test_an_unknown_schedule_is_refused_in_one_line():
    with pytest.raises(PyrovaeError, match="unknown --schedule 'cosine'"):
        Config(schedule="cosine").check()
