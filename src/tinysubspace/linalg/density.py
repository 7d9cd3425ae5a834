"""The Hessian's eigenvalue density: stochastic Lanczos quadrature (SLQ) and, for small ``p``,
the exact spectrum.

The spectral density of a symmetric ``p × p`` operator ``A`` with eigenvalues ``λ_1 … λ_p`` is

.. math::  \\phi(t) = \\frac{1}{p} \\sum_{i=1}^{p} \\delta(t - \\lambda_i),
           \\qquad \\phi_\\sigma(t) = \\frac{1}{p} \\sum_{i=1}^{p} g_\\sigma(t - \\lambda_i),

with ``g_σ`` the Gaussian of width ``σ`` (the broadened density). For a unit probe ``v`` with
``E[v vᵀ] = I/p`` (Rademacher or Gaussian entries, normalised), ``vᵀ f(A) v`` is an unbiased
estimate of ``(1/p) Tr f(A) = ∫ f φ``. ``m`` Lanczos steps from ``v`` give a tridiagonal
``T_m = Y diag(θ) Yᵀ``; the Gauss quadrature ``Σ_j τ_j f(θ_j)`` with nodes ``θ_j`` and weights
``τ_j = (e_1ᵀ y_j)²`` (summing to 1) is exact for polynomials of degree ``< 2m``. Averaging over
``n_v`` probes:

.. math::  \\phi(t) \\approx \\frac{1}{n_v} \\sum_{l=1}^{n_v} \\sum_{j=1}^{m}
           \\tau_j^{(l)}\\, \\delta(t - \\theta_j^{(l)})

(Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019; PAPER.txt, Appendix B, Figs. 4–5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinysubspace.linalg.tridiagonal import lanczos_tridiagonal
from tinysubspace.operator import vector_space

__all__ = [
    "SpectralDensity",
    "broadened_density",
    "default_sigma",
    "density_grid",
    "exact_spectrum",
    "spectral_density",
]

PROBES = ("rademacher", "gaussian")


def broadened_density(values: torch.Tensor, weights: torch.Tensor | None, grid: torch.Tensor,
                      sigma: float) -> torch.Tensor:
    """``Σ_j w_j g_σ(t − x_j)`` on ``grid`` for point masses ``w_j`` at ``x_j``.

    Args:
        values: locations ``x_j`` (any shape; flattened).
        weights: masses ``w_j`` of the same shape, or ``None`` for ``1 / len(values)`` each
            (the exact density of a spectrum).
        grid: ``(n,)`` points ``t`` at which to evaluate.
        sigma: width of the Gaussian, ``> 0``.

    Returns:
        ``(n,)`` float64 density; it integrates to ``Σ_j w_j`` over the real line.

    Raises:
        ValueError: ``sigma`` not positive, or ``weights`` of another shape than ``values``.

    >>> t = torch.tensor([0.0])
    >>> round(float(broadened_density(torch.tensor([0.0]), None, t, 1.0)[0]), 6)  # 1/sqrt(2π)
    0.398942
    """
    if not sigma > 0:
        raise ValueError(f"the broadening sigma must be positive, got {sigma}")
    x = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if weights is None:
        w = torch.full_like(x, 1.0 / max(x.numel(), 1))
    else:
        if weights.shape != values.shape:
            raise ValueError(f"weights have shape {tuple(weights.shape)} but values have shape "
                             f"{tuple(values.shape)}")
        w = weights.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    t = grid.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    z = (t[:, None] - x[None, :]) / sigma
    return (torch.exp(-0.5 * z * z) @ w) / (sigma * math.sqrt(2 * math.pi))


def default_sigma(nodes: torch.Tensor) -> float:
    """A broadening width for point masses at ``nodes``: 1% of their span (``1e-3`` if they
    coincide)."""
    span = float(nodes.max() - nodes.min())
    return 0.01 * span if span > 0 else 1e-3


def density_grid(nodes: torch.Tensor, sigma: float, points: int = 1000,
                 pad: float = 6.0) -> torch.Tensor:
    """``points`` equally spaced float64 values from ``min(nodes) − pad·σ`` to
    ``max(nodes) + pad·σ``: where a density broadened by ``σ`` lives."""
    low = float(nodes.min()) - pad * sigma
    high = float(nodes.max()) + pad * sigma
    return torch.linspace(low, high, points, dtype=torch.float64)


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ estimate of a spectral density: one Gauss quadrature rule per probe.

    Attributes:
        nodes: ``(probes, steps)`` float64 Ritz values ``θ_j^{(l)}`` (ascending per row). A probe
            whose Krylov space became invariant after ``m < steps`` steps has its row padded with
            its largest node at weight 0.
        weights: ``(probes, steps)`` float64 ``τ_j^{(l)} / n_v``; every row sums to ``1 / n_v``,
            the whole array to 1.
        dimension: ``p``, the size of the operator.
        probe: ``"rademacher"`` or ``"gaussian"``.
        seed: the seed the probes were drawn from (``None`` if a generator was passed).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dimension: int
    probe: str
    seed: int | None

    @property
    def probes(self) -> int:
        """``n_v``, the number of probe vectors."""
        return int(self.nodes.shape[0])

    @property
    def steps(self) -> int:
        """``m``, the number of Lanczos steps per probe."""
        return int(self.nodes.shape[1])

    def default_sigma(self) -> float:
        """A broadening width: :func:`default_sigma` of the nodes."""
        return default_sigma(self.nodes)

    def grid(self, points: int = 1000, sigma: float | None = None,
             pad: float = 6.0) -> torch.Tensor:
        """:func:`density_grid` of the nodes (``σ`` default: :meth:`default_sigma`)."""
        sigma = sigma if sigma is not None else self.default_sigma()
        return density_grid(self.nodes, sigma, points, pad)

    def density(self, grid: torch.Tensor | None = None,
                sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian-broadened density ``φ_σ`` on a grid.

        .. math::  \\phi_\\sigma(t) = \\frac{1}{n_v} \\sum_{l,j} \\tau_j^{(l)}
                   g_\\sigma(t - \\theta_j^{(l)})

        Args:
            grid: where to evaluate (default :meth:`grid`).
            sigma: the Gaussian width (default :meth:`default_sigma`).

        Returns:
            ``(grid, density)``, both ``(n,)`` float64; the density integrates to 1.
        """
        sigma = sigma if sigma is not None else self.default_sigma()
        grid = grid if grid is not None else self.grid(sigma=sigma)
        return grid, broadened_density(self.nodes, self.weights, grid, sigma)


def _probe(p: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A probe of length ``p`` drawn on the CPU (identical on every device)."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, (p,), generator=generator, dtype=torch.int64)
        return (2 * bits - 1).to(torch.float64)
    return torch.randn(p, generator=generator, dtype=torch.float64)


def _quadrature(op, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes and weights (padded to ``steps``) of one Lanczos run."""
    tri = lanczos_tridiagonal(op, start, steps)
    theta, Y = torch.linalg.eigh(tri.matrix().detach().to(device="cpu", dtype=torch.float64))
    tau = Y[0, :].square()
    pad = steps - theta.numel()
    if pad:
        theta = torch.cat([theta, theta[-1].repeat(pad)])
        tau = torch.cat([tau, tau.new_zeros(pad)])
    return theta, tau / tau.sum()


def spectral_density(op, steps: int = 90, probes: int = 1,
                     seed: int | torch.Generator = 0,
                     probe: str = "rademacher") -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the spectral density of ``op``.

    Each probe costs ``steps`` operator products (one data pass each for a Hessian) and keeps
    ``steps`` vectors of length ``p`` (full reorthogonalisation).

    Args:
        op: a symmetric operator (``shape``, ``dtype``, ``device``, ``@``).
        steps: Lanczos steps per probe, ``1 ≤ steps ≤ p``.
        probes: number of independent probe vectors ``n_v ≥ 1``.
        seed: an ``int`` seed or a CPU ``torch.Generator``; probes are drawn on the CPU.
        probe: ``"rademacher"`` (entries ±1) or ``"gaussian"``.

    Returns:
        a :class:`SpectralDensity` with ``(probes, steps)`` nodes and weights.

    Raises:
        ValueError: ``steps`` outside ``[1, p]``, ``probes < 1`` or an unknown ``probe``.

    >>> from tinysubspace.operator import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> dens = spectral_density(A, steps=3, probes=1, seed=0)
    >>> [round(float(x), 6) for x in dens.nodes[0]], round(float(dens.weights.sum()), 12)
    ([1.0, 2.0, 3.0], 1.0)
    """
    space = vector_space(op)
    p = space.dim  # the global dimension; a sharded operator's vectors are its local rows
    if not 1 <= steps <= p:
        raise ValueError(f"steps must be between 1 and p = {p} (the operator's size), got {steps}")
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if isinstance(seed, torch.Generator):
        generator, seed_used = seed, None
    else:
        generator, seed_used = torch.Generator().manual_seed(int(seed)), int(seed)
    nodes, weights = [], []
    for _ in range(probes):
        start = space.local_rows(_probe(p, probe, generator)).to(device=op.device,
                                                                  dtype=op.dtype)
        theta, tau = _quadrature(op, start, steps)
        nodes.append(theta)
        weights.append(tau / probes)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), p, probe, seed_used)


def exact_spectrum(op, block: int = 256, max_size: int = 6000) -> torch.Tensor:
    """Every eigenvalue of a small operator: form ``A`` by products with identity blocks, then
    ``eigvalsh``.

    ``A = [A e_1, …, A e_p]`` costs ``p`` operator products (``⌈p / block⌉`` data passes for a
    Hessian) and ``p²`` numbers of memory; the matrix is symmetrised (``(A + Aᵀ)/2``) and
    diagonalised in float64.

    Args:
        op: a symmetric operator.
        block: identity columns per product (memory ``p × block`` per pass).
        max_size: the largest ``p`` accepted.

    Returns:
        ``(p,)`` eigenvalues, **descending** (the package's convention), in ``op``'s dtype and
        device.

    Raises:
        ValueError: ``p > max_size`` (use :func:`spectral_density` or ``top_eigenpairs``), or
            ``block < 1``.
    """
    p = op.shape[0]
    if vector_space(op).dim != p:
        raise ValueError(f"exact_spectrum needs an operator on whole vectors; this one's vectors "
                         f"are shards ({p} of {vector_space(op).dim} rows on this process): "
                         "use spectral_density or top_eigenpairs")
    if p > max_size:
        raise ValueError(f"exact_spectrum forms the dense {p} x {p} matrix, larger than "
                         f"max_size = {max_size}; use spectral_density (SLQ) for the density or "
                         "top_eigenpairs for the top of the spectrum, or raise max_size")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    columns = []
    for start in range(0, p, block):
        stop = min(start + block, p)
        eye = torch.zeros(p, stop - start, dtype=op.dtype, device=op.device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        columns.append((op @ eye).to(torch.float64))
    matrix = torch.cat(columns, dim=1)
    matrix = 0.5 * (matrix + matrix.T)
    values = torch.linalg.eigvalsh(matrix)
    return values.flip(0).to(dtype=op.dtype)
