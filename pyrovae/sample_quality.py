"""Sample quality on the features of a classifier trained in the project: the Fréchet distance
and the precision and recall of samples.

Inception's weights cannot be downloaded here, so this is not FID: the features are the last
hidden layer of `pyrovae.classifier.Classifier` (an MLP), trained on labelled images of the
data set scored: for binarized MNIST, the labelled half of the MNIST t10k images of `mnist-semi`
(binarized by seeded sampling; accuracy on the other half is reported with the scores). Values
are comparable between runs scored with the same classifier only.

References:
    Heusel et al. (2017), GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium, NeurIPS, sec. 4 (the Fréchet distance of Gaussians fitted to features);
    Kynkäänniemi et al. (2019), Improved Precision and Recall Metric for Assessing Generative
    Models, NeurIPS, sec. 2 (k-nearest-neighbour manifolds, k = 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pyrovae.batch import as_batch
from pyrovae.classifier import Classifier, train_classifier
from pyrovae.data import Dataset, load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.sampling import draw

__all__ = ["FeatureNetwork", "feature_network", "frechet_distance", "precision_recall", "score_samples"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to features ``(n, d)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise PyrovaeError(f"the Fréchet distance needs two sets of at least 2 feature rows of one width, got {a.shape} and {b.shape}")
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric form that stays exact
    # where a covariance is singular (ReLU features that never fire), unlike scipy's sqrtm of S_a S_b
    w, v = np.linalg.eigh(cov_a)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cov_b @ half), 0.0, None)).sum()
    return float(mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of `a` and of `b` (torch's cdist: no (n, m, d) array)."""
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row."""
    return np.concatenate([np.sort(_distances(x[i:i + 1000], x), axis=1)[:, k] for i in range(0, len(x), 1000)])  # column 0: the row itself


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each point lies in some centre's ball."""
    return np.concatenate([(_distances(points[i:i + 1000], centres) <= radii[None, :]).any(1) for i in range(0, len(points), 1000)])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision (the share of samples inside the real features' k-NN manifold) and recall (the
    share of real features inside the samples' manifold)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise PyrovaeError(f"precision and recall with k = {k} need more than {k} real and sampled rows, got {len(real)} and {len(fake)}")
    return float(_covered(fake, real, _radii(real, k)).mean()), float(_covered(real, fake, _radii(fake, k)).mean())


@dataclass
class FeatureNetwork:
    """A trained `Classifier` whose features score samples, and its held-out accuracy."""

    classifier: Classifier
    accuracy: float
    source: str

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.classifier.features(part.float().cpu()) for part in x.split(1000)]).numpy()


def _labelled(data: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    part = data.splits.get(split)
    if part is None or part.y is None or not bool((part.y >= 0).any()):
        return None
    keep = part.y >= 0
    return part.x[keep].float(), part.y[keep]


def feature_network(data: Dataset, data_dir: str | Path | None = None, seed: int = 0) -> FeatureNetwork:
    """The feature classifier for images of `data`: trained on its labelled training split (and
    scored on its test or valid split), or for binarized MNIST on `mnist-semi`'s labelled pool."""
    if data.kind != "binary" or data.image_shape is None:
        raise PyrovaeError(f"sample quality is measured on binary images; data set {data.name!r} holds {data.kind} data")
    source, labelled = data, _labelled(data, "train")
    if labelled is None and data.name == "binarized-mnist":
        source = load_dataset("mnist-semi", data_dir, labels=4000)  # 400 of each class: the labelled pool holds at least 432 of each
        labelled = _labelled(source, "train")
    if labelled is None:
        raise PyrovaeError(f"data set {data.name!r} has no labelled images to train the feature classifier on")
    held = _labelled(source, "test") or _labelled(source, "valid")
    classifier = train_classifier(*labelled, seed=seed)
    accuracy = float((classifier.predict(held[0]) == held[1]).float().mean()) if held is not None else float("nan")
    return FeatureNetwork(classifier, accuracy, f"an MLP (256-256) trained on the {len(labelled[0])} labelled training images of {source.name}")


class Run(Protocol):
    """What scoring reads of a run (`pyrovae.experiment.Experiment`, a layer above)."""

    @property
    def data(self) -> Dataset: ...

    @property
    def model(self) -> Callable: ...

    @property
    def config(self) -> Any: ...

    def split(self, name: str) -> Any: ...

    def train_mode(self, training: bool) -> None: ...


def score_samples(run: Run, num: int = 5000, seed: int = 0, split: str = "valid", network: FeatureNetwork | None = None) -> dict[str, Any]:
    """The Fréchet distance, precision and recall of `num` draws x ~ p(x) of the run's model
    against `num` held-out images of `split`; beside them the same of the training images (the
    floor a perfect model would reach, up to sampling)."""
    if num < 10:
        raise PyrovaeError(f"--samples must be at least 10, got {num}")
    start = time.perf_counter()
    network = network or feature_network(run.data, run.config.data_dir, seed)
    real = as_batch(run.split(split)).primary[:num].cpu()
    train = as_batch(run.split("train")).primary[:len(real)].cpu()
    run.train_mode(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fake = torch.cat([draw(run.model, real[:1], min(1000, len(real) - i)).cpu() for i in range(0, len(real), 1000)])
    f_real, f_fake, f_train = (network.features(x) for x in (real, fake, train))
    precision, recall = precision_recall(f_real, f_fake)
    floor_precision, floor_recall = precision_recall(f_real, f_train)
    return {"samples": len(real), "split": split, "features": network.source, "feature_classifier_accuracy": network.accuracy,
            "fd": frechet_distance(f_real, f_fake), "precision": precision, "recall": recall,
            "fd_train_images": frechet_distance(f_real, f_train), "precision_train_images": floor_precision, "recall_train_images": floor_recall,
            "score_seconds": time.perf_counter() - start}
