"""The solvable toy model of Section 3 and Appendix E: gradient descent on softmax regression
over a Gaussian mixture, measured like a real network (top eigenpairs, ``f_top``, ``c_i²``).

This module is the gradient-descent run (:class:`ToyConfig` → :func:`simulate` →
:class:`ToySimulation`) and helpers for its measurements; the closed forms are in
:mod:`tinysubspace.problems.toy.model` and :mod:`tinysubspace.problems.toy.analytic`.

Gradient descent ``θ_{t+1} = θ_t − η ∇L(θ_t)`` runs in float64 from a seeded Gaussian start; at
log-spaced steps it measures the top ``m + bulk`` Hessian eigenpairs (warm-started from the
previous measurement), ``f_top = ‖V_mᵀ g‖² / ‖g‖²`` (eq. 2) and ``c_i² = (v_i · g)² / ‖g‖²``
(eq. 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinysubspace.linalg.lanczos import top_eigenpairs
from tinysubspace.metrics import eigenvector_overlaps, subspace_overlap, top_fraction
from tinysubspace.problems.toy.model import (
    SoftmaxHessian,
    ToyData,
    data_span_spectrum,
    linearized_gradient_step,
    make_toy_data,
    softmax_gradient,
    softmax_hessian,
    softmax_loss,
)

__all__ = [
    "SoftmaxHessian",
    "ToyConfig",
    "ToyData",
    "ToySimulation",
    "data_span_spectrum",
    "linearized_gradient_step",
    "make_toy_data",
    "measurement_steps",
    "power_law_exponent",
    "sigma_sweep",
    "simulate",
    "softmax_gradient",
    "softmax_hessian",
    "softmax_loss",
    "subspace_overlaps",
]


@dataclass(frozen=True)
class ToyConfig:
    """One run of gradient descent on the toy model (all tensors float64).

    Attributes:
        k, d, n, sigma: classes, dimension, samples, noise scale (footnote 13: d = 1000,
            k = 2, 5, 10, σ = 0, 0.02).
        eta, steps: learning rate and number of full-batch gradient-descent steps.
        biases: add a bias per class (breaks the degeneracy of the top eigenvalues).
        orthogonal: exactly orthonormal means (the analytic case) or independent random unit
            vectors (footnote 13).
        init_std: standard deviation of each initial parameter (seed ``seed + 1``).
        seed: data seed (means and noise).
        measurements: about how many log-spaced steps to measure (0 and powers of 10 added).
        top: size of the top subspace (default ``k``); bulk: further eigenvalues recorded.
        tol: relative residual tolerance of the eigensolver.
    """

    k: int = 2
    d: int = 1000
    n: int = 100
    sigma: float = 0.0
    eta: float = 1.0
    steps: int = 10000
    biases: bool = False
    orthogonal: bool = True
    init_std: float = 0.5
    seed: int = 0
    measurements: int = 30
    top: int | None = None
    bulk: int = 2
    tol: float = 1e-10

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.steps < 1 or self.measurements < 2:
            raise ValueError(f"steps must be ≥ 1 and measurements ≥ 2, got {self.steps} and "
                             f"{self.measurements}")
        if not self.init_std >= 0 or self.bulk < 0:
            raise ValueError(f"init_std and bulk must be non-negative, got {self.init_std} and "
                             f"{self.bulk}")
        p = self.k * (self.d + self.biases)
        if self.num_top < 1 or self.num_top + self.bulk >= p:
            raise ValueError(f"top + bulk = {self.num_top + self.bulk} eigenvalues must be "
                             f"fewer than the p = {p} parameters (and top ≥ 1)")

    @property
    def num_top(self) -> int:
        """Dimension of the top subspace (``top`` or ``k``)."""
        return self.top if self.top is not None else self.k


@dataclass(frozen=True)
class ToySimulation:
    """Measurements of one gradient-descent run, one row per measured step.

    Attributes:
        config, data: what was run.
        steps: ``(T,)`` measured steps ``t`` (parameters before step ``t + 1``).
        parameters, gradients: ``(T, p)`` ``θ(t)`` and ``∇L(θ(t))``.
        loss: ``(T,)``.
        eigenvalues: ``(T, top + bulk)`` largest Hessian eigenvalues, descending.
        eigenvectors: ``(T, p, top)`` the top-subspace eigenvectors.
        residuals: ``(T,)`` largest relative residual ``‖Hv − λv‖ / λ_1`` of the pairs.
        f_top: ``(T,)`` eq. 2 with the top subspace.
        alignment: ``(T, top)`` ``c_i²`` of the gradient with each top eigenvector (eq. 12).
    """

    config: ToyConfig
    data: ToyData
    steps: torch.Tensor
    parameters: torch.Tensor
    gradients: torch.Tensor
    loss: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    f_top: torch.Tensor
    alignment: torch.Tensor

    @property
    def times(self) -> torch.Tensor:
        """``ηt`` at each measurement (float64)."""
        return self.config.eta * self.steps.to(torch.float64)

    def index(self, step: int) -> int:
        """Row of a measured step (ValueError if it was not measured)."""
        hits = (self.steps == step).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"step {step} was not measured; measured: {self.steps.tolist()}")
        return int(hits[0, 0])


def measurement_steps(steps: int, num: int) -> torch.Tensor:
    """About ``num`` log-spaced steps in ``[1, steps]``, plus 0, the powers of 10 and ``steps``."""
    grid = torch.logspace(0, math.log10(steps), max(num - 1, 1), dtype=torch.float64).round()
    decades = torch.tensor([10.0**e for e in range(int(math.log10(steps)) + 1)],
                           dtype=torch.float64)
    extra = torch.tensor([0.0, float(steps)], dtype=torch.float64)
    return torch.unique(torch.cat([grid, decades, extra])).to(torch.int64)


def _measure(theta: torch.Tensor, data: ToyData, config: ToyConfig,
             init: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One row of :class:`ToySimulation` at ``theta`` (plus ``all_vectors``, the warm start of
    the next measurement)."""
    m = config.num_top
    g = softmax_gradient(theta, data, config.biases)
    op = SoftmaxHessian(theta, data, config.biases)
    eig = top_eigenpairs(op, k=m + config.bulk, tol=config.tol, init=init, seed=config.seed,
                         block_size=max(2, m))
    V = eig.vectors[:, :m]
    return {"parameters": theta.clone(), "gradients": g,
            "loss": softmax_loss(theta, data, config.biases).detach(),
            "eigenvalues": eig.values, "eigenvectors": V, "all_vectors": eig.vectors,
            "residuals": eig.residuals.max() / eig.values[0].abs(),
            "f_top": torch.tensor(top_fraction(g, V), dtype=torch.float64),
            "alignment": eigenvector_overlaps(g, V)}


def simulate(config: ToyConfig, data: ToyData | None = None) -> ToySimulation:
    """Full-batch gradient descent ``θ ← θ − η ∇L(θ)`` from a seeded Gaussian start, measured at
    :func:`measurement_steps` (eigenpairs warm-started from the previous measurement).

    Args:
        config: the run.
        data: samples to train on (default ``make_toy_data`` from ``config``).

    Raises:
        ValueError: ``data`` has another number of classes than ``config.k``, or too few
            parameters for ``top + bulk`` eigenpairs.
    """
    data = data if data is not None else make_toy_data(
        config.k, config.d, config.n, config.sigma, config.seed, config.orthogonal)
    p = data.num_parameters(config.biases)
    if data.k != config.k or config.num_top + config.bulk >= p:
        raise ValueError(f"data with k = {data.k} classes and p = {p} parameters do not fit "
                         f"config.k = {config.k} with top + bulk = "
                         f"{config.num_top + config.bulk} eigenpairs")
    gen = torch.Generator().manual_seed(config.seed + 1)
    theta = config.init_std * torch.randn(p, generator=gen, dtype=torch.float64)
    schedule = set(measurement_steps(config.steps, config.measurements).tolist())
    rows: list[dict[str, torch.Tensor]] = []
    init = None
    for step in range(config.steps + 1):
        if step in schedule:
            rows.append(_measure(theta, data, config, init))
            init = rows[-1]["all_vectors"]
        if step < config.steps:
            theta = theta - config.eta * softmax_gradient(theta, data, config.biases)
    fields = ("parameters", "gradients", "loss", "eigenvalues", "eigenvectors", "residuals",
              "f_top", "alignment")
    stacked = {name: torch.stack([row[name] for row in rows]) for name in fields}
    return ToySimulation(config=config, data=data, steps=torch.tensor(sorted(schedule)),
                         **stacked)


def subspace_overlaps(sim: ToySimulation) -> torch.Tensor:
    """``(T, T)`` eq. 5 overlaps of the top subspaces at every pair of measured steps."""
    V = sim.eigenvectors
    T = V.shape[0]
    return torch.tensor([[subspace_overlap(V[i], V[j]) for j in range(T)] for i in range(T)],
                        dtype=torch.float64)


def power_law_exponent(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope ``a`` of ``log y = a log x + b`` (e.g. 2 for ``y ∝ x²``).

    Raises:
        ValueError: ``x`` and ``y`` not 1-D of one length ``≥ 2``, an entry that is not positive
            and finite, or all ``x`` equal (no slope).

    >>> power_law_exponent(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 12.0, 48.0]))
    2.0
    """
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 1 or x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"x and y must be 1-D of one length ≥ 2, got shapes {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    values = torch.cat([x, y])
    if not bool((values > 0).all() and values.isfinite().all()):
        raise ValueError(f"a power law needs positive finite values; got x = {x.tolist()}, "
                         f"y = {y.tolist()}")
    lx, ly = x.log(), y.log()
    lx = lx - lx.mean()
    if not bool((lx != 0).any()):
        raise ValueError(f"all x are equal ({float(x[0])}): the slope is undefined")
    return float((lx * (ly - ly.mean())).sum() / lx.square().sum())


def sigma_sweep(sims: Sequence[ToySimulation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At the last measured step of runs that differ in ``σ``: ``(σ, λ_{m+1}/λ_1, |1 − f_top|)``,
    three ``(len(sims),)`` float64 tensors (the bulk ratio keeps its sign).

    Raises:
        ValueError: no runs, runs of different top-subspace sizes ``m`` or lengths, or a run
            without a bulk eigenvalue (``bulk = 0``).
    """
    if not sims:
        raise ValueError("a σ sweep needs at least one run")
    m, last = sims[0].config.num_top, int(sims[0].steps[-1])
    if any(s.config.num_top != m or int(s.steps[-1]) != last for s in sims):
        raise ValueError("the runs of a σ sweep must share the top-subspace size and last step")
    if any(s.config.bulk < 1 for s in sims):
        raise ValueError("a σ sweep compares the bulk eigenvalue λ_{m+1}: run with bulk ≥ 1")
    sigma = torch.tensor([s.config.sigma for s in sims], dtype=torch.float64)
    bulk = torch.stack([s.eigenvalues[-1, m] / s.eigenvalues[-1, 0] for s in sims])
    defect = torch.stack([(1 - s.f_top[-1]).abs() for s in sims])
    return sigma, bulk, defect
