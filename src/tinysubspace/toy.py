"""The solvable toy model of Section 3 and Appendix E: softmax regression on a Gaussian mixture.

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

**Late-time solution** (``k = 2``, ``σ = 0``, orthonormal means, no biases; docs/toy-model.md).
With ``u_1 = (θ_1−θ_2)·μ_1``, ``u_2 = (θ_2−θ_1)·μ_2`` the approximate loss eq. 14 is
``½e^{−u_1} + ½e^{−u_2}`` and gradient flow gives ``du_i/dt = η e^{−u_i}``, so
``e^{u_i} = z_i(t) = ηt + c_i`` (eqs. 15–16) and

.. math::
    ∇_{θ_1}L = -∇_{θ_2}L = -\\frac{μ_1}{2 z_1} + \\frac{μ_2}{2 z_2}
             = \\frac{μ_2 - μ_1}{2ηt} + O(t^{-2}) \\quad (eq.~17,\\ corrected),\\qquad
    H = \\begin{pmatrix}1&-1\\\\-1&1\\end{pmatrix} ⊗ \\sum_i \\frac{μ_iμ_i^T}{2 z_i}\\quad (eq.~18),

with eigenpairs ``λ_i = 1/z_i = 1/(ηt + c_i)`` and ``v_i = (μ_i, −μ_i)/√2`` (eq. 19).

>>> data = make_toy_data(k=2, d=4, n=2, sigma=0.0, orthogonal=True)
>>> theta = torch.zeros(8, dtype=torch.float64)
>>> round(float(softmax_loss(theta, data)), 6)   # log 2 at θ = 0
0.693147
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .eigen import top_eigenpairs
from .linear_operator import SymmetricOperator
from .metrics import eigenvector_overlaps, subspace_overlap, top_fraction

__all__ = [
    "LateTimeSolution",
    "SoftmaxHessian",
    "ToyConfig",
    "ToyData",
    "ToySimulation",
    "approximate_loss",
    "data_span_spectrum",
    "discrete_drift",
    "equal_margin_spectrum",
    "fit_late_time",
    "leading_gradient",
    "leading_hessian",
    "linearized_gradient_step",
    "make_toy_data",
    "mean_direction_eigenvalues",
    "measurement_steps",
    "power_law_exponent",
    "simulate",
    "softmax_gradient",
    "softmax_hessian",
    "softmax_loss",
    "subspace_overlaps",
]


# ----------------------------------------------------------------------------------- data
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


def make_toy_data(k: int, d: int, n: int, sigma: float, seed: int = 0,
                  orthogonal: bool = False) -> ToyData:
    """Draw ``n`` samples (``n/k`` per class) of the mixture ``N(μ_y, σ² I)`` in float64.

    The noise ``ε_a`` is drawn whatever ``σ`` is, so runs with the same seed and different ``σ``
    share ``μ`` and ``ε`` (a clean ``σ`` sweep).

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
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(d, k, generator=gen, dtype=torch.float64)
    means = (torch.linalg.qr(raw).Q if orthogonal else raw / raw.norm(dim=0)).T.contiguous()
    labels = torch.arange(n) % k
    noise = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return ToyData(means[labels] + sigma * noise, labels, means, float(sigma))


# ------------------------------------------------------------------ closed-form model
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
    return torch.softmax(data.design(biases) @ _as_matrix(theta, data.k, biases).T, dim=1)


def softmax_loss(theta: torch.Tensor, data: ToyData, biases: bool = False) -> torch.Tensor:
    """Cross-entropy mean loss of eq. 6 (differentiable; the autograd reference)."""
    X = data.design(biases)
    if theta.shape != (data.k * X.shape[1],):
        raise ValueError(f"theta must have shape ({data.k * X.shape[1]},) for k = {data.k}, "
                         f"d = {data.inputs.shape[1]}, biases = {biases}; got {tuple(theta.shape)}")
    logits = X @ _as_matrix(theta, data.k, biases).T
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


# ------------------------------------------------------------------------- simulation
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
    """
    data = data if data is not None else make_toy_data(
        config.k, config.d, config.n, config.sigma, config.seed, config.orthogonal)
    p = config.k * (data.inputs.shape[1] + config.biases)
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
    """Least-squares slope of ``log y`` against ``log x`` (e.g. 2 for ``y ∝ x²``)."""
    lx, ly = torch.as_tensor(x).log(), torch.as_tensor(y).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / lx.square().sum())


# ------------------------------------------------------------- analytic late-time solution
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


def _check_analytic_case(sim: ToySimulation) -> None:
    c = sim.config
    if c.k != 2 or c.sigma != 0 or c.biases or not c.orthogonal:
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
