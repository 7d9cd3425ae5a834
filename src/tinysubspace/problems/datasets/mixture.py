"""The Gaussian mixture of Section 3 (footnote 13), generated in one place.

``k`` classes with unit means ``μ_1 … μ_k`` in ``R^d`` (random directions, or orthonormal ones),
and samples ``x_a = μ_{y_a} + σ ε_a`` with ``ε_a ~ N(0, I_d)`` and balanced labels
``y_a = a mod k``. Both the toy model (:func:`tinysubspace.problems.toy.make_toy_data`) and the
``gaussian-mixture`` data set draw from here, so one seed gives one data set: the training split
is exactly the toy model's data (in float32), and the test split shares its means.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["gaussian_mixture_means", "sample_gaussian_mixture"]


def _means(k: int, d: int, generator: torch.Generator, orthogonal: bool) -> torch.Tensor:
    raw = torch.randn(d, k, generator=generator, dtype=torch.float64)
    return (torch.linalg.qr(raw).Q if orthogonal else raw / raw.norm(dim=0)).T.contiguous()


def _check(k: int, d: int, orthogonal: bool) -> None:
    if k < 1 or d < 1:
        raise ValueError(f"k (classes) and d (dimension) must be positive, got k={k}, d={d}")
    if orthogonal and k > d:
        raise ValueError(f"{k} orthogonal means do not fit in dimension {d}")


def gaussian_mixture_means(k: int, d: int, seed: int = 0, orthogonal: bool = False
                           ) -> torch.Tensor:
    """The class means (rows of a ``(k, d)`` float64 tensor) of the mixture with this seed:
    random unit vectors in ``R^d``, or orthonormal ones (``orthogonal``).

    Raises:
        ValueError: ``k`` or ``d`` not positive, or ``k > d`` with ``orthogonal``.
    """
    _check(k, d, orthogonal)
    return _means(k, d, torch.Generator().manual_seed(seed), orthogonal)


def sample_gaussian_mixture(k: int, d: int, n: int, sigma: float, seed: int = 0,
                            orthogonal: bool = False, split: str = "train"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs (n, d), labels (n,), means (k, d))`` in float64, labels ``a mod k``.

    The ``train`` split draws the means and then the noise from one generator seeded with
    ``seed``, so the noise ``ε`` is the same whatever ``σ`` is (a clean ``σ`` sweep); any other
    split keeps the means and draws its noise from a generator of its own.

    Raises:
        ValueError: ``k``, ``d`` or ``n`` not positive, ``σ < 0``, or ``k > d`` with
            ``orthogonal``.
    """
    _check(k, d, orthogonal)
    if n < 1 or not sigma >= 0:
        raise ValueError(f"n must be positive and sigma non-negative, got n={n}, sigma={sigma}")
    generator = torch.Generator().manual_seed(seed)
    means = _means(k, d, generator, orthogonal)
    if split != "train":
        digest = hashlib.sha256(f"gaussian-mixture/{seed}/{split}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    labels = torch.arange(n) % k
    noise = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return means[labels] + sigma * noise, labels, means
