"""The prior, decoder and likelihood registries: lookups, suggestions, and every entry building a model."""

from __future__ import annotations

import itertools

import pyro
import pyro.poutine as poutine
import pytest
import torch

import pyrovae  # noqa: F401  (registers every entry)
from pyrovae import registry
from pyrovae.conv import AutoregressiveBernoulli
from pyrovae.errors import PyrovaeError
from pyrovae.models import VAE, Hierarchical
from pyrovae.models.priors import make_prior

SHAPE = (64,)  # an 8x8 image, flattened
SMALL = dict(latent=2, hidden=(8,), pseudo_inputs=3, prior_steps=1, pixel_layers=1, pixel_channels=4)
# the (decoder, likelihood) pairs a model must refuse: the PixelCNN is a Bernoulli autoregression
INVALID = {("pixelcnn", "gaussian")}
COMBINATIONS = list(itertools.product(registry.PRIORS, registry.DECODERS, registry.LIKELIHOODS))


def binary_images(n: int = 3) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, *SHAPE), 0.5))


def test_the_builtin_names_are_registered():
    assert set(registry.PRIORS) == {"standard", "vampprior", "flow"}
    assert set(registry.DECODERS) == {"mlp", "conv", "pixelcnn"}
    assert set(registry.LIKELIHOODS) == {"bernoulli", "continuous-bernoulli", "gaussian"}
    for reg in (registry.PRIORS, registry.DECODERS, registry.LIKELIHOODS):
        assert all(e.description and "\n" not in e.description for e in reg.entries())


def test_the_old_module_names_are_the_registries():
    from pyrovae.models.priors import PRIORS
    from pyrovae.models.vae import DECODERS
    from pyrovae.nets import LIKELIHOODS

    assert PRIORS is registry.PRIORS and DECODERS is registry.DECODERS and LIKELIHOODS is registry.LIKELIHOODS
    # what pyrovae.experiment does with LIKELIHOODS
    assert "gaussian" in LIKELIHOODS and "gausian" not in LIKELIHOODS
    assert ", ".join(LIKELIHOODS) == "bernoulli, continuous-bernoulli, gaussian"


UNKNOWN = {
    "prior": (dict(prior="vampprio"), "unknown prior 'vampprio': did you mean vampprior"),
    "decoder": (dict(decoder="pixelcn"), "unknown decoder 'pixelcn': did you mean pixelcnn"),
    "likelihood": (dict(likelihood="gausian"), "unknown likelihood 'gausian': did you mean gaussian"),
}


@pytest.mark.parametrize("model", [VAE, Hierarchical], ids=["vae", "hierarchical"])
@pytest.mark.parametrize("kind", list(UNKNOWN))
def test_unknown_names_fail_with_one_suggestion_line(model, kind):
    options, message = UNKNOWN[kind]
    with pytest.raises(PyrovaeError) as error:
        model(SHAPE, **{**SMALL, **options})
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text
    assert text.count("unknown") == 1  # one line from the registry, not a repeated hand-written check


def test_make_prior_suggests_the_close_name():
    with pytest.raises(PyrovaeError, match=r"^unknown prior 'flw': did you mean flow\?$"):
        make_prior("flw", 2, SHAPE, (8,), "tanh")


def test_a_far_name_lists_the_choices():
    with pytest.raises(PyrovaeError, match=r"^unknown decoder 'transformer': choose from conv, mlp, pixelcnn$"):
        VAE(SHAPE, **SMALL, decoder="transformer")


@pytest.mark.parametrize("model", [VAE, Hierarchical], ids=["vae", "hierarchical"])
@pytest.mark.parametrize("prior,decoder,likelihood", COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_each_entry_builds_a_model_that_runs(model, prior, decoder, likelihood):
    if (decoder, likelihood) in INVALID:
        with pytest.raises(PyrovaeError, match="pixelcnn decoder takes --likelihood bernoulli or continuous-bernoulli"):
            model(SHAPE, **SMALL, prior=prior, decoder=decoder, likelihood=likelihood)
        return
    m = model(SHAPE, **SMALL, prior=prior, decoder=decoder, likelihood=likelihood)
    assert isinstance(m.z_prior if model is VAE else m.top_prior, registry.PRIORS.get(prior))
    assert isinstance(m.likelihood, registry.LIKELIHOODS.get(likelihood))
    x = binary_images()
    m.check_data(x)
    trace = poutine.trace(m).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["is_observed"] and site["value"].shape == (3, 64)
    assert site["log_prob"].shape == (3,) and torch.isfinite(site["log_prob"]).all()
    top = "z" if model is VAE else f"z{m.layers}"
    assert trace.nodes[top]["value"].shape == (3, 2) and torch.isfinite(trace.nodes[top]["log_prob"]).all()
    if decoder == "pixelcnn":
        assert isinstance(site["fn"], AutoregressiveBernoulli)
        assert m.elements_per_sample == 64 * (1 + 2 * SMALL["pixel_channels"])
    else:
        assert not isinstance(site["fn"], AutoregressiveBernoulli)
        assert m.elements_per_sample == 64
    assert m.mean(site["fn"]).shape == (3, 64)


def test_the_conv_decoder_refuses_a_head_with_more_outputs(monkeypatch):
    class TwoPerPixel(registry.LIKELIHOODS.get("gaussian")):
        def outputs(self) -> int:
            return 2 * self.dim

    monkeypatch.setitem(registry.LIKELIHOODS._entries, "two-per-pixel", registry.Entry("two-per-pixel", TwoPerPixel, "test"))
    with pytest.raises(PyrovaeError, match="conv decoder emits one value per pixel: the two-per-pixel likelihood needs 128"):
        VAE(SHAPE, **SMALL, decoder="conv", likelihood="two-per-pixel")
    VAE(SHAPE, **SMALL, decoder="mlp", likelihood="two-per-pixel")  # an MLP emits what the head asks for
    pyro.clear_param_store()
