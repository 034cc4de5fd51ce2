"""AIR (Eslami et al. 2016): the spatial transformer places and crops known patches, the count
prior is the truncated geometric, elbo-graph is minus the ELBO with Pyro's TraceGraph gradient,
the baseline lowers the variance of the z_pres gradient, a small trained model counts, the
refusals and the command line."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_data import DEAD_URL, shared
from test_user_cli import run_cli

from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.guides import build_guide
from pyrovae.infer.amortized import AmortizedVI
from pyrovae.infer.base import TrainSettings
from pyrovae.models.air import AIR, continuation_probabilities, image_to_window, window_to_image, z_where_box
from pyrovae.objectives import MaskedGraphELBO, MaskedTraceELBO
from pyrovae.registry import METHODS
from pyrovae.sites import inspect_model


def squares(n: int, side: int = 12, size: int = 4, most: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of 0 .. `most` filled size x size squares (OR-ed where they overlap), uniform counts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, most + 1, (n,), generator=g)
    images = torch.zeros(n, side, side)
    for k in range(most):
        at = torch.randint(0, side - size + 1, (n, 2), generator=g)
        for i in torch.nonzero(counts > k).flatten().tolist():
            images[i, at[i, 1] : at[i, 1] + size, at[i, 0] : at[i, 0] + size] = 1
    return images.reshape(n, -1), counts


def small(baseline: bool = True, seed: int = 0) -> tuple[AIR, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    x, counts = squares(600, seed=seed)
    model = AIR((144,), latent=1, steps=2, window=6, hidden=(16,), scale=(2.0, 0.5), presence=0.1)
    return model, build_guide("air", model, x[:32], state=16, hidden=(16,), baseline=baseline), x, counts


def test_a_window_is_drawn_where_its_z_where_puts_it_and_cropped_back():
    """s = 2, (x, y) = (-0.5, 0.25) on a 16 x 16 image: the window covers u in [-0.25, 0.75] and v
    in [-0.625, 0.375], pixels 6..13 across and 3..10 down; the inverse crop gives the patch back."""
    patch = torch.rand(1, 64)
    z_where = torch.tensor([[2.0, -0.5, 0.25]])
    image = window_to_image(z_where, patch, 16).reshape(16, 16)
    assert torch.allclose(image[3:11, 6:14], patch.reshape(8, 8), atol=1e-5)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[3:11, 6:14] = False
    assert image[outside].abs().max() < 1e-6
    assert torch.allclose(image_to_window(z_where, image.reshape(1, 256), 8), patch, atol=1e-5)
    assert torch.allclose(z_where_box(z_where, 16), torch.tensor([[6.0, 3.0, 8.0, 8.0]]))


def test_the_transformer_broadcasts_over_particles():
    z_where, patches = torch.randn(3, 5, 3).abs() + 1, torch.rand(3, 5, 16)
    drawn = window_to_image(z_where, patches, 10)
    assert drawn.shape == (3, 5, 100)
    assert torch.allclose(drawn[2, 4], window_to_image(z_where[2, 4:], patches[2, 4:], 10)[0])
    crops = image_to_window(z_where, torch.rand(5, 100), 4)  # images without the particle dim
    assert crops.shape == (3, 5, 16)


@pytest.mark.parametrize("ratio, steps", [(0.01, 3), (0.5, 2), (1.0, 4)])
def test_the_count_prior_is_the_truncated_geometric(ratio, steps):
    p = continuation_probabilities(ratio, steps).double()
    reach = torch.cat([torch.ones(1, dtype=torch.float64), p.cumprod(0)])  # P(n >= t)
    count = reach - torch.cat([reach[1:], torch.zeros(1, dtype=torch.float64)])
    expected = torch.tensor([ratio**n for n in range(steps + 1)], dtype=torch.float64)
    assert torch.allclose(count, expected / expected.sum(), atol=1e-6)


def test_absent_objects_add_nothing_to_the_bound():
    """z_where and z_what of an absent object are masked in model and guide: the ELBO of a trace
    where every object is absent is the z_pres terms and the blank image's likelihood."""
    model, guide, x, _ = small()
    with torch.no_grad():
        guide.predict[-1].weight[0].zero_(), guide.predict[-1].bias[0].fill_(-100.0)  # the guide finds no object
        guide_trace = pyro.poutine.trace(guide).get_trace(x[:4])
        model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x[:4])
    model_trace.compute_log_prob(), guide_trace.compute_log_prob()
    for name in ("z_where_1", "z_what_1", "z_where_2", "z_what_2"):
        assert (model_trace.nodes[name]["log_prob"] == 0).all() and (guide_trace.nodes[name]["log_prob"] == 0).all(), name
    assert (model_trace.nodes["z_pres_2"]["value"] == 0).all()
    blank = dist.Bernoulli(probs=torch.full((144,), 1e-4)).log_prob(x[:4]).sum(-1)
    assert torch.allclose(model_trace.nodes["x"]["log_prob"], blank, atol=1e-3)


def test_elbo_graph_is_minus_the_elbo_with_pyros_tracegraph_gradient():
    model, guide, x, _ = small()
    batch = x[:16]
    pyro.set_rng_seed(3)
    ours = MaskedGraphELBO().differentiable_loss(model, guide, batch)
    pyro.set_rng_seed(3)
    plain = MaskedTraceELBO().differentiable_loss(model, guide, batch)  # the same draws
    assert torch.allclose(ours, plain)
    ours.backward()
    mine = {n: p.grad.clone() for n, p in [*model.named_parameters(), *guide.named_parameters()]}
    for p in [*model.parameters(), *guide.parameters()]:
        p.grad = None
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    pyro.infer.TraceGraph_ELBO().loss_and_grads(model, guide, batch)
    theirs = dict([*model.named_parameters(), *guide.named_parameters()])
    for name, grad in mine.items():
        assert torch.allclose(grad, theirs[name].grad, rtol=1e-4, atol=1e-5), name
        assert grad.abs().sum() > 0, name  # every parameter, the baseline's too, is reached


def _presence_gradients(model, guide, x, draws: int) -> torch.Tensor:
    """The elbo-graph gradient of the presence predictor's parameters, once per draw: (draws, P)."""
    objective, params = MaskedGraphELBO(), list(guide.predict.parameters())
    out = []
    for _ in range(draws):
        loss = objective.differentiable_loss(model, guide, x)
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def test_the_baseline_reduces_the_variance_of_the_presence_gradient():
    """On a fixed batch, a baseline fitted to the downstream costs (its own parameters only)
    makes the score-function gradient of z_pres at least twice as steady as none at all."""
    model, guide, x, _ = small()
    batch = x[:32]
    optimizer = torch.optim.Adam(guide.baseline.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        MaskedGraphELBO().differentiable_loss(model, guide, batch).backward()
        optimizer.step()
    bare = build_guide("air", model, batch, state=16, hidden=(16,), baseline=False)
    bare.load_state_dict({k: v for k, v in guide.state_dict().items() if not k.startswith("baseline.")})
    pyro.set_rng_seed(5)
    with_baseline = _presence_gradients(model, guide, batch, 40)
    without = _presence_gradients(model, bare, batch, 40)
    spread = lambda g: (g - g.mean(0)).pow(2).sum(1).mean()  # noqa: E731
    assert torch.allclose(with_baseline.mean(0), without.mean(0), atol=3 * (spread(without) / 40).sqrt().item())  # same expectation
    assert spread(with_baseline) < 0.5 * spread(without), (spread(with_baseline), spread(without))


def test_a_small_trained_model_counts_better_than_chance():
    """Squares on 12 x 12 scenes, 0-2 of them: 300 steps of elbo-graph count most scenes right
    (chance is 1/3, the most frequent count about 0.36)."""
    model, guide, x, counts = small()
    method = AmortizedVI(model, guide, TrainSettings(objective="elbo-graph", batch_size=32, lr=3e-3), len(x))
    assert [g["lr"] for g in method.optimizer.param_groups] == [3e-3, 0.1]  # the baseline at its own rate
    for _ in range(300):
        index = torch.randint(0, len(x), (32,))
        method.step(x[index], index)
    inferred, boxes = guide.scenes(x[:300])
    assert (inferred == counts[:300]).float().mean() > 0.6
    assert (boxes[..., 0].isnan().logical_not().sum(-1) == inferred).all()


@torch.no_grad()
def test_the_elbo_bounds_the_importance_sampled_evidence():
    model, guide, x, _ = small()
    pyro.set_rng_seed(1)
    few = evaluate(model, guide, x[:6].repeat(200, 1), num_samples=2)
    elbo, two = few.elbo.reshape(200, -1).mean(0), few.log_likelihood.reshape(200, -1).mean(0)
    many = evaluate(model, guide, x[:6], num_samples=300).log_likelihood
    assert (elbo < two).all() and (two < many).all()


def test_objectives_and_methods_that_cannot_train_it_refuse_in_one_line():
    model, guide, x, _ = small()
    for objective, message in (("elbo", "amortized / elbo it would stay untrained"), ("iwae", "amortized / iwae it would stay untrained")):
        method = AmortizedVI(model, guide, TrainSettings(objective=objective, batch_size=32), len(x))
        with pytest.raises(PyrovaeError, match=message) as error:
            method.step(x[:32], torch.arange(32))
        assert "\n" not in str(error.value)
    waking = METHODS.get("wake-sleep")(model, guide, TrainSettings(objective="elbo-graph", batch_size=32), len(x))
    with pytest.raises(PyrovaeError, match="wake-sleep / elbo-graph it would stay untrained"):
        waking.step(x[:32], torch.arange(32))
    bare = build_guide("air", model, x[:32], state=16, hidden=(16,), baseline=False)
    assert math.isfinite(METHODS.get("wake-sleep")(model, bare, TrainSettings(batch_size=32), len(x)).step(x[:32], torch.arange(32)))
    with pytest.raises(PyrovaeError, match="without reparameterization"):
        AmortizedVI(model, bare, TrainSettings(objective="iwae", batch_size=32), len(x)).step(x[:32], torch.arange(32))
    for name in ("local", "map", "mcmc-em"):
        with pytest.raises(PyrovaeError, match="discrete") as error:
            METHODS.get(name)(model, None, TrainSettings(batch_size=32), len(x), sites=inspect_model(model, x[:32])).step(x[:32], torch.arange(32))
        assert "\n" not in str(error.value)
    with pytest.raises(PyrovaeError, match="square"):
        AIR((60,))
    with pytest.raises(PyrovaeError, match="presence"):
        AIR((64,), presence=0.0)


def test_fit_and_evaluate_from_the_command_line(tmp_path, monkeypatch):
    root = shared("binarized_mnist", "binarized_mnist_train.amat.gz").parents[1]
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path / "cache"))  # offline, and no cache outside the test
    monkeypatch.setenv("PYROVAE_BINARIZED_MNIST_URL", DEAD_URL)
    out = tmp_path / "run"
    args = ["--dataset", "multi-mnist", "--data-option", "canvases=64", "--data-dir", str(root), "--latent", "2", "--hidden", "16",
            "--model-option", "steps=2", "--model-option", "window=10", "--guide-option", "state=16", "--batch-size", "32"]
    result = run_cli("fit", "--model", "air", "--guide", "air", "--objective", "elbo-graph", *args, "--epochs", "1", "--eval-samples", "3",
                     "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "scenes.png").is_file() and not (out / "interpolations.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["count_accuracy"] <= 1 and metrics["count_split"] == "valid" and "count accuracy" in result.stdout
    scored = run_cli("evaluate", str(out), "--samples", "3", "--json", "--data-dir", str(root))
    assert scored.returncode == 0, scored.stderr
    assert 0 <= json.loads(scored.stdout)["count_accuracy"] <= 1
    for objective, method in (("elbo", "amortized"), ("elbo-graph", "map")):
        refused = run_cli("fit", "--model", "air", "--guide", "air", "--objective", objective, "--method", method, *args, "--epochs", "1",
                          "--out", str(tmp_path / "bad"))
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert not (tmp_path / "bad").exists()
    compared = run_cli("compare", "--model", "air", "--guide", "air", "--objective", "elbo-graph", "--methods", "amortized,map", *args,
                       "--steps", "2", "--out", str(tmp_path / "cmp"))
    assert compared.returncode == 2 and len(compared.stderr.strip().splitlines()) == 1 and "discrete" in compared.stderr, compared.stderr
    assert math.isfinite(metrics["elbo"])


def test_a_plain_pyro_programs_nn_baseline_is_trained_and_a_decaying_average_refused():
    """Pyro's own baseline options on a user's functions: an ``nn_baseline`` registered with
    `pyro.module` is found and trained; ``use_decaying_avg_baseline`` (per minibatch position, in
    the param store, outside checkpoints) is refused in one line."""
    net, baseline = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def model(x):
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Bernoulli(0.3 * torch.ones(len(x))))
            pyro.sample("x", dist.Normal(3 * b, 1.0), obs=x)

    def guide(x, options=None):
        pyro.module("net", net)
        pyro.module("baseline", baseline)
        with pyro.plate("data", len(x)):
            infer = {"baseline": options or {"nn_baseline": lambda v: baseline(v[:, None])[:, 0], "nn_baseline_input": x}}
            pyro.sample("b", dist.Bernoulli(torch.sigmoid(net(x[:, None])[:, 0])), infer=infer)

    x = torch.randn(50)
    before = [p.detach().clone() for p in baseline.parameters()]
    method = AmortizedVI(model, guide, TrainSettings(objective="elbo-graph", batch_size=20), 50)
    for index in (torch.arange(20), torch.arange(20, 40), torch.arange(40, 50)):
        method.step(x[index], index)
    assert all((p != q).all() for p, q in zip(baseline.parameters(), before))
    averaged = AmortizedVI(model, lambda x: guide(x, {"use_decaying_avg_baseline": True}), TrainSettings(objective="elbo-graph", batch_size=20), 50)
    with pytest.raises(PyrovaeError, match="use_decaying_avg_baseline") as error:
        averaged.step(x[:20], torch.arange(20))
    assert "\n" not in str(error.value)
