"""Disentanglement metrics on representations whose answer is known: the factors themselves score 1,
a rotation of them scores lower, noise scores chance; MIG matches hand-computed values and is, with
the FactorVAE score, invariant to permuting, rescaling and flipping code dimensions; bad input is
refused in one line."""

import numpy as np
import pytest

from pyrovae.disentanglement import METRICS, beta_vae_score, dci, factor_vae_score, mig, sample_factors, score
from pyrovae.errors import PyrovaeError

SIZES = (3, 6, 10, 8)
# small samples keep the file fast; every metric's noise at these sizes is well inside the margins below
SMALL = dict(batch_size=32, train_points=500, eval_points=500, variance_points=1000, points=2000, test_points=500)


class Factors:
    """Observations that are the factor indices themselves, as floats."""

    def __init__(self, factor_sizes=SIZES):
        self.factor_sizes = tuple(factor_sizes)

    def observe(self, factors):
        return factors.astype(float)


def identity(x):
    return x


def standardized(x, sizes=SIZES):
    """Each factor index shifted and scaled to mean 0 and variance 1 under the uniform distribution."""
    sizes = np.asarray(sizes)
    return (x - (sizes - 1) / 2) / np.sqrt((sizes**2 - 1) / 12)


def rotation(seed, dims=len(SIZES)):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dims, dims)))
    return q * np.sign(np.diag(r))


# A rotation whose most aligned code dimension is the same for two factors (factors 2 and 3
# both load most on dimension 0): the FactorVAE score then cannot reach 1, since one dimension
# votes for two factors. A rotation that pairs factors and dimensions one to one keeps it near 1
# (the score only asks which dimension varies least), so the seed is chosen, and checked below.
ROTATION = rotation(4)


def rotated(x):
    return standardized(x) @ ROTATION.T


def noise_representation(dims=5, seed=7):
    rng = np.random.default_rng(seed)
    return lambda x: rng.normal(size=(len(x), dims))


def entropy(*columns):
    """Plug-in entropy in nats of the joint empirical distribution of the columns."""
    _, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def information(a, b):
    return entropy(a) + entropy(b) - entropy(a, b)


def test_sample_factors_are_uniform_int64_and_reproducible():
    factors = sample_factors(SIZES, 20000, np.random.default_rng(0))
    assert factors.dtype == np.int64 and factors.shape == (20000, 4)
    for k, size in enumerate(SIZES):
        counts = np.bincount(factors[:, k], minlength=size)
        assert len(counts) == size and counts.min() > 0.85 * 20000 / size and counts.max() < 1.15 * 20000 / size
    assert np.array_equal(factors, sample_factors(SIZES, 20000, np.random.default_rng(0)))
    assert sample_factors((1, 2), 5, np.random.default_rng(0))[:, 0].tolist() == [0] * 5


def test_the_factors_themselves_score_one_on_every_metric():
    assert max(SIZES) <= 20  # the default 20 bins then keep every factor value apart: MIG's estimate is lossless
    scores = score(Factors(), identity, METRICS, **SMALL)
    assert scores["beta-vae"] >= 0.99
    assert scores["factor-vae"] == 1.0
    # the second-largest MI is a plug-in estimate between independent variables, biased up by ~(s_j - 1)(s_k - 1) / 2n
    assert scores["mig"] >= 0.99
    assert scores["dci_disentanglement"] >= 0.9 and scores["dci_completeness"] >= 0.9
    assert scores["dci_informativeness_train"] == 1.0 and scores["dci_informativeness_test"] >= 0.99


def test_a_rotation_of_the_factors_scores_lower_on_mig_factor_vae_and_dci_disentanglement():
    aligned = np.abs(ROTATION).argmax(axis=0)
    assert len(set(aligned.tolist())) < len(SIZES)  # see ROTATION
    scores = score(Factors(), rotated, METRICS, **SMALL)
    assert scores["mig"] < 0.3
    assert scores["factor-vae"] < 0.8
    assert scores["dci_disentanglement"] < 0.5 and scores["dci_completeness"] < 0.5
    assert scores["dci_informativeness_train"] > 0.9  # the information is all there, only mixed


def test_noise_scores_chance():
    scores = score(Factors(), noise_representation(), METRICS, **SMALL)
    assert scores["beta-vae"] == pytest.approx(1 / len(SIZES), abs=0.06)
    assert scores["factor-vae"] == pytest.approx(1 / len(SIZES), abs=0.06)
    assert scores["mig"] < 0.02
    assert scores["dci_informativeness_test"] == pytest.approx(np.mean(1 / np.array(SIZES)), abs=0.05)


def test_mig_and_factor_vae_are_invariant_to_permuting_rescaling_and_flipping_dimensions():
    order, scale = np.array([2, 0, 3, 1]), np.array([0.5, -2.0, 3.0, -0.7])
    transformed = lambda x: rotated(x)[:, order] * scale
    rng = lambda: np.random.default_rng(3)
    before = mig(Factors(), rotated, rng(), points=2000), factor_vae_score(Factors(), rotated, rng(), 32, 500, 500, 1000)
    after = mig(Factors(), transformed, rng(), points=2000), factor_vae_score(Factors(), transformed, rng(), 32, 500, 500, 1000)
    assert 0.05 < before[0] < 0.95 and 0.3 < before[1] < 0.95  # not a trivial score that anything would keep
    assert after == pytest.approx(before, abs=1e-12)


# (factor sizes, codes from factors v, population MIG)
HAND = [
    # v1 held twice: its two best codes tie, gap 0; v2 held once, gap H(v2): MIG = (0 + 1) / 2
    ((2, 2), lambda v: v[:, [0, 0, 1]], 0.5),
    # v1 held once: gap 1; v2 (4 values) in full and its high bit alone: gap (H(v2) - H(v2 // 2)) / H(v2) = 1/2
    ((2, 4), lambda v: np.stack([v[:, 1] // 2, v[:, 1], v[:, 0]], axis=1), 0.75),
]


@pytest.mark.parametrize(("sizes", "codes", "expected"), HAND)
def test_mig_equals_its_hand_computed_value(sizes, codes, expected):
    seen = []
    representation = lambda x: seen.append(x) or codes(x).astype(float)
    value = mig(Factors(sizes), representation, np.random.default_rng(0), points=2000)
    assert value == pytest.approx(expected, abs=0.01)
    # and exactly the definition on the sample drawn, from counts (binning loses nothing here)
    (v,) = seen
    v = v.astype(int)
    z = codes(v)
    gaps = []
    for k in range(len(sizes)):
        mi = sorted((information(z[:, j], v[:, k]) for j in range(z.shape[1])), reverse=True)
        gaps.append((mi[0] - mi[1]) / entropy(v[:, k]))
    assert value == pytest.approx(np.mean(gaps), abs=1e-10)


def test_beta_vae_confuses_exactly_the_factors_the_codes_leave_out():
    # factors 2 and 3 are absent from the codes: held fixed, each leaves the features alike,
    # so the classifier tells them apart at chance and the others always: (1 + 1 + 1/2 + 1/2) / 4
    value = beta_vae_score(Factors(), lambda x: x[:, :2], np.random.default_rng(0), batch_size=32, train_points=500, eval_points=1000)
    assert value == pytest.approx(0.75, abs=0.05)


# (factor sizes, codes from factors v, disentanglement, completeness, tolerance); the trees find
# every factor from the codes' first split(s), so the importances are known
DCI_HAND = [
    # v1 held in three dimensions: each dimension is pure (D = 1), but v1's importance spreads over
    # three of four dimensions, C = (1 - log 3 / log 4 + 1) / 2; the spread is the forest's tie-breaking
    ((2, 2), lambda v: v[:, [0, 0, 0, 1]], 1.0, (2 - np.log(3) / np.log(4)) / 2, 0.03),
    # one dimension holds v1 and v2 (2 v1 + v2), one holds v3: each factor lies in one dimension (C = 1);
    # the first dimension weighs 2/3 and splits evenly over two of three factors, D = 2/3 (1 - log 2 / log 3) + 1/3
    ((2, 2, 2), lambda v: np.stack([2 * v[:, 0] + v[:, 1], v[:, 2]], axis=1), 2 / 3 * (1 - np.log(2) / np.log(3)) + 1 / 3, 1.0, 1e-9),
]


@pytest.mark.parametrize(("sizes", "codes", "disentanglement", "completeness", "tolerance"), DCI_HAND)
def test_dci_equals_its_hand_computed_value(sizes, codes, disentanglement, completeness, tolerance):
    scores = dci(Factors(sizes), lambda x: codes(x.astype(int)).astype(float), np.random.default_rng(0), train_points=500, test_points=200)
    assert scores["disentanglement"] == pytest.approx(disentanglement, abs=tolerance)
    assert scores["completeness"] == pytest.approx(completeness, abs=tolerance)
    assert scores["informativeness_test"] == 1.0


def test_factor_vae_prunes_collapsed_dimensions_by_their_absolute_spread():
    with_constant = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)
    assert factor_vae_score(Factors(), with_constant, np.random.default_rng(0), 32, 300, 300, 1000) == 1.0
    # codes of standard deviation below 0.05 count as collapsed, unless prune_std is lowered
    tiny = lambda x: 0.005 * x
    assert factor_vae_score(Factors(), tiny, np.random.default_rng(0), 32, 300, 300, 1000) == 0.0
    assert factor_vae_score(Factors(), tiny, np.random.default_rng(0), 32, 300, 300, 1000, prune_std=0.0) == 1.0


def test_score_seeds_each_metric_apart_from_the_others_and_flattens_dci():
    both = score(Factors(), rotated, ["dci", "mig"], seed=1, points=1000, train_points=300, test_points=300)
    assert list(both) == ["dci_disentanglement", "dci_completeness", "dci_informativeness_train", "dci_informativeness_test", "mig"]
    assert score(Factors(), rotated, "mig", seed=1, points=1000) == {"mig": both["mig"]}
    assert score(Factors(), rotated, "mig", seed=2, points=1000) != {"mig": both["mig"]}
    assert both["mig"] == mig(Factors(), rotated, np.random.default_rng([1, METRICS.index("mig")]), points=1000)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mig(Factors(), lambda x: x[:-1], np.random.default_rng(0), points=100), r"shape \(99, 4\) for 100 observations"),
        (lambda: mig(Factors(), lambda x: x[:, 0], np.random.default_rng(0), points=100), r"shape \(100,\) for 100 observations"),
        (lambda: dci(Factors(), lambda x: np.where(x == 2, np.nan, x), np.random.default_rng(0), 100, 100), "non-finite codes"),
        (lambda: mig(Factors(), lambda x: x[:, :1], np.random.default_rng(0), points=100), "MIG needs at least 2 code dimensions"),
        (lambda: score(Factors(), identity, ["mig", "sap"]), "unknown metric 'sap'; known: beta-vae, factor-vae, mig, dci$"),
        (lambda: score(Factors(), identity, ["dci"], bins=10), "takes 'bins'"),
        (lambda: sample_factors((3, 0), 10, np.random.default_rng(0)), r"factor_sizes\[1\] is 0"),
        (lambda: mig(Factors((3, 1)), identity, np.random.default_rng(0)), r"factor_sizes\[1\] is 1; every factor needs at least 2 values"),
        (lambda: mig(Factors(), identity, np.random.default_rng(0), points=1), "points must be an integer of at least 2"),
        (lambda: factor_vae_score(Factors(), identity, np.random.default_rng(0), batch_size=1), "batch_size must be an integer of at least 2"),
        (lambda: beta_vae_score(Factors(), identity, np.random.default_rng(0), batch_size=0), "batch_size must be an integer of at least 1"),
        (lambda: dci(Factors((2,) * 8), identity, np.random.default_rng(0), train_points=2, test_points=2), "drew a single value of factor"),
    ],
)
def test_bad_input_is_refused_in_one_line(call, message):
    with pytest.raises(PyrovaeError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_a_representation_changing_its_width_between_calls_is_refused():
    calls = []
    representation = lambda x: calls.append(1) or (x if len(calls) == 1 else x[:, :3])
    with pytest.raises(PyrovaeError, match="returned 3 code dimensions, and 4 before"):
        factor_vae_score(Factors(), representation, np.random.default_rng(0), 32, 10, 10, 100)
