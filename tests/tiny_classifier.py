"""A tiny float64 classifier and its data, shared by the tracker-mode tests (seconds each).

48 examples of 4 features in 3 classes, a 4-6-3 tanh MLP (p = 51), and one full-batch SGD step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

N, D, C = 48, 4, 3


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)``: ``N`` Gaussian points, classes from two thresholds (seeded)."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.4).long()


def tiny_model() -> nn.Module:
    """The 4-6-3 tanh MLP in float64 (seeded)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


def sgd_step(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, lr: float = 0.5) -> None:
    """One full-batch SGD step on the mean cross-entropy, ``.grad`` cleared after."""
    model.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    model.zero_grad()
