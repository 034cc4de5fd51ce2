"""Sample quality: the Fréchet distance against its closed form, precision and recall on cases
with known answers, and `pyrovae score` on a run's samples."""

import json

import numpy as np
import pytest
import scipy.linalg

from pyrovae.cli import main
from pyrovae.errors import PyrovaeError
from pyrovae.sample_quality import frechet_distance, precision_recall


def _gaussian_fd(mu_a, cov_a, mu_b, cov_b) -> float:
    root = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_the_frechet_distance_of_fitted_gaussians_meets_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu_a, mu_b = np.zeros(4), np.array([1.0, -2.0, 0.0, 0.5])
    x = rng.multivariate_normal(mu_a, cov_a, 200000)
    y = rng.multivariate_normal(mu_b, cov_b, 200000)
    exact = _gaussian_fd(mu_a, cov_a, mu_b, cov_b)
    assert abs(frechet_distance(x, y) - exact) < 0.02 * exact
    # on the samples' own moments it is the closed form to rounding, symmetric, and 0 against itself
    fitted = _gaussian_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isclose(frechet_distance(x, y), fitted, rtol=1e-6) and np.isclose(frechet_distance(y, x), fitted, rtol=1e-6)
    assert abs(frechet_distance(x[:1000], x[:1000])) < 1e-6


def test_a_feature_that_never_fires_adds_nothing():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 3)), rng.normal(size=(500, 3)) + 1.0
    dead = np.zeros((500, 1))
    assert np.isclose(frechet_distance(np.hstack([x, dead]), np.hstack([y, dead])), frechet_distance(x, y), rtol=1e-6)
    with pytest.raises(PyrovaeError, match="one width"):
        frechet_distance(x, y[:, :2])


def test_precision_and_recall_tell_poor_samples_from_missing_modes():
    rng = np.random.default_rng(2)
    modes = np.array([[0.0, 0.0], [20.0, 0.0]])
    real = np.concatenate([rng.normal(size=(300, 2)) + m for m in modes])
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    one_mode = rng.normal(size=(600, 2))  # all samples in the first mode
    precision, recall = precision_recall(real, one_mode)
    assert precision > 0.95 and 0.4 < recall < 0.6
    far = rng.normal(size=(600, 2)) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    with pytest.raises(PyrovaeError, match="more than 3"):
        precision_recall(real, far[:3])


def test_score_reports_the_quality_of_a_runs_samples_beside_the_data_floor(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--dataset", "digits", "--latent", "4", "--hidden", "32", "--epochs", "5", "--eval-samples", "0", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["score", str(run), "--samples", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["feature_classifier_accuracy"] > 0.85 and result["samples"] == 300
    assert result["fd"] > result["fd_train_images"] >= 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result == json.loads((run / "scores-0.json").read_text())
    assert main(["score", str(run), "--metrics", "mig"]) == 2  # digits have no ground-truth factors
    assert "no ground-truth factors" in capsys.readouterr().err
