"""M2 (Kingma et al. 2014) on the labels-as-data contract: its bound against a hand-computed
sum over y, the classification term reaching the classifier, the labels protocol, and
accuracy from unlabelled data beyond what the labels alone give."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from test_user_cli import run_cli
from torch.nn.functional import one_hot, softplus

from pyrovae.cli import main
from pyrovae.data import UNLABELLED, load_dataset
from pyrovae.guides.m2 import M2Guide
from pyrovae.models.semi_supervised import M2
from pyrovae.sites import inspect_model


def tiny(alpha=None):
    pyro.set_rng_seed(0)
    model = M2((6,), latent=2, hidden=(5,), classes=3, alpha=alpha)
    x, y = torch.bernoulli(torch.full((2, 6), 0.5)), torch.tensor([1, UNLABELLED])
    guide = M2Guide(inspect_model(model, (x, y)), (6,), model, hidden=(5,))
    return model, guide, x, y


@torch.no_grad()
def hand_bound(model, guide, x, y, draws=200_000):
    """sum_y q(y|x) [E_q(z|x,y) log p(x|y,z) p(z) / q(z|x,y) + log p(y) - log q(y|x)] per example, by
    direct Monte Carlo over z for each class in turn."""
    total = 0.0
    for i in range(len(x)):
        q = one_hot(y[i], 3).float() if y[i] >= 0 else model.classify(x[i : i + 1]).probs[0]
        for c in range(3):
            if q[c] == 0:
                continue
            onehot = one_hot(torch.tensor(c), 3).float()
            loc, raw = guide.encoder(torch.cat([x[i], onehot])).chunk(2, -1)
            qz = dist.Normal(loc, softplus(raw) + guide.min_scale).to_event(1)
            z = qz.sample((draws,))
            px = model.decode(torch.cat([z, onehot.expand(draws, 3)], -1))
            inner = px.log_prob(x[i]) + dist.Normal(0.0, 1.0).expand([2]).to_event(1).log_prob(z) - qz.log_prob(z)
            total += q[c] * (inner.mean() + math.log(1 / 3) - q[c].log())
    return float(total)


def test_the_bound_is_the_hand_computed_sum_over_y_on_a_labelled_and_an_unlabelled_example():
    model, guide, x, y = tiny()
    model.eval()  # the bound alone: no classification term
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=20_000, vectorize_particles=True)
    with torch.no_grad():
        pyrovae_bound = -elbo.loss(model, guide, x, y)
    assert pyrovae_bound == pytest.approx(hand_bound(model, guide, x, y), abs=0.05)


def test_the_classification_term_trains_the_classifier_on_labels_and_only_in_training():
    model, guide, x, y = tiny(alpha=5.0)
    labelled = (x[:1], y[:1])
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    for training, reaches in ((True, True), (False, False)):
        model.train(training)
        model.zero_grad()
        elbo.differentiable_loss(model, guide, *labelled).backward()
        grads = [p.grad for p in model.classifier.parameters()]
        # a labelled example's bound does not involve q(y|x): only the alpha term can reach it
        assert all((g is not None and g.abs().sum() > 0) == reaches for g in grads), (training, grads)
    model.train(True)
    model.zero_grad()
    elbo.differentiable_loss(model, guide, x[1:], y[1:]).backward()  # unlabelled: through q(y|x) in the bound
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())


def test_the_labels_protocol_is_class_balanced_seeded_and_hides_the_valid_labels():
    data = load_dataset("digits", labels=50)
    train = data.split("train").y
    kept = train[train >= 0]
    assert len(kept) == 50 and torch.bincount(kept, minlength=10).tolist() == [5] * 10
    assert torch.equal(load_dataset("digits", labels=50).split("train").y, train)
    assert not torch.equal(load_dataset("digits", labels=50, seed=1).split("train").y, train)
    assert (data.split("valid").y == UNLABELLED).all() and (data.split("test").y >= 0).all()
    with pytest.raises(Exception, match="labels must be a whole number"):
        load_dataset("digits", labels=5)


def test_m2_on_digits_with_100_labels_beats_a_classifier_of_the_labels_alone(tmp_path):
    from sklearn.linear_model import LogisticRegression

    data = load_dataset("digits", labels=100)
    train, test = data.split("train"), data.split("test")
    labelled = train.y >= 0
    alone = 1 - LogisticRegression(max_iter=2000).fit(train.x[labelled].numpy(), train.y[labelled].numpy()).score(test.x.numpy(), test.y.numpy())
    run = tmp_path / "m2"
    assert main(["fit", "--model", "m2", "--guide", "m2", "--objective", "elbo-enum", "--fields", "x,y", "--data-option", "labels=100",
                 "--epochs", "30", "--latent", "8", "--hidden", "100", "--model-option", "alpha=50", "--eval-samples", "20",
                 "--out", str(run), "--quiet", "--log", "none"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classification_split"] == "test" and metrics["classification_error"] < alone - 0.01, (metrics["classification_error"], alone)
    assert metrics["elbo"] <= metrics["log_likelihood"] + 0.05  # the valid split's labels are hidden: a bound on log p(x)
    for plot in ("confusion.png", "classes.png", "samples.png", "training.png"):
        assert (run / plot).read_bytes()[:4] == b"\x89PNG", plot


def test_the_confusion_matrix_counts_true_classes_by_row(tmp_path):
    from pyrovae.plots import confusion

    counts = confusion(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0]), 3, tmp_path / "c.png", "t")
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]] and (tmp_path / "c.png").exists()


def test_the_mnist_semi_protocol_is_fixed_balanced_and_keeps_the_test_half_apart(monkeypatch, tmp_path):
    from test_data import DEAD_URL, SHARED

    monkeypatch.setenv("PYROVAE_BINARIZED_MNIST_URL", DEAD_URL)  # the withheld test split is not fetched
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path / "cache"))
    if not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the shared MNIST t10k files are not here")
    data = load_dataset("mnist-semi", str(SHARED), labels=100)
    train, valid, test = data.split("train"), data.split("valid"), data.split("test")
    assert (len(train), len(valid), len(test)) == (50_100, 10_000, 5_000)
    labelled = train.y >= 0
    assert torch.bincount(train.y[labelled], minlength=10).tolist() == [10] * 10
    assert labelled[:10_000].sum() == 20  # evenly spread: a prefix holds the same fraction
    assert (valid.y == UNLABELLED).all() and (test.y >= 0).all() and torch.bincount(test.y).min() > 400
    seen = {row.numpy().tobytes() for row in train.x[labelled]}
    assert not seen & {row.numpy().tobytes() for row in test.x}, "a labelled training image is in the test half"
    again = load_dataset("mnist-semi", str(SHARED), labels=100)
    assert torch.equal(again.split("train").x, train.x) and torch.equal(again.split("test").x, test.x)
    other = load_dataset("mnist-semi", str(SHARED), labels=100, seed=1).split("train")
    assert torch.equal(other.x[~labelled], train.x[~labelled]) and not torch.equal(other.x[labelled], train.x[labelled])
    assert set(torch.unique(test.x).tolist()) == {0, 1} and abs(test.x.float().mean().item() - train.x[~labelled].float().mean().item()) < 0.01


# --- stratified minibatches: K labelled examples in every batch, weighted to stay unbiased ---


def test_stratified_minibatches_cover_the_unlabelled_once_and_weigh_each_stratum_exactly():
    from pyrovae.data import stratified_minibatches

    labelled = torch.zeros(103, dtype=torch.bool)
    labelled[torch.tensor([3, 50, 77, 90])] = True
    batches = list(stratified_minibatches(labelled, 10, 3, torch.Generator().manual_seed(0)))
    rows = torch.cat([index for index, _ in batches])
    unlabelled = rows[~labelled[rows]]
    assert sorted(unlabelled.tolist()) == sorted((~labelled).nonzero().squeeze(-1).tolist())  # each unlabelled example once
    assert all(int(labelled[index].sum()) == 3 and labelled[index][:3].all() for index, _ in batches)
    for index, weights in batches:  # with the plate's scale N / B: N_l / K per labelled, N_u / B_u per unlabelled example
        scaled = weights * 103 / len(index)
        assert torch.allclose(scaled[:3], torch.tensor(4 / 3)) and torch.allclose(scaled[3:], torch.tensor(99 / (len(index) - 3)))
    # unbiased: over many epochs the weighted minibatch sums of any f average to its sum over the data set
    f = torch.randn(103)
    estimates = [(f[index] * weights * 103 / len(index)).sum() for epoch in range(300)
                 for index, weights in stratified_minibatches(labelled, 10, 3, torch.Generator().manual_seed(epoch))]
    assert abs(torch.stack(estimates).mean() - f.sum()) < 0.02 * f.abs().sum()


def test_example_weights_multiply_each_examples_terms_of_the_enumerated_bound():
    from pyrovae.infer import AmortizedVI, TrainSettings

    model, guide, x, y = tiny()
    method = AmortizedVI(model, guide, TrainSettings(objective="elbo-enum"), num_examples=2, sites=inspect_model(model, (x, y)))
    batch, index = (x, y), torch.arange(2)

    def loss(weights):
        pyro.set_rng_seed(3)
        return method.loss(batch, index, weights=torch.tensor(weights))

    first = loss([2.0, 1.0]) - loss([1.0, 1.0])  # (Pyro's scales must be positive)
    second = loss([1.0, 1.0]) - first
    pyro.set_rng_seed(3)
    unweighted = method.loss(batch, index)
    assert torch.allclose(loss([0.3, 2.5]), 0.3 * first + 2.5 * second) and torch.allclose(loss([1.0, 1.0]), unweighted)
    assert not torch.allclose(first, second)


def test_stratified_training_resumes_exactly_and_is_refused_where_it_cannot_hold(tmp_path):
    common = ["--model", "m2", "--guide", "m2", "--objective", "elbo-enum", "--fields", "x,y", "--data-option", "labels=50", "--latent", "4",
              "--hidden", "16", "--labelled-per-batch", "20", "--eval-samples", "0", "--quiet", "--log", "none"]
    assert main(["fit", *common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["fit", *common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(["fit", "--resume", "--epochs", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert a["history"][0]["train_loss"] > a["history"][-1]["train_loss"]
    labelled_all = [a for a in common if a != "labels=50" and a != "--data-option"]
    for args, says in [([*common, "--labelled-per-batch", "100"], "less than --batch-size"), ([*common, "--method", "local"], "amortized VI only"),
                       (labelled_all, "both labelled and unlabelled")]:
        done = run_cli("fit", *args, "--epochs", "1", "--out", str(tmp_path / "bad"))
        assert done.returncode == 2 and says in done.stderr and not (tmp_path / "bad").exists(), done.stderr


def test_m1_plus_m2_trains_m2_on_the_posterior_means_of_a_trained_vae(tmp_path):
    """--features RUN: x becomes RUN's encoder posterior (means checked against `TrainedRun.encode`,
    deviations against the guide's; training batches draw from it, held-out rows are the means),
    labels and splits stay; M2 on them trains with a Gaussian likelihood and evaluates again."""
    from pyrovae.experiment import Config, encoded, fit, load
    from pyrovae.trained import load as load_trained

    m1 = tmp_path / "m1"
    fit(Config(dataset="digits", latent=4, hidden=(32,), epochs=3, eval_samples=0, logs="none"), m1, progress=False)
    raw = load_dataset("digits", None, labels=50)
    features = encoded(raw, str(m1))
    trained = load_trained(m1)
    for name in ("train", "valid", "test"):
        expected = trained.encode(raw.batch(name, torch.arange(len(raw.split(name)))))
        assert torch.allclose(features.split(name).x, expected, atol=1e-6)
        assert torch.equal(features.split(name).y, raw.split(name).y)
    assert features.event_shape == (4,) and features.kind == "real"
    from pyro import poutine

    x = raw.batch("train", torch.arange(20))
    scale = poutine.trace(trained.guide).get_trace(x).nodes["z"]["fn"].stddev
    assert torch.allclose(features.split("train").noise[:20], scale, atol=1e-6)
    index, generator = torch.arange(20), torch.Generator().manual_seed(3)
    drawn = features.batch("train", index, generator)  # training rows: a draw of M1's posterior per batch
    expected = features.split("train").x[:20] + scale * torch.randn(drawn.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(drawn, expected, atol=1e-5) and not torch.allclose(drawn, features.batch("train", index, generator))
    assert torch.equal(features.batch("test", index, generator), features.split("test").x[:20])  # held-out rows: the means
    m12 = tmp_path / "m12"
    config = Config(model="m2", guide="m2", objective="elbo-enum", fields="x,y", dataset="digits", dataset_options={"labels": 50},
                    features=str(m1), latent=2, hidden=(16,), epochs=3, eval_samples=5, logs="none", model_options={"alpha": 20.0})
    experiment, metrics = fit(config, m12, progress=False)
    assert experiment.config.likelihood is None and type(experiment.model.likelihood).__name__ == "Gaussian"
    assert 0 <= metrics["classification_error"] <= 1 and math.isfinite(metrics["log_likelihood"])  # how well it learns: benchmarks/semi_supervised.py
    again = load(m12)  # config.json records --features: the run is rebuilt on the same features
    assert torch.equal(again.data.split("test").x, experiment.data.split("test").x)


def test_features_of_a_run_without_an_encoder_or_of_other_examples_are_refused(tmp_path):
    from pyrovae.errors import PyrovaeError
    from pyrovae.experiment import Config, encoded, fit

    fit(Config(dataset="digits", method="map", latent=2, hidden=(8,), epochs=1, eval_samples=0, logs="none"), tmp_path / "map", progress=False)
    with pytest.raises(PyrovaeError, match="no trained encoder"):
        encoded(load_dataset("digits", None), str(tmp_path / "map"))
    fit(Config(dataset="digits", latent=2, hidden=(8,), epochs=1, eval_samples=0, logs="none"), tmp_path / "vae", progress=False)
    other = tmp_path / "other.npy"
    np.save(other, (np.random.default_rng(0).random((200, 10)) > 0.5).astype(np.uint8))
    with pytest.raises(PyrovaeError, match=r"reads examples of shape \(64,\), but .* shape \(10,\)"):
        encoded(load_dataset(str(other), None), str(tmp_path / "vae"))


def tiny_adgm(alpha=None):
    from pyrovae.guides.m2 import ADGMGuide
    from pyrovae.models.semi_supervised import ADGM

    pyro.set_rng_seed(0)
    model = ADGM((6,), latent=2, hidden=(5,), classes=3, alpha=alpha, auxiliary=2)
    x, y = torch.bernoulli(torch.full((2, 6), 0.5)), torch.tensor([1, UNLABELLED])
    guide = ADGMGuide(inspect_model(model, (x, y)), (6,), model, hidden=(5,))
    return model, guide, x, y


@torch.no_grad()
def hand_adgm_bound(model, guide, x, y, draws=200_000):
    """E_q(a|x) [sum_y q(y|a,x) (E_q(z|a,x,y) log p(x|y,z) p(z) p(a|x,y,z) / q(z|a,x,y) + log p(y) - log q(y|a,x))
    - log q(a|x)] per example, by direct Monte Carlo over a and z for each class in turn."""
    total = 0.0
    for i in range(len(x)):
        xi = x[i : i + 1].expand(draws, -1)
        qa = model.auxiliary_posterior(xi)
        a = qa.sample()
        q = one_hot(y[i], 3).float().expand(draws, 3) if y[i] >= 0 else model.classify_given(xi, a).probs
        inner = -qa.log_prob(a)
        for c in range(3):
            onehot = one_hot(torch.tensor(c), 3).float().expand(draws, 3)
            loc, raw = guide.encoder(torch.cat([xi, a, onehot], -1)).chunk(2, -1)
            qz = dist.Normal(loc, softplus(raw) + guide.min_scale).to_event(1)
            z = qz.sample()
            features = torch.cat([z, onehot], -1)
            pa = model._gaussian(model.aux_decoder, torch.cat([xi, features], -1))
            term = (model.decode(features).log_prob(xi) + dist.Normal(0.0, 1.0).expand([2]).to_event(1).log_prob(z) + pa.log_prob(a)
                    - qz.log_prob(z) + math.log(1 / 3) - q[:, c].clamp_min(1e-30).log())
            inner = inner + torch.where(q[:, c] > 0, q[:, c] * term, torch.zeros_like(term))
        total += inner.mean()
    return float(total)


def test_the_adgm_bound_is_the_hand_computed_expectation_over_a_and_sum_over_y():
    model, guide, x, y = tiny_adgm()
    with torch.no_grad():  # q(z|a,x,y) and q(y|a,x) that depend strongly on a: a guide ignoring a must fail
        guide.encoder[0].weight[:, 6:8] *= 20
        model.classifier[0].weight[:, 6:8] *= 20
    model.eval()
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=20_000, vectorize_particles=True)
    with torch.no_grad():
        bound = -elbo.loss(model, guide, x, y)
    assert bound == pytest.approx(hand_adgm_bound(model, guide, x, y), abs=0.08)


def test_the_adgm_classification_term_reaches_q_a_and_q_y_given_a_and_only_in_training():
    model, guide, x, y = tiny_adgm(alpha=5.0)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    for training, reaches in ((True, True), (False, False)):
        model.train(training)
        model.zero_grad()
        elbo.differentiable_loss(model, guide, x[:1], y[:1]).backward()
        grads = [p.grad for p in model.classifier.parameters()]
        assert all((g is not None and g.abs().sum() > 0) == reaches for g in grads), (training, grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_encoder.parameters())  # q(a|x) through the bound
    with pytest.raises(Exception, match="guide of ADGM-like models"):
        from pyrovae.guides import build_guide

        build_guide("adgm", M2((6,), latent=2, hidden=(5,), classes=3), (x, y))
