"""A small classifier trained in the project, for scoring a model's samples: the share of
samples showing a class (feature unlearning) and the features a Fréchet distance compares.

References:
    Heusel et al. (2017), GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium, sec. 4 (the Fréchet distance on a classifier's features; theirs is Inception's).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.errors import PyrovaeError

__all__ = ["Classifier", "train_classifier"]


class Classifier(nn.Module):
    """An MLP from flat images to class logits; `features` are its last hidden layer."""

    def __init__(self, dim: int, classes: int, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        sizes = [dim, *hidden]
        self.trunk = nn.Sequential(*[layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(sizes[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.reshape(len(x), -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(part).argmax(-1) for part in x.split(1000)])


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     hidden: tuple[int, ...] = (256, 256)) -> Classifier:
    """A `Classifier` fitted by Adam on labelled flat images `x` ``(n, D)`` and labels ``0..C-1``,
    in evaluation mode. Labels below 0 (unlabelled) are left out."""
    keep = y >= 0
    x, y = x[keep].float(), y[keep].long()
    if len(x) < 10 or len(torch.unique(y)) < 2:
        raise PyrovaeError(f"a classifier needs at least 10 labelled examples of 2 classes, got {len(x)} of {len(torch.unique(y))}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Classifier(x.shape[1], int(y.max()) + 1, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.enable_grad():  # also when called from scoring code under no_grad
        for _ in range(epochs):
            for index in torch.randperm(len(x), generator=generator).split(batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
    return model.eval()
