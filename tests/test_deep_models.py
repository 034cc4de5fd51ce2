"""Deeper generative models (Kingma & Welling 2019, ch. 4): hierarchical VAEs and their guides,
learned priors, conv and PixelCNN decoders, free bits, active units, fully observed baselines."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.autograd.functional import jacobian

from pyrovae.cli import main
from pyrovae.conv import MADE, PixelCNN
from pyrovae.diagnostics import active_units
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.experiment import load
from pyrovae.guides import build_guide
from pyrovae.infer import AmortizedVI, TrainSettings
from pyrovae.models import VAE, FlowPrior, Hierarchical, MADEModel, RealNVPModel
from pyrovae.objectives import FreeBitsELBO, make_objective
from pyrovae.sampling import sample

D = 16  # 4x4 images


def _binary(n=5, d=D, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


CASES = [
    ("hier", lambda: Hierarchical((D,), latent=4, hidden=(8,)), ["diagonal", "bottom-up", "top-down"]),
    ("hier3-vamp", lambda: Hierarchical((D,), hidden=(8,), latents=[4, 3, 2], prior="vampprior", pseudo_inputs=3), ["bottom-up", "top-down"]),
    ("hier-flow-conv", lambda: Hierarchical((D,), latent=4, hidden=(8,), prior="flow", decoder="conv"), ["top-down"]),
    ("vae-vamp", lambda: VAE((D,), latent=3, hidden=(8,), prior="vampprior", pseudo_inputs=3), ["diagonal", "bottom-up"]),
    ("vae-flow", lambda: VAE((D,), latent=3, hidden=(8,), prior="flow"), ["diagonal", "iaf"]),
    ("vae-conv", lambda: VAE((D,), latent=3, hidden=(8,), decoder="conv"), ["diagonal"]),
    ("vae-pixelcnn", lambda: VAE((D,), latent=3, hidden=(8,), decoder="pixelcnn", pixel_channels=4, pixel_layers=1), ["diagonal"]),
    ("made", lambda: MADEModel((D,), hidden=(20,)), ["none"]),
    ("realnvp", lambda: RealNVPModel((D,), hidden=(8,), flow_steps=2), ["none"]),
]
TRIPLES = [(name, make, g) for name, make, guides in CASES for g in guides]


@pytest.mark.parametrize("name, make, guide_name", TRIPLES, ids=[f"{n}-{g}" for n, _, g in TRIPLES])
def test_shapes_finite_loss_and_gradients(name, make, guide_name):
    model, x = make(), _binary()
    guide = build_guide(guide_name, model, x, hidden=(8,))
    trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x))).get_trace(x)
    latents = {n: s["value"].shape for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"}
    assert trace.nodes["x"]["value"].shape == (5, D)
    if hasattr(model, "latents"):
        assert latents == {f"z{i + 1}": (5, s) for i, s in enumerate(model.latents)}
    elif name in ("made", "realnvp"):
        assert latents == {}
    else:
        assert latents == {"z": (5, model.latent)}
    loss = make_objective("elbo").differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    params = dict(model.named_parameters()) | {f"guide.{k}": v for k, v in guide.named_parameters()}
    missing = [k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_flow_prior_density_against_autograd_jacobian():
    prior = FlowPrior(3, steps=3, hidden=[8]).double()
    for p in prior.parameters():  # away from the identity at initialization
        torch.nn.init.normal_(p, std=0.5)
    eps = prior.base(4).sample()

    def chain(v):
        for t in prior.transforms():
            v = t(v)
        return v

    z = chain(eps).detach().clone()  # a fresh tensor: log_prob must invert the couplings
    jac = jacobian(chain, eps)
    blocks = torch.stack([jac[i, :, i, :] for i in range(4)])
    expected = prior.base(4).log_prob(eps) - torch.linalg.slogdet(blocks).logabsdet
    assert torch.allclose(prior(4).log_prob(z), expected, atol=1e-8)
    assert (blocks - torch.eye(3, dtype=blocks.dtype)).abs().max() > 1e-2


@pytest.mark.parametrize("likelihood", ["continuous-bernoulli", "bernoulli"])
def test_realnvp_density_against_autograd_jacobian(likelihood):
    model = RealNVPModel((4,), hidden=(8,), flow_steps=3, likelihood=likelihood).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    eps = torch.randn(3, 4, dtype=torch.float64)
    transforms = model.transforms()

    def chain(v):
        for t in transforms:
            v = t(v)
        return v

    x = chain(eps).detach().clone()
    jac = jacobian(chain, eps)
    blocks = torch.stack([jac[i, :, i, :] for i in range(3)])
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(-1) - torch.linalg.slogdet(blocks).logabsdet
    assert torch.allclose(model.distribution(3).log_prob(x), expected, atol=1e-7)


@pytest.mark.parametrize("net", ["pixelcnn", "pixelcnn-conditioned", "made"])
def test_autoregressive_masks_by_gradients(net):
    """Output logit i depends on inputs j < i only (raster order), checked with autograd."""
    side, torch_gen = 5, torch.Generator().manual_seed(1)
    if net == "made":
        f = MADE(side * side, [40, 40])
        z = None
    else:
        f = PixelCNN((side * side,), 2 if net.endswith("conditioned") else None, channels=6, layers=2)
        z = torch.randn(1, 2) if net.endswith("conditioned") else None
    x = torch.rand(1, side * side, generator=torch_gen)
    jac = jacobian(lambda v: f(v, z)[0], x)[:, 0, :]  # (out i, in j)
    d = side * side
    future = torch.triu(torch.ones(d, d, dtype=torch.bool))  # j >= i
    assert jac[future].abs().max() == 0
    assert (jac[~future] != 0).float().mean() > 0.3  # and it does see the past
    assert jac[d - 1, : d - 1].abs().sum() > 0


def test_pixelcnn_sampling_and_exact_likelihood():
    model = VAE((D,), latent=2, hidden=(8,), decoder="pixelcnn", pixel_channels=4, pixel_layers=1)
    images = sample(model, _binary(), 3)
    assert images.shape == (3, D) and ((images >= 0) & (images <= 1)).all()
    d = model.decode(torch.randn(3, 2))
    drawn = d.sample()
    assert ((drawn == 0) | (drawn == 1)).all()
    # exact: the per-image probabilities of all 2^4 images of a 2x2 PixelCNN sum to 1
    small = VAE((16,), latent=2, hidden=(8,), decoder="pixelcnn", pixel_channels=4, pixel_layers=1)
    grid = torch.tensor([[(k >> b) & 1 for b in range(16)] for k in range(2**16)], dtype=torch.float32)
    total = small.decode(torch.randn(1, 2).expand(len(grid), 2)).log_prob(grid).logsumexp(0)
    assert abs(total.item()) < 1e-4


def _fit_guide(model, guide, x, steps=200):
    """A few hundred ELBO steps on the guide alone (the model stays fixed)."""
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.03)
    elbo = make_objective("elbo", num_particles=8)
    for _ in range(steps):
        optimizer.zero_grad()
        elbo.differentiable_loss(model, guide, x).backward()
        for p in model.parameters():
            p.grad = None
        optimizer.step()


def test_hierarchical_elbo_below_is_estimate_and_guides_agree():
    pyro.set_rng_seed(3)
    model = Hierarchical((8,), latents=[2, 1], hidden=(8,))
    x = _binary(4, 8)
    with torch.no_grad():  # reference: log p(x) by sampling the prior (3 latent dimensions)
        z1 = model.conditional(1, torch.randn(400_000, 1)).sample()
        reference = model.decode(z1).log_prob(x[:, None, :]).logsumexp(-1) - torch.log(torch.tensor(4e5))
    for name in ("bottom-up", "top-down"):
        guide = build_guide(name, model, x, hidden=(8,))
        _fit_guide(model, guide, x)
        result = evaluate(model, guide, x, num_samples=20_000)
        assert (result.elbo < result.log_likelihood).all()  # the ELBO is the looser bound
        # and the IS estimate is log p(x), whichever guide proposes
        assert torch.allclose(result.log_likelihood, reference, atol=0.08), (name, result.log_likelihood, reference)


def _grads(objective, model, guide, x):
    model.zero_grad(), guide.zero_grad()
    pyro.set_rng_seed(11)
    objective.differentiable_loss(model, guide, x).backward()
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in [*model.named_parameters(), *(("g." + k, p) for k, p in guide.named_parameters())]}


def test_free_bits_changes_the_gradient_only_below_the_threshold():
    model = Hierarchical((D,), latents=[4, 2], hidden=(8,))
    x = _binary(6)
    guide = build_guide("diagonal", model, x, hidden=(8,))
    plain = FreeBitsELBO(0.0)
    pyro.set_rng_seed(11)
    _, kls, _, _ = plain.terms(model, guide, x)
    kl1, kl2 = kls["z1"].mean().item(), kls["z2"].mean().item()
    assert kl1 != kl2
    # the Trace_ELBO and the unclamped objective agree on the same draws
    pyro.set_rng_seed(11)
    elbo_loss = make_objective("elbo").differentiable_loss(model, guide, x)
    pyro.set_rng_seed(11)
    assert torch.allclose(plain.differentiable_loss(model, guide, x), elbo_loss, rtol=1e-5)

    low, high = sorted([kl1, kl2])
    below_site = "z1" if kl1 < kl2 else "z2"
    g_plain = _grads(plain, model, guide, x)
    assert all(torch.equal(g_plain[k], v) for k, v in _grads(FreeBitsELBO(low - 1e-3), model, guide, x).items())

    class OnlyKL(FreeBitsELBO):  # the gradient of the below-threshold site's KL term alone
        def differentiable_loss(self, model, guide, *args, **kwargs):
            reconstruction, kls, _, scale = self.terms(model, guide, *args, **kwargs)
            return scale * len(reconstruction) * kls[below_site].mean()

    g_fb = _grads(FreeBitsELBO((low + high) / 2), model, guide, x)
    g_kl = _grads(OnlyKL(0.0), model, guide, x)
    changed = False
    for k in g_plain:
        assert torch.allclose(g_fb[k], g_plain[k] - g_kl[k], atol=1e-5), k
        changed |= not torch.allclose(g_fb[k], g_plain[k])
    assert changed
    # above every KL: only the reconstruction's gradient is left
    class Reconstruction(FreeBitsELBO):
        def differentiable_loss(self, model, guide, *args, **kwargs):
            reconstruction, _, _, scale = self.terms(model, guide, *args, **kwargs)
            return -scale * reconstruction.sum()

    g_rec = _grads(Reconstruction(0.0), model, guide, x)
    g_top = _grads(FreeBitsELBO(high + 1.0), model, guide, x)
    assert all(torch.allclose(g_top[k], g_rec[k], atol=1e-6) for k in g_rec)


def test_free_bits_through_make_objective():
    assert isinstance(make_objective("elbo", free_bits=0.5), FreeBitsELBO)
    assert make_objective("elbo-analytic", free_bits=0.5).analytic
    with pytest.raises(PyrovaeError, match="free-bits"):
        make_objective("iwae", free_bits=0.5)


def test_elbo_analytic_refused_for_the_bottom_up_guide():
    model = Hierarchical((D,), latent=4, hidden=(8,))
    x = _binary()
    settings = TrainSettings(objective="elbo-analytic")
    with pytest.raises(PyrovaeError, match="elbo-analytic"):
        AmortizedVI(model, build_guide("bottom-up", model, x, hidden=(8,)), settings, 5)
    for ok in ("top-down", "diagonal"):
        AmortizedVI(model, build_guide(ok, model, x, hidden=(8,)), settings, 5)


def test_top_down_guide_needs_a_hierarchical_model_and_none_needs_no_latents():
    x = _binary()
    with pytest.raises(PyrovaeError, match="conditional_params"):
        build_guide("top-down", VAE((D,), latent=2, hidden=(8,)), x)
    with pytest.raises(PyrovaeError, match="samples nothing"):
        build_guide("none", VAE((D,), latent=2, hidden=(8,)), x)
    with pytest.raises(PyrovaeError, match="square"):
        VAE((10,), latent=2, decoder="conv")


def test_made_with_the_none_guide_elbo_is_the_exact_log_likelihood():
    model = MADEModel((D,), hidden=(20,))
    x = _binary(7)
    guide = build_guide("none", model, x)
    exact = evaluate(model, guide, x, num_samples=1)
    assert torch.equal(exact.elbo, exact.log_likelihood)
    with torch.no_grad():
        assert torch.equal(exact.elbo, model.distribution(len(x)).log_prob(x))
    # with K > 1 the K identical weights go through logsumexp - log K and a mean: float rounding only
    result = evaluate(model, guide, x, num_samples=16)
    assert torch.allclose(result.elbo, result.log_likelihood, atol=1e-5, rtol=0)
    assert torch.allclose(result.elbo, exact.elbo, atol=1e-5, rtol=0)
    # and it is the exact log p(x): the probabilities of all 2^16 binary images sum to one
    grid = torch.tensor([[(k >> b) & 1 for b in range(D)] for k in range(2**D)], dtype=torch.float32)
    assert abs(model.distribution(len(grid)).log_prob(grid).logsumexp(0).item()) < 1e-4


def test_active_units_finds_a_collapsed_unit():
    model = VAE((D,), latent=3, hidden=(8,))
    x = _binary(50)
    guide = build_guide("diagonal", model, x, hidden=(8,))
    head = guide.heads["z"]
    with torch.no_grad():
        head.weight[0].zero_()  # unit 0's mean no longer depends on x
        head.weight[1:3].mul_(10.0)
    result = active_units(model, guide, x, num_samples=200)
    assert result.total == 3 and result.per_site == {"z": 2}
    assert result.activity["z"][0] < 0.01 < result.activity["z"][1:].min()


FAST = ["--epochs", "1", "--hidden", "32", "--latent", "4", "--eval-samples", "10", "--quiet"]


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "hierarchical", "--guide", "top-down", "--layers", "2"],
        ["--prior", "vampprior", "--model-option", "pseudo_inputs=20"],
        ["--decoder", "pixelcnn", "--model-option", "pixel_channels=8"],
        ["--model", "made", "--guide", "none"],
    ],
    ids=["hierarchical-top-down", "vampprior", "pixelcnn", "made"],
)
def test_cli_fit_on_digits(tmp_path, args):
    """metrics.json holds what an independent evaluation of the saved run gives on its split:
    the same ELBO and IS log p(x) (K = 10) within Monte Carlo error, a positive gap of sane
    size (none for a fully observed model), and an IS estimate that more samples (50) do not lower."""
    out = tmp_path / "run"
    assert main(["fit", "--dataset", "digits", "--out", str(out), *args, *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    experiment = load(out)
    experiment.model.eval(), experiment.guide.eval()
    x = experiment.split(metrics["split"])
    assert metrics["split"] == "valid" and metrics["examples"] == len(x) == 300 and metrics["num_samples"] == 10
    runs = []
    for seed in (1, 2, 3):
        pyro.set_rng_seed(seed)
        runs.append(evaluate(experiment.model, experiment.guide, x, num_samples=50 if seed == 3 else 10))
    a, b, more = runs
    for key in ("elbo", "log_likelihood"):
        # metrics - a has the variance of a - b: two independent K = 10 estimates of the same mean
        se = (getattr(a, key) - getattr(b, key)).std().item() / math.sqrt(len(x))
        assert abs(metrics[key] - getattr(a, key).mean().item()) < 5 * se + 1e-4, (key, metrics[key], se)
    se_ll = (a.log_likelihood - b.log_likelihood).std().item() / math.sqrt(len(x))
    gap = metrics["log_likelihood"] - metrics["elbo"]
    if "made" in args:  # no latents: one exact term, ELBO = log p(x)
        assert gap == 0 and torch.equal(a.log_likelihood, b.log_likelihood)
    else:
        assert 0.01 < gap < 20 and abs(gap - metrics["gap"]) < 1e-4
        assert more.log_likelihood.mean().item() > metrics["log_likelihood"] - 5 * se_ll - 1e-4
    assert -60 < metrics["elbo"] < 0  # 64 binary pixels: between 0 and a uniform model's -44.4, give or take


def test_cli_refuses_bad_combinations(capsys):
    assert main(["fit", "--dataset", "digits", "--model", "hierarchical", "--guide", "bottom-up", "--objective", "elbo-analytic", *FAST]) == 2
    assert "elbo-analytic" in capsys.readouterr().err
    assert main(["fit", "--dataset", "digits", "--model", "linear-gaussian", "--prior", "flow", *FAST]) == 2


def test_top_down_guide_with_iaf_steps_per_layer():
    model = Hierarchical((D,), latents=[4, 3], hidden=(8,))
    x = _binary()
    guide = build_guide("top-down", model, x, hidden=(8,), flow_steps=2, flow_hidden=[12])
    loss = make_objective("iwae", num_particles=3).differentiable_loss(model, guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.flows.parameters())
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z1"]["value"].shape == (5, 4) and trace.nodes["z2"]["value"].shape == (5, 3)


def _log_mean_exp(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean exp over the last dimension, and its standard error (delta method)."""
    ratio = (log_w - log_w.max(-1, keepdim=True).values).exp()
    return log_w.logsumexp(-1) - math.log(log_w.shape[-1]), ratio.std(-1) / ratio.mean(-1) / math.sqrt(log_w.shape[-1])


def test_top_down_guide_with_iaf_steps_scores_its_own_density():
    """The transformed q(z1, z2 | x) is a density: E_p(z)[q(z|x) / p(z)] = 1 by sampling the
    prior (a wrong or missing log-det fails), and evaluate's ELBO lies below log p(x) by prior
    sampling (independent draws, so a bound that can fail)."""
    pyro.set_rng_seed(2)
    model = Hierarchical((D,), latents=[4, 3], hidden=(8,))
    x = _binary()
    guide = build_guide("top-down", model, x, hidden=(8,), flow_steps=2, flow_hidden=[12])
    n = 40_000
    with torch.no_grad():
        prior = poutine.trace(model).get_trace(x.repeat_interleave(n, 0))  # z ~ p(z), each x n times
        prior.compute_log_prob()
        z = {name: prior.nodes[name]["value"] for name in ("z1", "z2")}
        q = poutine.trace(poutine.condition(guide, data=z)).get_trace(x.repeat_interleave(n, 0))
        q.compute_log_prob()
        log_ratio = sum(q.nodes[k]["log_prob"] - prior.nodes[k]["log_prob"] for k in z).reshape(len(x), n)
        log_x = prior.nodes["x"]["log_prob"].reshape(len(x), n)
    normalizer, se = _log_mean_exp(log_ratio)
    assert (normalizer.abs() < 5 * se + 1e-3).all(), normalizer / se
    reference, se = _log_mean_exp(log_x)  # log p(x) by sampling the prior
    result = evaluate(model, guide, x, num_samples=2000)
    assert (result.elbo < reference - 5 * se).all()


@pytest.mark.parametrize("make", [lambda: VAE((12,), 3, (8,)), lambda: Hierarchical((12,), 4, (8,), layers=2)])
def test_the_decoder_starts_at_the_data_marginal(make):
    """init_from_data: with the output layer's weights zeroed, p(x|z) is exactly the pixel means."""
    model = make()
    x = torch.bernoulli(torch.linspace(0.05, 0.95, 12).expand(400, 12))
    model.init_from_data(x)
    output = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        output.weight.zero_()
    probs = torch.sigmoid(model.decoder(torch.randn(5, model.latent)))
    assert torch.allclose(probs, x.mean(0).clamp(1e-3, 1 - 1e-3).expand(5, 12), atol=1e-5)


def test_fit_starts_bernoulli_decoders_at_the_marginal_and_leaves_others_alone():
    from pyrovae.experiment import Config, build

    experiment = build(Config(dataset="digits", hidden=(16,), latent=2, likelihood="bernoulli", epochs=0, eval_samples=0))
    output = [m for m in experiment.model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    x = experiment.split("train")
    assert torch.allclose(output.bias, torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)), atol=1e-5)
    gaussian = build(Config(dataset="digits", hidden=(16,), latent=2, likelihood="gaussian", epochs=0, eval_samples=0))
    fresh = [m for m in gaussian.model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert not torch.allclose(fresh.bias[:64], torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)), atol=1e-2)
