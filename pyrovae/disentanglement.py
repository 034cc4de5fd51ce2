r"""Disentanglement metrics: score any representation against ground-truth factors of variation.

A representation is any function from observations to codes, $r(x) \in \mathbb{R}^D$ (a
trained encoder's posterior means, say); the data are discrete factors of variation
$v \in \prod_k \{0, \dots, s_k - 1\}$, drawn uniformly, and the observations rendered from
them. Each metric samples the factors it needs, asks the data for observations and the
representation for their codes, and returns scores in $[0, 1]$, higher for more disentangled
codes; `score` runs several by name.
The definitions and default sample sizes are those of Locatello et al.'s study, whose
implementations (disentanglement_lib) settle the details the papers leave open.

References:
    | Challenging Common Assumptions in the Unsupervised Learning of Disentangled Representations (Locatello et al., 2019), sec. 3 and appendix
    | https://arxiv.org/abs/1811.12359
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pyrovae.errors import PyrovaeError

__all__ = ["METRICS", "SETTINGS", "FactorData", "Representation", "beta_vae_score", "dci", "factor_vae_score", "mig", "sample_factors", "score"]

Representation = Callable[[np.ndarray], np.ndarray]
"""Observations (n, ...) to codes (n, D), anything `np.asarray` reads as floats."""

# at most this many observations go to the representation in one call
_CHUNK = 8192


class FactorData(Protocol):
    """Ground-truth data: discrete factors of variation and observations rendered from them.

    `factor_sizes` may be a plain class or instance attribute; it is declared read-only so
    that a fixed-length tuple (``factor_sizes = (3, 6, 40, 32, 32)``) satisfies it.
    """

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """The number of values of each factor."""
        ...

    def observe(self, factors: np.ndarray) -> np.ndarray:
        """Renders int factor indices (n, K) as observations (n, ...)."""
        ...


def sample_factors(factor_sizes: Sequence[int] | np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Draws `n` factor vectors, each factor uniform over its values, independently.

    Arguments:
        factor_sizes: The number of values $s_k \geq 1$ of each factor.
        n: The number of vectors.
        rng: The random generator.

    Returns:
        The factor indices, int64 of shape (n, K).
    """
    sizes = _sizes(factor_sizes, smallest=1)
    _at_least("n", n, 0)
    return rng.integers(0, sizes, size=(n, len(sizes)), dtype=np.int64)


def beta_vae_score(
    data: FactorData, representation: Representation, rng: np.random.Generator, batch_size: int = 64, train_points: int = 10000, eval_points: int = 5000
) -> float:
    r"""The β-VAE score: how well a linear classifier tells which factor a batch of pairs shares.

    Each point picks a factor $k$ uniformly and draws `batch_size` pairs of factor vectors
    that agree on factor $k$ (the others independently uniform); its feature is the mean over
    pairs of $|r(x_1) - r(x_2)|$ and its label $k$. A logistic regression fitted on
    `train_points` points (features standardized on them) is scored by its accuracy on
    `eval_points` others.

    Arguments:
        data: The ground-truth data.
        representation: The function scored.
        rng: The random generator.
        batch_size: The number of pairs averaged per point.
        train_points: The number of points the classifier is fitted on.
        eval_points: The number of points it is scored on.

    Returns:
        The evaluation accuracy, in $[0, 1]$; chance is $1 / K$.

    References:
        | beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework (Higgins et al., 2017), sec. 3 and appendix
        | https://openreview.net/forum?id=Sy2fzU9gl
    """
    sizes = _metric_sizes(data)
    _at_least("batch_size", batch_size, 1)
    _at_least("train_points", train_points, 2)
    _at_least("eval_points", eval_points, 1)
    train_x, train_y = _beta_vae_points(data, representation, rng, sizes, batch_size, train_points, None)
    eval_x, eval_y = _beta_vae_points(data, representation, rng, sizes, batch_size, eval_points, train_x.shape[1])
    if len(np.unique(train_y)) < 2:
        raise PyrovaeError(f"train_points={train_points} drew a single factor; the β-VAE score needs more training points")
    # disentanglement_lib fits the raw features, on which lbfgs often stops at its iteration limit
    # (their scale is the codes'); standardized, it converges whatever the codes' units
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train_x, train_y)
    return float(np.mean(classifier.predict(eval_x) == eval_y))


def factor_vae_score(
    data: FactorData,
    representation: Representation,
    rng: np.random.Generator,
    batch_size: int = 64,
    train_points: int = 10000,
    eval_points: int = 5000,
    variance_points: int = 10000,
    prune_std: float = 0.05,
) -> float:
    r"""The FactorVAE score: how well the least-varying code dimension tells which factor is fixed.

    The global variance of each code dimension is estimated on `variance_points` random
    observations. Each vote picks a factor $k$ uniformly, draws `batch_size` factor vectors
    with factor $k$ fixed to one random value, and votes for the active dimension whose
    variance over the batch, relative to its global variance, is least. A majority-vote
    classifier (each dimension to the factor it received most training votes for) is fitted
    on `train_points` votes and scored by its accuracy on `eval_points` others.

    A dimension is active when its global standard deviation is positive and at least
    `prune_std`, an absolute threshold as in Locatello et al. (0.05, for codes on the scale of
    a VAE's posterior means, whose collapsed dimensions sit near 0 and informative ones near
    1); `prune_std=0` keeps every non-constant dimension and makes the score invariant to
    rescaling the codes. With no active dimension the score is 0, as in disentanglement_lib.

    Arguments:
        data: The ground-truth data.
        representation: The function scored.
        rng: The random generator.
        batch_size: The number of factor vectors per vote.
        train_points: The number of votes the classifier is fitted on.
        eval_points: The number of votes it is scored on.
        variance_points: The number of observations the global variances are estimated on.
        prune_std: The least global standard deviation of an active dimension.

    Returns:
        The evaluation accuracy, in $[0, 1]$; chance is $1 / K$.

    References:
        | Disentangling by Factorising (Kim & Mnih, 2018), sec. 4
        | https://arxiv.org/abs/1802.05983
    """
    sizes = _metric_sizes(data)
    _at_least("batch_size", batch_size, 2)
    _at_least("train_points", train_points, 1)
    _at_least("eval_points", eval_points, 1)
    _at_least("variance_points", variance_points, 2)
    if not prune_std >= 0:
        raise PyrovaeError(f"prune_std must be at least 0, got {prune_std}")
    codes = _encode(data, representation, sample_factors(sizes, variance_points, rng))
    variances = codes.var(axis=0, ddof=1)
    active = (variances > 0) & (np.sqrt(variances) >= prune_std)
    if not active.any():
        return 0.0
    train_votes = _factor_vae_votes(data, representation, rng, sizes, batch_size, train_points, variances, active)
    eval_votes = _factor_vae_votes(data, representation, rng, sizes, batch_size, eval_points, variances, active)
    # votes[k, j]: how often factor k, held fixed, left dimension j least varying
    classifier = train_votes.argmax(axis=0)
    return float(eval_votes[classifier, np.arange(eval_votes.shape[1])].sum() / eval_votes.sum())


def mig(data: FactorData, representation: Representation, rng: np.random.Generator, points: int = 10000, bins: int = 20) -> float:
    r"""The mutual information gap: per factor, how much more one code dimension knows of it than any other.

    Each code dimension is discretized into `bins` equal-width bins over its range on
    `points` random observations; with $I(z_j; v_k)$ the discrete mutual information of
    binned dimension $j$ and factor $k$, and $H(v_k)$ the factor's entropy, both estimated on
    the sample,

    $$ \mathrm{MIG} = \frac{1}{K} \sum_k \frac{I(z_{j_k}; v_k) - \max_{j \neq j_k} I(z_j; v_k)}{H(v_k)},
       \quad j_k = \arg\max_j I(z_j; v_k) . $$

    Binning is lossless for a code that takes at most `bins` evenly spaced values (a factor's
    index, say) and otherwise a plug-in estimate, biased upwards by about
    $(\text{bins} - 1)(s_k - 1) / 2n$ nats per pair.

    Arguments:
        data: The ground-truth data.
        representation: The function scored, with $D \geq 2$ dimensions.
        rng: The random generator.
        points: The number of observations.
        bins: The number of bins of each code dimension.

    Returns:
        The gap, in $[0, 1]$.

    References:
        | Isolating Sources of Disentanglement in Variational Autoencoders (Chen et al., 2018), sec. 5
        | https://arxiv.org/abs/1802.04942
    """
    sizes = _metric_sizes(data)
    _at_least("points", points, 2)
    _at_least("bins", bins, 1)
    factors = sample_factors(sizes, points, rng)
    codes = _encode(data, representation, factors)
    if codes.shape[1] < 2:
        raise PyrovaeError(f"MIG needs at least 2 code dimensions to take a gap, the representation has {codes.shape[1]}")
    binned = [np.digitize(column, np.histogram_bin_edges(column, bins)[:-1]) for column in codes.T]
    information = np.array([[mutual_info_score(factor, column) for factor in factors.T] for column in binned])  # (D, K)
    entropy = np.array([mutual_info_score(factor, factor) for factor in factors.T])
    if not (entropy > 0).all():
        raise PyrovaeError(f"points={points} drew a single value of factor {int(np.argmin(entropy))}; MIG needs more points")
    top = -np.sort(-information, axis=0)
    return float(np.mean((top[0] - top[1]) / entropy))


def dci(data: FactorData, representation: Representation, rng: np.random.Generator, train_points: int = 10000, test_points: int = 5000) -> dict[str, float]:
    r"""DCI: disentanglement, completeness and informativeness of the codes from per-factor classifiers.

    A classifier per factor $k$ predicts it from the codes; its feature importances make
    column $k$ of the importance matrix $R$ (D × K). With $H_b$ the entropy in base $b$ of a
    row or column normalized to sum to one,

    - disentanglement $= \sum_j \rho_j (1 - H_K(R_{j \cdot}))$, $\rho_j = \sum_k R_{jk} / \sum_{jk} R_{jk}$:
      each code dimension should matter for one factor, the dimensions that matter most weigh most;
    - completeness $= \sum_k \pi_k (1 - H_D(R_{\cdot k}))$, $\pi_k = \sum_j R_{jk} / \sum_{jk} R_{jk}$:
      each factor should be read from one dimension. Every column of importances sums to 1
      (0 for a classifier that never splits), so this is the mean over factors, as in
      disentanglement_lib;
    - informativeness: the classifiers' accuracy, averaged over factors, on the `train_points`
      they were fitted on and on `test_points` others (chance is the mean of $1 / s_k$).

    A zero row or column counts as uniform (score 0, weight 0), and with $D = 1$ a factor's
    column has entropy 0.

    Arguments:
        data: The ground-truth data.
        representation: The function scored.
        rng: The random generator.
        train_points: The number of observations the classifiers are fitted on.
        test_points: The number they are scored on.

    Returns:
        ``disentanglement``, ``completeness``, ``informativeness_train`` and
        ``informativeness_test``, each in $[0, 1]$.

    References:
        | A Framework for the Quantitative Evaluation of Disentangled Representations (Eastwood & Williams, 2018), sec. 3
        | https://openreview.net/forum?id=By-7dz-AZ
    """
    sizes = _metric_sizes(data)
    _at_least("train_points", train_points, 2)
    _at_least("test_points", test_points, 1)
    train_factors, test_factors = sample_factors(sizes, train_points, rng), sample_factors(sizes, test_points, rng)
    train_codes = _encode(data, representation, train_factors)
    test_codes = _encode(data, representation, test_factors, train_codes.shape[1])
    importance = np.zeros((train_codes.shape[1], len(sizes)))
    train_accuracy, test_accuracy = [], []
    for k in range(len(sizes)):
        if len(np.unique(train_factors[:, k])) < 2:
            raise PyrovaeError(f"train_points={train_points} drew a single value of factor {k}; DCI needs more training points")
        # Locatello et al. use gradient-boosted trees (sklearn's GradientBoostingClassifier), which
        # fit one tree per class and boosting round: hours on two cores for factors of 40 values.
        # A random forest fits all classes in each tree; max_features=None lets every split choose
        # among all dimensions as boosted trees do, so no importance is forced onto a dimension
        # because the informative one was left out of a random subset.
        forest = RandomForestClassifier(n_estimators=50, max_depth=8, max_features=None, n_jobs=1, random_state=int(rng.integers(2**31 - 1)))
        forest.fit(train_codes, train_factors[:, k])
        importance[:, k] = np.abs(forest.feature_importances_)
        train_accuracy.append(np.mean(forest.predict(train_codes) == train_factors[:, k]))
        test_accuracy.append(np.mean(forest.predict(test_codes) == test_factors[:, k]))
    return {
        "disentanglement": _weighted_purity(importance),
        "completeness": _weighted_purity(importance.T),
        "informativeness_train": float(np.mean(train_accuracy)),
        "informativeness_test": float(np.mean(test_accuracy)),
    }


_FUNCTIONS: dict[str, Callable[..., Any]] = {"beta-vae": beta_vae_score, "factor-vae": factor_vae_score, "mig": mig, "dci": dci}
METRICS: tuple[str, ...] = tuple(_FUNCTIONS)
# the settings each metric takes after (data, representation, rng)
SETTINGS = {name: tuple(inspect.signature(function).parameters)[3:] for name, function in _FUNCTIONS.items()}


def score(data: FactorData, representation: Representation, metrics: Sequence[str], seed: int = 0, **sizes: Any) -> dict[str, float]:
    """Runs the named metrics on one representation, each with its own generator.

    Metric `name`'s generator is seeded by `(seed, METRICS.index(name))`, so its value does
    not depend on which other metrics run beside it.

    Arguments:
        data: The ground-truth data.
        representation: The function scored.
        metrics: Names from `METRICS` (a single name may be given as a string).
        seed: The non-negative seed the generators derive from.
        sizes: Settings passed to every named metric that takes them (``train_points=1000``).

    Returns:
        One entry per metric, named as the metric; DCI's four are ``dci_disentanglement``,
        ``dci_completeness``, ``dci_informativeness_train`` and ``dci_informativeness_test``.
    """
    names = list(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    for name in names:
        if name not in _FUNCTIONS:
            raise PyrovaeError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    taken = {setting for name in names for setting in SETTINGS[name]}
    for setting in sizes:
        if setting not in taken:
            raise PyrovaeError(f"no metric of {', '.join(names) or 'none'} takes {setting!r}; they take: {', '.join(sorted(taken)) or 'nothing'}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PyrovaeError(f"seed must be a non-negative integer, got {seed!r}")
    scores: dict[str, float] = {}
    for name in names:
        rng = np.random.default_rng([int(seed), METRICS.index(name)])
        value = _FUNCTIONS[name](data, representation, rng, **{key: sizes[key] for key in SETTINGS[name] if key in sizes})
        if isinstance(value, dict):
            scores.update({f"{name}_{key}": entry for key, entry in value.items()})
        else:
            scores[name] = value
    return scores


def _sizes(factor_sizes: Any, smallest: int) -> np.ndarray:
    """`factor_sizes` as an int64 array, each at least `smallest`."""
    sizes = np.asarray(factor_sizes)
    if sizes.ndim != 1 or len(sizes) == 0 or sizes.dtype.kind not in "iu":
        raise PyrovaeError(f"factor_sizes must be a non-empty sequence of integers, got {factor_sizes!r}")
    for k, size in enumerate(sizes.tolist()):
        if size < smallest:
            raise PyrovaeError(f"factor_sizes[{k}] is {size}; every factor needs at least {smallest} value{'s' if smallest > 1 else ''}")
    return sizes.astype(np.int64)


def _metric_sizes(data: FactorData) -> np.ndarray:
    """The factor sizes of data a metric can score: at least 2 factors, each with at least 2 values."""
    sizes = _sizes(data.factor_sizes, smallest=2)
    if len(sizes) < 2:
        raise PyrovaeError(f"disentanglement metrics need at least 2 factors, the data have {len(sizes)}")
    return sizes


def _at_least(name: str, value: Any, smallest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < smallest:
        raise PyrovaeError(f"{name} must be an integer of at least {smallest}, got {value!r}")


def _encode(data: FactorData, representation: Representation, factors: np.ndarray, dims: int | None = None) -> np.ndarray:
    """The codes (n, D) of the observations of `factors`, checked, `_CHUNK` observations a call."""
    parts = []
    for start in range(0, len(factors), _CHUNK):
        block = factors[start : start + _CHUNK]
        observations = data.observe(block)
        if len(observations) != len(block):
            raise PyrovaeError(f"data.observe returned {len(observations)} observations for {len(block)} factor vectors")
        try:
            codes = np.asarray(representation(observations), dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise PyrovaeError(f"the representation's output is not an array of floats: {error}") from error
        if codes.ndim != 2 or codes.shape[0] != len(block) or codes.shape[1] == 0:
            raise PyrovaeError(f"the representation returned codes of shape {codes.shape} for {len(block)} observations; expected ({len(block)}, D)")
        if dims is not None and codes.shape[1] != dims:
            raise PyrovaeError(f"the representation returned {codes.shape[1]} code dimensions, and {dims} before")
        if not np.isfinite(codes).all():
            raise PyrovaeError("the representation returned non-finite codes (NaN or infinity)")
        dims = codes.shape[1]
        parts.append(codes)
    return np.concatenate(parts)


def _beta_vae_points(
    data: FactorData, representation: Representation, rng: np.random.Generator, sizes: np.ndarray, batch_size: int, points: int, dims: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Features (points, D) and labels (points,) of the β-VAE classifier; `dims`: D if known."""
    features, labels = [], []
    per_call = max(1, _CHUNK // (2 * batch_size))
    for start in range(0, points, per_call):
        m = min(per_call, points - start)
        shared = rng.integers(len(sizes), size=m)
        first = sample_factors(sizes, m * batch_size, rng).reshape(m, batch_size, -1)
        second = sample_factors(sizes, m * batch_size, rng).reshape(m, batch_size, -1)
        second[np.arange(m), :, shared] = first[np.arange(m), :, shared]
        codes = _encode(data, representation, np.concatenate([first, second]).reshape(2 * m * batch_size, -1), dims)
        dims = codes.shape[1]
        codes = codes.reshape(2, m, batch_size, dims)
        features.append(np.abs(codes[0] - codes[1]).mean(axis=1))
        labels.append(shared)
    return np.concatenate(features), np.concatenate(labels)


def _factor_vae_votes(
    data: FactorData,
    representation: Representation,
    rng: np.random.Generator,
    sizes: np.ndarray,
    batch_size: int,
    points: int,
    variances: np.ndarray,
    active: np.ndarray,
) -> np.ndarray:
    """Votes (K, active D): how often each fixed factor left each active dimension least varying."""
    votes = np.zeros((len(sizes), int(active.sum())), dtype=np.int64)
    per_call = max(1, _CHUNK // batch_size)
    for start in range(0, points, per_call):
        m = min(per_call, points - start)
        fixed = rng.integers(len(sizes), size=m)
        factors = sample_factors(sizes, m * batch_size, rng).reshape(m, batch_size, -1)
        factors[np.arange(m), :, fixed] = factors[np.arange(m), :1, fixed]
        codes = _encode(data, representation, factors.reshape(m * batch_size, -1), len(variances)).reshape(m, batch_size, -1)
        ratios = codes[:, :, active].var(axis=1, ddof=1) / variances[active]
        np.add.at(votes, (fixed, ratios.argmin(axis=1)), 1)
    return votes


def _weighted_purity(importance: np.ndarray) -> float:
    """Mean over rows of 1 - entropy (base: row length) of the normalized row, weighted by row sums."""
    width = importance.shape[1]
    totals = importance.sum(axis=1, keepdims=True)
    p = np.divide(importance, totals, out=np.full_like(importance, 1.0 / width), where=totals > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    entropy = -(p * logs).sum(axis=1) / np.log(width) if width > 1 else np.zeros(len(p))
    weights = totals[:, 0] / totals.sum() if totals.sum() > 0 else np.full(len(p), 1.0 / len(p))
    return float(np.sum(weights * (1.0 - entropy)))
