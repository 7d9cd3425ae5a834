"""Per-block curvature: the spectrum of each diagonal block of an operator, and how much the
blocks' spectra differ (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").

For a partition of the coordinates into blocks ``b`` with selection matrices ``S_b``, the
diagonal block is ``H_bb = S_bᵀ H S_b`` (``p_b × p_b``). For each block this module measures

* the top eigenvalues ``λ_1(H_bb) ≥ … ≥ λ_k(H_bb)`` (thick-restart Lanczos, or ``eigvalsh`` of
  the formed block when ``p_b`` is small);
* the trace by Hutchinson's estimator, ``tr H_bb = E[zᵀ H_bb z]`` for Rademacher ``z``, with the
  standard error ``s / √n_v`` of the ``n_v`` samples (Hutchinson 1989);
* the spectral density ``φ_b`` by stochastic Lanczos quadrature (:mod:`.density`). Its Gauss
  rule for a unit probe ``q = z / ‖z‖`` integrates ``f(t) = t`` exactly:
  ``Σ_j τ_j θ_j = qᵀ H_bb q``, so ``p_b Σ_j τ_j θ_j`` *is* the Hutchinson sample of that
  probe (:func:`density_trace`: the trace costs no products beyond the density).

The block-heterogeneity score is the mean Jensen–Shannon distance between the blocks' densities,

.. math::  h = \\binom{B}{2}^{-1} \\sum_{a < b} \\mathrm{JS}(\\hat\\varphi_a, \\hat\\varphi_b),
           \\qquad \\mathrm{JS}(P, Q) = \\sqrt{\\tfrac12 \\mathrm{KL}(P\\|M) +
           \\tfrac12 \\mathrm{KL}(Q\\|M)}, \\quad M = \\tfrac12 (P + Q),

with logarithms to base 2 (so ``0 ≤ JS ≤ 1``; 0 for identical spectra, 1 for spectra far apart)
and ``φ̂_b`` the Gaussian-broadened densities on one shared grid, normalised to sum to 1. The
raw score compares the spectra as they are (sizes and shapes); the *normalised* score divides
each block's eigenvalues by its ``|λ_1|`` first (:func:`top_scales`), comparing shapes only
(Zhang et al. plot blockwise spectra normalised by their 10th largest eigenvalue). Every
block's SLQ probes are drawn from the same seed, so blocks with identical spectra and bases get
identical densities and a score of exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tinysubspace.linalg.density import (
    SpectralDensity,
    _probe,
    broadened_density,
    density_grid,
    exact_spectrum,
    spectral_density,
)
from tinysubspace.linalg.lanczos import top_eigenpairs
from tinysubspace.linalg.tolerance import check_tol_scale
from tinysubspace.operator import SymmetricOperator

__all__ = [
    "BlockSpectrum",
    "RestrictedOperator",
    "TraceEstimate",
    "block_heterogeneity",
    "block_spectrum",
    "density_trace",
    "heterogeneity_matrix",
    "hutchinson_trace",
    "js_distance",
    "top_scales",
]


class RestrictedOperator(SymmetricOperator):
    """``S_bᵀ A S_b``: the diagonal block of a symmetric operator on the coordinates ``index``.

    A product embeds ``v`` (zeros elsewhere), applies ``A`` and keeps the rows ``index``; it costs
    one product of ``A`` per column. Validation of ``v`` and the count of products
    (:attr:`matvecs`) are the protocol's (:class:`~tinysubspace.operator.SymmetricOperator`).

    Raises:
        ValueError: ``index`` empty, out of range or with repeats.
    """

    def __init__(self, op, index: torch.Tensor | Sequence[int] | slice) -> None:
        p = op.shape[0]
        if isinstance(index, slice):
            index = torch.arange(p)[index]
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= p:
            raise ValueError(f"a block needs indices in [0, {p}), got {index.numel()} of them in "
                             f"[{int(index.min()) if index.numel() else 0}, "
                             f"{int(index.max()) if index.numel() else 0}]")
        if torch.unique(index).numel() != index.numel():
            raise ValueError("a block's indices must not repeat")
        super().__init__(int(index.numel()), op.dtype, op.device)
        self.op, self.index = op, index.to(op.device)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.shape[0], block.shape[1], dtype=self.dtype, device=self.device)
        full[self.index] = block
        return (self.op @ full)[self.index]


class _Adapted(SymmetricOperator):
    """A duck-typed operator (``shape``, ``dtype``, ``device``, ``@``) given the protocol's
    validation and product count."""

    def __init__(self, op) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.op @ block


@dataclass(frozen=True)
class TraceEstimate:
    """``tr A`` estimated from ``samples`` (``value`` = their mean, ``stderr`` = ``s / √n``,
    NaN for one sample; 0 and one sample for an exact trace)."""

    value: float
    stderr: float
    samples: torch.Tensor


def _estimate(samples: torch.Tensor, exact: bool = False) -> TraceEstimate:
    n = samples.numel()
    stderr = 0.0 if exact else (float(samples.std(correction=1)) / math.sqrt(n) if n > 1
                                else math.nan)
    return TraceEstimate(float(samples.mean()), stderr, samples)


def hutchinson_trace(op, probes: int = 10, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of ``tr A``: the mean of ``zᵀ A z`` over ``probes`` Rademacher
    vectors ``z``, in one block product. The probes are drawn on the CPU from ``seed`` as
    :func:`~tinysubspace.linalg.density.spectral_density` draws its own, so an SLQ density of
    the same seed carries the same samples (:func:`density_trace`).

    Raises:
        ValueError: ``probes < 1``.

    >>> from tinysubspace.operator import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> hutchinson_trace(A, probes=4).value  # zᵀ D z = tr D for every ±1 vector
    6.0
    """
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    gen = torch.Generator().manual_seed(int(seed))
    Z = torch.stack([_probe(op.shape[0], "rademacher", gen) for _ in range(probes)], 1).to(
        dtype=op.dtype, device=op.device)
    samples = (Z * (op @ Z)).sum(0).to(device="cpu", dtype=torch.float64)
    return _estimate(samples)


def density_trace(density: SpectralDensity) -> TraceEstimate:
    """The Hutchinson estimate of ``tr A`` carried by an SLQ density: per probe
    ``p Σ_j τ_j θ_j = zᵀ A z`` (module docstring); exact for an exact spectrum."""
    per_probe = density.dimension * density.probes * (density.nodes * density.weights).sum(1)
    return _estimate(per_probe, exact=density.probe == "exact")


@dataclass(frozen=True)
class BlockSpectrum:
    """The curvature of one diagonal block.

    Attributes:
        name: the block's name.
        size: ``p_b``.
        values: ``(min(k, p_b),)`` top eigenvalues, descending (``values``, as in
            :class:`~tinysubspace.linalg.lanczos.Eigenpairs`; ``eigenvalues`` is the old name).
        trace: Hutchinson estimate of ``tr H_bb`` (exact when the block was formed).
        density: its SLQ density (``probe == "exact"``: the exact spectrum, weights ``1/p_b``).
        matvecs: products of the block operator used.
        converged: whether the eigenvalues met the tolerance (always true when formed).
    """

    name: str
    size: int
    values: torch.Tensor
    trace: TraceEstimate
    density: SpectralDensity
    matvecs: int
    converged: bool

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The old name of :attr:`values`."""
        return self.values


def block_spectrum(op, name: str = "", k: int = 5, steps: int = 40, probes: int = 4,
                   seed: int = 0, tol: float = 1e-4, exact_size: int = 64,
                   tol_scale: str = "top") -> BlockSpectrum:
    """Top eigenvalues, trace and density of one (block) operator.

    A block of ``p_b ≤ exact_size`` is formed (``p_b`` products, in one block product) and
    diagonalised: exact eigenvalues, trace and density. A larger one gets ``top_eigenpairs(op,
    k, tol, tol_scale=tol_scale)`` and an SLQ density of ``probes`` Rademacher probes ×
    ``min(steps, p_b)`` steps, whose quadrature also gives the trace (:func:`density_trace`).
    ``tol_scale`` says what ``tol`` is relative to (:mod:`tinysubspace.linalg.tolerance`):
    ``"top"`` (``‖r_i‖ ≤ tol·|λ_1|``) or ``"pair"`` (``‖r_i‖ ≤ tol·|λ_i|``).

    Raises:
        ValueError: ``k``, ``steps`` or ``probes`` below 1, or an unknown ``tol_scale``.
    """
    if min(k, steps, probes) < 1:
        raise ValueError(f"k, steps and probes must be at least 1, got {k}, {steps}, {probes}")
    check_tol_scale(tol_scale)
    p = op.shape[0]
    counted = op if isinstance(op, SymmetricOperator) else _Adapted(op)
    before = counted.matvecs
    if p <= exact_size:
        values = exact_spectrum(counted, block=p).to(device="cpu", dtype=torch.float64)
        density = SpectralDensity(values.flip(0)[None, :], torch.full((1, p), 1.0 / p,
                                                                      dtype=torch.float64),
                                  p, "exact", None)
        return BlockSpectrum(name, p, values[:k], density_trace(density), density,
                             counted.matvecs - before, True)
    eig = top_eigenpairs(counted, min(k, p - 1), tol=tol, seed=seed, tol_scale=tol_scale)
    density = spectral_density(counted, steps=min(steps, p), probes=probes, seed=seed)
    return BlockSpectrum(name, p, eig.values.detach().to(device="cpu", dtype=torch.float64),
                         density_trace(density), density, counted.matvecs - before,
                         eig.converged)


# ------------------------------------------------------------------------------ heterogeneity
def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon distance (base 2, in ``[0, 1]``) of two discrete distributions (each
    normalised to sum 1 here).

    Per entry, with ``m = (p + q)/2`` and ``δ = (p − q)/2``, the divergence's term
    ``½[p log(p/m) + q log(q/m)]`` is computed as ``½[p log1p(δ/m) + q log1p(−δ/m)] ≈ δ²/(2m)``
    where ``|δ/m| < ½``, so that nearly equal distributions do not drown in rounding (the plain form
    leaves an error of about ``1e-16`` in the divergence, ``1e-8`` in the distance).

    Raises:
        ValueError: shapes differ, negative entries, or a zero distribution.

    >>> js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    1.0
    """
    if p.shape != q.shape:
        raise ValueError(f"distributions of different shapes {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    p, q = p.double().reshape(-1), q.double().reshape(-1)
    if bool((p < 0).any() | (q < 0).any()) or not (p.sum() > 0 and q.sum() > 0):
        raise ValueError("distributions must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m, delta = (p + q) / 2, (p - q) / 2
    both = (p > 0) & (q > 0)
    pb, qb, mb = p[both], q[both], m[both]
    r = delta[both] / mb
    near = r.abs() < 0.5  # log1p where p ≈ q; the plain logs elsewhere
    log_p = torch.where(near, torch.log1p(r), torch.log(pb / mb))
    log_q = torch.where(near, torch.log1p(-r), torch.log(qb / mb))
    terms = (pb * log_p + qb * log_q) / 2
    alone = (p + q)[~both] * math.log(2) / 2  # one of p, q is 0 there: ½ a log(a / (a/2))
    divergence = (terms.sum() + alone.sum()) / math.log(2)
    return float(torch.sqrt(divergence.clamp(min=0.0, max=1.0)))


def _densities(spectra: Sequence[SpectralDensity], points: int, sigma: float | None,
               scales: Sequence[float] | None) -> torch.Tensor:
    """``(B, points)`` broadened densities on one grid spanning every block's nodes (each
    divided by its scale)."""
    if scales is not None and len(scales) != len(spectra):
        raise ValueError(f"{len(scales)} scales for {len(spectra)} blocks")
    if scales is not None and not all(math.isfinite(c) and c > 0 for c in scales):
        raise ValueError(f"scales must be positive and finite, got {list(scales)}")
    nodes = [d.nodes / (scales[i] if scales is not None else 1.0)
             for i, d in enumerate(spectra)]
    every = torch.cat([n.reshape(-1) for n in nodes])
    span = float(every.max() - every.min())
    sigma = sigma if sigma is not None else (0.01 * span if span > 0 else 1e-3)
    grid = density_grid(every, sigma, points)
    return torch.stack([broadened_density(n, d.weights, grid, sigma)
                        for n, d in zip(nodes, spectra, strict=True)])


def top_scales(tops: Sequence[float], floor: float = 1e-8) -> list[float]:
    """Per block the scale ``|λ_1(H_bb)|`` that normalises its spectrum to top 1 (Zhang et al.
    plot blockwise spectra so normalised); a block whose ``|λ_1|`` is below ``floor`` times the
    largest one (no curvature to speak of) keeps scale 1."""
    largest = max((abs(t) for t in tops), default=0.0)
    return [abs(t) if abs(t) > floor * largest and abs(t) > 0 else 1.0 for t in tops]


def heterogeneity_matrix(spectra: Sequence[SpectralDensity] | Mapping[str, SpectralDensity],
                         points: int = 2000, sigma: float | None = None,
                         scales: Sequence[float] | None = None) -> torch.Tensor:
    """``(B, B)`` Jensen–Shannon distances between the blocks' densities, broadened by ``σ``
    (default 1% of the span of all nodes) on one grid of ``points`` points. With ``scales``
    the eigenvalues of block ``b`` are divided by ``scales[b]`` first (e.g. :func:`top_scales`:
    shapes compared, sizes not).

    Raises:
        ValueError: fewer than two densities, or scales that do not fit.
    """
    spectra = list(spectra.values()) if isinstance(spectra, Mapping) else list(spectra)
    if len(spectra) < 2:
        raise ValueError(f"heterogeneity compares blocks: need at least 2, got {len(spectra)}")
    rows = _densities(spectra, points, sigma, scales)
    B = len(spectra)
    out = torch.zeros(B, B, dtype=torch.float64)
    for a in range(B):
        for b in range(a + 1, B):
            out[a, b] = out[b, a] = js_distance(rows[a], rows[b])
    return out


def block_heterogeneity(spectra: Sequence[SpectralDensity] | Mapping[str, SpectralDensity],
                        points: int = 2000, sigma: float | None = None,
                        scales: Sequence[float] | None = None) -> float:
    """The block-heterogeneity score ``h``: the mean of :func:`heterogeneity_matrix` over pairs
    of distinct blocks (module docstring)."""
    matrix = heterogeneity_matrix(spectra, points, sigma, scales)
    B = matrix.shape[0]
    return float(matrix.sum() / (B * (B - 1)))
