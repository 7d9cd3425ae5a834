"""The solvable toy model of Section 3 and Appendix E: data, loss, gradient and Hessian.

**Data.** ``k`` classes with ``n/k`` samples each, ``x_a = μ_{y_a} + σ ε_a``, random unit means
``μ_y ∈ R^d`` (exactly orthonormal with ``orthogonal=True``) and ``ε_a ~ N(0, I_d)``.

**Model** (eq. 6). Logits ``θ_y · x_a (+ b_y)``; the parameter vector is laid out as
``nn.Linear(d, k)`` holds it: ``θ = (θ_1, …, θ_k[, b_1, …, b_k])`` (``R^k ⊗ R^d``, then biases).
With ``x̃_a = (x_a[, 1])``, ``p_a = softmax`` of the logits and ``Y`` the one-hot labels:

.. math::
    L = -\\tfrac1n \\sum_a \\log p_{a, y_a}, \\quad
    \\nabla_{θ_y} L = \\tfrac1n \\sum_a (p_{a,y} - Y_{a,y})\\, x̃_a, \\quad
    H = \\tfrac1n \\sum_a (\\mathrm{diag}\\, p_a - p_a p_a^T) ⊗ x̃_a x̃_a^T .

``H`` is positive semi-definite (the loss is convex) and its range lies in
``R^k ⊗ rowspace(X̃)`` minus the softmax shift ``1 ⊗ x̃``: for ``σ = 0`` the rank is at most
``k(k−1)`` (footnote 14), i.e. 2 for ``k = 2``.

Everything here is a pure function of ``(θ, data)`` in float64;
:mod:`tinysubspace.problems.toy.simulation` runs
gradient descent on it and :mod:`tinysubspace.problems.toy.analytic` holds the late-time closed
form.

>>> data = make_toy_data(k=2, d=4, n=2, sigma=0.0, orthogonal=True)
>>> theta = torch.zeros(8, dtype=torch.float64)
>>> round(float(softmax_loss(theta, data)), 6)   # log 2 at θ = 0
0.693147
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.operator import SymmetricOperator
from tinysubspace.problems.datasets.mixture import sample_gaussian_mixture

__all__ = [
    "SoftmaxHessian",
    "ToyData",
    "data_span_spectrum",
    "linearized_gradient_step",
    "make_toy_data",
    "softmax_gradient",
    "softmax_hessian",
    "softmax_loss",
]


@dataclass(frozen=True)
class ToyData:
    """Samples of the Gaussian mixture.

    Attributes:
        inputs: ``(n, d)`` samples ``x_a``.
        labels: ``(n,)`` int64 classes ``y_a = a mod k`` (balanced).
        means: ``(k, d)`` unit class means ``μ_y``.
        sigma: the noise scale ``σ``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    means: torch.Tensor
    sigma: float

    @property
    def k(self) -> int:
        """Number of classes."""
        return self.means.shape[0]

    def design(self, biases: bool) -> torch.Tensor:
        """``X̃``: the inputs, with a column of ones appended when ``biases``."""
        if not biases:
            return self.inputs
        return torch.cat([self.inputs, self.inputs.new_ones(self.inputs.shape[0], 1)], 1)

    def num_parameters(self, biases: bool) -> int:
        """``p = k (d + biases)``, the length of ``θ``."""
        return self.k * (self.inputs.shape[1] + int(biases))


def make_toy_data(k: int, d: int, n: int, sigma: float, seed: int = 0,
                  orthogonal: bool = False) -> ToyData:
    """Draw ``n`` samples (``n/k`` per class) of the mixture ``N(μ_y, σ² I)`` in float64.

    The noise ``ε_a`` is drawn whatever ``σ`` is, so runs with the same seed and different ``σ``
    share ``μ`` and ``ε`` (a clean ``σ`` sweep). The generator is
    :func:`tinysubspace.problems.datasets.mixture.sample_gaussian_mixture`: the same seed gives
    the ``gaussian-mixture`` data set's training split.

    Raises:
        ValueError: ``k < 2``, ``d < k`` with ``orthogonal``, ``n`` not a positive multiple of
            ``k``, or ``σ < 0``.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 classes, got {k}")
    if d < 1 or (orthogonal and d < k):
        raise ValueError(f"d must be at least k = {k} for orthogonal means (and positive), got {d}")
    if n < k or n % k:
        raise ValueError(f"n must be a positive multiple of k = {k} (balanced classes, as "
                         f"eq. 13's weights 1/k assume), got {n}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    inputs, labels, means = sample_gaussian_mixture(k, d, n, sigma, seed, orthogonal)
    return ToyData(inputs, labels, means, float(sigma))


def _check_theta(theta: torch.Tensor, data: ToyData, biases: bool) -> None:
    """Raise ``ValueError`` unless ``theta`` is the flat ``(p,)`` vector of ``data``'s model."""
    p = data.num_parameters(biases)
    if theta.shape != (p,):
        raise ValueError(f"theta must have shape ({p},) for k = {data.k}, "
                         f"d = {data.inputs.shape[1]}, biases = {biases}; got {tuple(theta.shape)}")


def _as_matrix(flat: torch.Tensor, k: int, biases: bool) -> torch.Tensor:
    """``(p, …)`` in nn.Linear order → ``(k, D, …)`` with row ``y = (θ_y[, b_y])``."""
    if not biases:
        return flat.reshape(k, -1, *flat.shape[1:])
    d = flat.shape[0] // k - 1
    weight = flat[: k * d].reshape(k, d, *flat.shape[1:])
    return torch.cat([weight, flat[k * d:].reshape(k, 1, *flat.shape[1:])], 1)


def _as_flat(matrix: torch.Tensor, biases: bool) -> torch.Tensor:
    """Inverse of :func:`_as_matrix`: ``(k, D, …)`` → ``(p, …)``."""
    rest = matrix.shape[2:]
    if not biases:
        return matrix.reshape(-1, *rest)
    return torch.cat([matrix[:, :-1].reshape(-1, *rest), matrix[:, -1]], 0)


def _probabilities(theta: torch.Tensor, data: ToyData, biases: bool) -> torch.Tensor:
    """``(n, k)`` softmax probabilities ``p_a`` (``theta`` checked)."""
    _check_theta(theta, data, biases)
    return torch.softmax(data.design(biases) @ _as_matrix(theta, data.k, biases).T, dim=1)


def softmax_loss(theta: torch.Tensor, data: ToyData, biases: bool = False) -> torch.Tensor:
    """Cross-entropy mean loss of eq. 6 (differentiable; the autograd reference).

    Raises:
        ValueError: ``theta`` is not of shape ``(k (d + biases),)`` (also for the functions below).
    """
    _check_theta(theta, data, biases)
    logits = data.design(biases) @ _as_matrix(theta, data.k, biases).T
    return torch.nn.functional.cross_entropy(logits, data.labels)


def softmax_gradient(theta: torch.Tensor, data: ToyData, biases: bool = False) -> torch.Tensor:
    """``∇_{θ_y} L = (1/n) Σ_a (p_{a,y} − Y_{a,y}) x̃_a``, flattened ``(p,)``."""
    P = _probabilities(theta, data, biases)
    Y = torch.nn.functional.one_hot(data.labels, data.k).to(P.dtype)
    return _as_flat((P - Y).T @ data.design(biases), biases) / P.shape[0]


def softmax_hessian(theta: torch.Tensor, data: ToyData, biases: bool = False) -> torch.Tensor:
    """Dense ``H = (1/n) Σ_a (diag p_a − p_a p_aᵀ) ⊗ x̃_a x̃_aᵀ``, ``(p, p)``."""
    P = _probabilities(theta, data, biases)
    X = data.design(biases)
    A = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    H = torch.einsum("ajl,ai,am->jilm", A, X, X) / P.shape[0]  # (k, D, k, D)
    k, D = H.shape[:2]
    rows = _as_flat(H.reshape(k, D, k * D), biases)  # (p, k D)
    return _as_flat(rows.T.reshape(k, D, -1), biases).T


class SoftmaxHessian(SymmetricOperator):
    """The toy Hessian at ``theta`` as a matrix-free operator (cost ``O(n d k)`` per column).

    ``H V``: ``s_a = Θ_V x̃_a``, ``r_a = p_a ⊙ s_a − p_a (p_a · s_a)``, ``(HV) = (1/n) Σ r_a x̃_aᵀ``.
    """

    def __init__(self, theta: torch.Tensor, data: ToyData, biases: bool = False) -> None:
        self._X = data.design(biases)
        self._P = _probabilities(theta, data, biases)
        self._k, self._biases = data.k, biases
        super().__init__(theta.numel(), theta.dtype, theta.device)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        V = _as_matrix(block, self._k, self._biases)  # (k, D, b)
        S = torch.einsum("ai,jib->ajb", self._X, V)
        P = self._P[:, :, None]
        R = P * S - P * (P * S).sum(1, keepdim=True)
        out = torch.einsum("ajb,ai->jib", R, self._X) / self._X.shape[0]
        return _as_flat(out, self._biases)


def data_span_spectrum(theta: torch.Tensor, data: ToyData, biases: bool = False) -> torch.Tensor:
    """Every possibly non-zero eigenvalue of ``H``, descending: ``H`` restricted to
    ``R^k ⊗ rowspace(X̃)`` (dimension ``k r``, ``r = rank X̃``); the other ``p − k r``
    eigenvalues are exactly zero because ``H v = 0`` for ``v ⊥ R^k ⊗ rowspace(X̃)``.

    For ``σ = 0``, ``r = k`` and the ``k²`` values hold at least ``k`` zeros (``1 ⊗ x̃``),
    so ``rank H ≤ k(k − 1)`` (footnote 14).
    """
    X = data.design(biases)
    _, singular, Vh = torch.linalg.svd(X, full_matrices=False)
    cutoff = singular[0] * max(X.shape) * torch.finfo(X.dtype).eps
    r = int((singular > cutoff).sum())
    Q = Vh[:r].T  # (D, r): orthonormal basis of the row space
    blocks = torch.block_diag(*([Q] * data.k))  # (k D, k r): R^k ⊗ Q, row y = class
    B = _as_flat(blocks.reshape(data.k, X.shape[1], -1), biases)
    H_red = B.T @ (SoftmaxHessian(theta, data, biases) @ B)
    return torch.linalg.eigvalsh((H_red + H_red.T) / 2).flip(0)


def linearized_gradient_step(theta: torch.Tensor, data: ToyData, eta: float,
                             biases: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10: the next gradient ``g(θ − ηg)`` and its linearisation ``(1 − ηH) g``.

    Their difference is ``O(η²)``; in the eigenbasis of ``H`` the linear map shrinks the
    component along ``v_i`` by ``1 − ηλ_i``, so the gradient turns towards the smallest
    non-zero eigenvalue of the top subspace.
    """
    g = softmax_gradient(theta, data, biases)
    actual = softmax_gradient(theta - eta * g, data, biases)
    return actual, g - eta * (SoftmaxHessian(theta, data, biases) @ g)

