"""The late-time closed form of the toy model (Section 3, eqs. 14–19; docs/toy-model.md).

**The analytic case**: ``k = 2``, ``σ = 0``, orthonormal means, no biases. With
``u_1 = (θ_1−θ_2)·μ_1``, ``u_2 = (θ_2−θ_1)·μ_2`` the approximate loss eq. 14 is
``½e^{−u_1} + ½e^{−u_2}`` and gradient flow gives ``du_i/dt = η e^{−u_i}``, so
``e^{u_i} = z_i(t) = ηt + c_i`` (eqs. 15–16) and

.. math::
    ∇_{θ_1}L = -∇_{θ_2}L = -\\frac{μ_1}{2 z_1} + \\frac{μ_2}{2 z_2}
             = \\frac{μ_2 - μ_1}{2ηt} + O(t^{-2}) \\quad (eq.~17,\\ corrected),\\qquad
    H = \\begin{pmatrix}1&-1\\\\-1&1\\end{pmatrix} ⊗ \\sum_i \\frac{μ_iμ_i^T}{2 z_i}\\quad (eq.~18),

with eigenpairs ``λ_i = 1/z_i = 1/(ηt + c_i)`` and ``v_i = (μ_i, −μ_i)/√2`` (eq. 19).
:func:`fit_late_time` fits the constants ``c_i`` to a simulation
(:mod:`tinysubspace.problems.toy.simulation`);
:func:`equal_margin_spectrum` gives the late-time spectrum for any ``k`` (with or without biases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tinysubspace.problems.toy.model import SoftmaxHessian

if TYPE_CHECKING:
    from tinysubspace.problems.toy.simulation import ToyConfig, ToySimulation

__all__ = [
    "LateTimeSolution",
    "approximate_loss",
    "discrete_drift",
    "equal_margin_spectrum",
    "fit_late_time",
    "is_analytic_case",
    "leading_gradient",
    "leading_hessian",
    "mean_direction_eigenvalues",
]


def equal_margin_spectrum(k: int, biases: bool = False) -> torch.Tensor:
    """Late-time limit of ``ηt · spec(H)`` for orthonormal means and ``σ = 0`` (descending,
    ``k (k + biases)`` values, of which ``k(k−1)`` are non-zero).

    At late times every wrong-class probability is ``ε = 1/(ηt) + O(t^{-2})`` (the margins
    obey ``de^m/dt = η``, as in eqs. 15–16), so ``diag p_a − p_a p_aᵀ ≈ ε M_y`` with
    ``M_y = Σ_{j≠y} (e_j − e_y)(e_j − e_y)ᵀ`` and ``ηt H → (1/k) Σ_y M_y ⊗ x̃_y x̃_yᵀ``,
    ``x̃_y = (e_y[, 1])``. Without biases: ``k`` eigenvalues 1 and ``k(k−2)`` equal to ``1/k``.
    With biases: ``k − 1`` equal to ``λ_+``, one equal to 1 (the direction of the gradient),
    then ``k − 1`` equal to ``λ_−`` and ``(k−1)(k−2) − 1`` equal to ``1/k`` (``k ≥ 3``; for
    ``k = 2`` just 3 and 1), where ``λ_± = [(3 + 1/k) ± √((3 + 1/k)² − 4(1 + 1/k))]/2``.

    >>> [round(float(v), 4) for v in equal_margin_spectrum(2, biases=True)[:2]]
    [3.0, 1.0]
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 classes, got {k}")
    D = k + int(biases)
    X = torch.cat([torch.eye(k, dtype=torch.float64),
                   torch.ones(k, int(biases), dtype=torch.float64)], 1)
    S = torch.zeros(k * D, k * D, dtype=torch.float64)
    for y in range(k):
        E = torch.eye(k, dtype=torch.float64) - torch.eye(k, dtype=torch.float64)[y]
        M = E.T @ E  # rows e_j − e_y (the row j = y is zero)
        S += torch.kron(M, torch.outer(X[y], X[y])) / k
    return torch.linalg.eigvalsh(S).flip(0)


def _mean_directions(means: torch.Tensor) -> torch.Tensor:
    """``(2d, 2)``: the columns ``(μ_i, −μ_i)/√2`` of eq. 19."""
    return torch.cat([means.T, -means.T], 0) / math.sqrt(2)


def discrete_drift(eta: float) -> float:
    """Coefficient ``a`` of the next-order drift ``c_i(t) = c_i − a log(ηt)``.

    For the exact loss (eq. 13) and discrete steps, ``z = e^u`` obeys
    ``z_{t+1} = z_t e^{η/(1+z_t)} = z_t + η − (η − η²/2)/z_t + O(z^{-2})``, so
    ``z_t = ηt + c − (1 − η/2) log(ηt) + O(log t / t)``; the paper's eq. 14 + continuous time
    drops this term (``a = 0``).
    """
    return 1.0 - eta / 2.0


@dataclass(frozen=True)
class LateTimeSolution:
    """Eqs. 15–19 for ``k = 2``, ``σ = 0``, orthonormal means, no biases.

    ``z_i(t) = ηt + c_i − drift · log(ηt)`` (``drift = 0``: the paper's form).

    Attributes:
        means: ``(2, d)`` orthonormal ``μ_1, μ_2``.
        c: ``(2,)`` the constants ``c_1, c_2``.
        eta: learning rate.
        offsets: ``(2, d)`` ``θ̃_y + θ̃'`` of eq. 7 (constant parts of ``θ_1``, ``θ_2``).
        drift: coefficient of the ``log(ηt)`` correction (see :func:`discrete_drift`).
    """

    means: torch.Tensor
    c: torch.Tensor
    eta: float
    offsets: torch.Tensor
    drift: float = 0.0

    def z(self, t: float) -> torch.Tensor:
        """``(z_1(t), z_2(t))``; ``e^{u_i} = z_i``."""
        et = self.eta * t
        return et + self.c - (self.drift * math.log(et) if self.drift else 0.0)

    def parameters(self, t: float) -> torch.Tensor:
        """Eqs. 15–16: ``θ_{1,2} = θ̃_{1,2} ± (μ_1/2) log z_1 ∓ (μ_2/2) log z_2``."""
        logz = self.z(t).log()
        half = (self.means[0] * logz[0] - self.means[1] * logz[1]) / 2
        return torch.cat([self.offsets[0] + half, self.offsets[1] - half])

    def gradient(self, t: float) -> torch.Tensor:
        """Eq. 17, first form: ``∇_{θ_1} = −∇_{θ_2} = −μ_1/(2 z_1) + μ_2/(2 z_2)``."""
        z = self.z(t)
        g1 = -self.means[0] / (2 * z[0]) + self.means[1] / (2 * z[1])
        return torch.cat([g1, -g1])

    def hessian(self, t: float) -> torch.Tensor:
        """Eq. 18, first form: ``[[1, −1], [−1, 1]] ⊗ Σ_i μ_iμ_iᵀ / (2 z_i)``."""
        z = self.z(t)
        block = (self.means.T / (2 * z)) @ self.means
        return torch.kron(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=block.dtype), block)

    def eigenvalues(self, t: float) -> torch.Tensor:
        """``λ_i = 1/z_i(t)`` (the eigenvalue 2 of ``[[1,−1],[−1,1]]`` times ``1/(2 z_i)``)."""
        return 1.0 / self.z(t)

    def eigenvectors(self) -> torch.Tensor:
        """Eq. 19: ``(2d, 2)`` columns ``(μ_i, −μ_i)/√2``, time independent."""
        return _mean_directions(self.means)


def leading_gradient(means: torch.Tensor, eta: float, t: float) -> torch.Tensor:
    """Leading order of eq. 17: ``∇_{θ_1} = −∇_{θ_2} = (μ_2 − μ_1)/(2ηt)`` (‖g‖ = 1/(ηt))."""
    g1 = (means[1] - means[0]) / (2 * eta * t)
    return torch.cat([g1, -g1])


def leading_hessian(means: torch.Tensor, eta: float, t: float) -> torch.Tensor:
    """Leading order of eq. 18 (= eq. 9): ``(1/(2ηt)) [[1,−1],[−1,1]] ⊗ (μ_1μ_1ᵀ + μ_2μ_2ᵀ)``."""
    block = means.T @ means / (2 * eta * t)
    return torch.kron(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=block.dtype), block)


def approximate_loss(theta: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Eq. 14: ``½ e^{(θ_2−θ_1)·μ_1} + ½ e^{(θ_1−θ_2)·μ_2}`` (differentiable)."""
    w = theta[: means.shape[1]] - theta[means.shape[1]:]
    return 0.5 * torch.exp(-w @ means[0]) + 0.5 * torch.exp(w @ means[1])


def is_analytic_case(config: ToyConfig) -> bool:
    """Whether eqs. 15–19 hold: ``k = 2``, ``σ = 0``, orthonormal means and no biases."""
    return config.k == 2 and config.sigma == 0 and not config.biases and config.orthogonal


def _check_analytic_case(sim: ToySimulation) -> None:
    c = sim.config
    if not is_analytic_case(c):
        raise ValueError("the closed form of eqs. 15–19 holds for k = 2, sigma = 0, orthonormal "
                         f"means and no biases; got k = {c.k}, sigma = {c.sigma}, "
                         f"orthogonal = {c.orthogonal}, biases = {c.biases}")


def mean_direction_eigenvalues(sim: ToySimulation) -> torch.Tensor:
    """``(T, 2)`` ``λ_i(t) = v_iᵀ H(θ(t)) v_i`` with ``v_i = (μ_i, −μ_i)/√2``: for orthonormal
    means, ``σ = 0`` and no biases these *are* the two non-zero eigenvalues, labelled by mean
    (no ordering ambiguity when they are nearly degenerate)."""
    _check_analytic_case(sim)
    V = _mean_directions(sim.data.means)
    rows = [(V * (SoftmaxHessian(theta, sim.data) @ V)).sum(0) for theta in sim.parameters]
    return torch.stack(rows)


def fit_late_time(sim: ToySimulation, t_min: int | None = None,
                  drift: float = 0.0) -> LateTimeSolution:
    """Fit ``c_1, c_2`` to ``1/λ_i(t) = ηt + c_i − drift·log(ηt)`` over measured ``t ≥ t_min``
    (least squares: the mean of the residual); offsets from the exactly conserved parts of ``θ``.

    Args:
        sim: a run of the analytic case (``k = 2``, ``σ = 0``, orthonormal, no biases).
        t_min: first step used (default: ``steps / 10``).
        drift: 0 for the paper's eqs. 15–18, :func:`discrete_drift` for the next order.

    Raises:
        ValueError: not the analytic case, or no measured step ``≥ t_min``.
    """
    _check_analytic_case(sim)
    t_min = t_min if t_min is not None else max(1, sim.config.steps // 10)
    late = sim.steps >= max(t_min, 1)
    if not bool(late.any()):
        raise ValueError(f"no measured step ≥ t_min = {t_min}; last is {int(sim.steps[-1])}")
    et = sim.times[late]
    inv = 1.0 / mean_direction_eigenvalues(sim)[late]
    c = (inv - et[:, None] + drift * et.log()[:, None]).mean(0)
    means, d = sim.data.means, sim.data.means.shape[1]
    theta0 = sim.parameters[0]
    s, w = theta0[:d] + theta0[d:], theta0[:d] - theta0[d:]
    w_perp = w - means.T @ (means @ w)  # conserved: the gradient lies in span(μ) ⊗ (1, −1)
    offsets = torch.stack([(s + w_perp) / 2, (s - w_perp) / 2])
    return LateTimeSolution(means, c, sim.config.eta, offsets, drift)
