"""A spectral density as the run store keeps it (``spectrum.npz``, docs/run-store.md)."""

from __future__ import annotations

import numpy as np
import torch

from tinysubspace.linalg.density import SpectralDensity

__all__ = ["density_arrays"]


def density_arrays(density: SpectralDensity, grid: torch.Tensor | None = None,
                   sigma: float | None = None) -> dict[str, object]:
    """The numpy arrays ``spectrum.npz`` holds: ``nodes``, ``weights`` (probes × steps),
    ``grid``, ``density``, ``sigma`` and ``dimension`` (``p``)."""
    sigma = sigma if sigma is not None else density.default_sigma()
    grid, values = density.density(grid, sigma)
    return {"nodes": density.nodes.numpy(), "weights": density.weights.numpy(),
            "grid": grid.numpy(), "density": values.numpy(),
            "sigma": np.float64(sigma), "dimension": np.int64(density.dimension)}
