"""Top eigenpairs of a symmetric operator: thick-restart (block) Lanczos, full reorthogonalisation.

The solver keeps an orthonormal basis ``Q`` (``p × m``) together with ``HQ = op @ Q`` and the
projected matrix ``T = Qᵀ H Q``. Each iteration

1. takes the Rayleigh–Ritz pairs ``(θ_i, y_i)`` of ``T``: Ritz vectors ``v_i = Q y_i`` with exact
   residuals ``r_i = HQ y_i − θ_i v_i`` (no extra products);
2. stops when the ``n = skip + k`` largest pairs satisfy ``‖r_i‖ ≤ tol · |θ_1|``;
3. otherwise extends ``Q`` by the residuals of up to ``b`` unconverged wanted pairs,
   orthogonalised against ``Q`` (for a Krylov basis all residuals lie in the next Krylov
   block, so this *is* block Lanczos, with block size ``b``; ``b = 1`` is plain Lanczos);
4. when ``Q`` is full, restarts thick: keeps the best Ritz vectors (and their ``HQ``) only.

With block size 1 and a one-vector start (every cold solve by default) the same iteration runs
in Krylov–Schur form (:mod:`tinysubspace.linalg.krylov_schur`): the basis is a Krylov basis, so the
residual norms come from the Krylov relation and each step reads the basis half as often.

Memory is ``2 m`` vectors of length ``p`` (``m`` = ``basis_size``), whatever ``p`` is.
A warm start ``init`` (``p × m0``) is the first block: with the previous step's eigenvectors the
first Rayleigh–Ritz already holds nearly converged pairs. Block size ``b`` at least the
multiplicity of a repeated eigenvalue finds every copy of it (a single-vector Krylov space sees
one vector of each eigenspace).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.linalg.krylov_schur import krylov_schur
from tinysubspace.linalg.orthogonalize import orthonormalize_against, random_block

__all__ = ["Eigenpairs", "top_eigenpairs"]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs of a symmetric operator, largest algebraic first.

    Attributes:
        values: ``(k,)`` eigenvalues, descending.
        vectors: ``(p, k)`` orthonormal eigenvectors (columns).
        residuals: ``(k,)`` ``‖H v_i − λ_i v_i‖`` (absolute).
        matvecs: operator-vector products this solve used.
        converged: whether every residual is within ``tol · |λ_1|``.
        skip: how many larger eigenpairs were found and left out (``values[0]`` is ``λ_{skip+1}``).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool
    skip: int = 0


class _Krylov:
    """The solver's working state: basis ``Q``, its image ``HQ``, the projected matrix ``T`` and
    ``G = HQᵀ HQ``. ``Q`` and ``HQ`` are views of row buffers holding ``capacity`` vectors, so a
    step copies no old vectors (and every view is a contiguous block, transposed).
    """

    def __init__(self, like: torch.Tensor, capacity: int) -> None:
        p = like.shape[0]
        self._Q = like.new_empty(capacity, p)  # row i is the basis vector q_i
        self._HQ = like.new_empty(capacity, p)
        self.size = 0
        self.T = like.new_zeros(0, 0)
        self.G = like.new_zeros(0, 0)

    @property
    def Q(self) -> torch.Tensor:  # (p, m)
        return self._Q[: self.size].T

    @property
    def HQ(self) -> torch.Tensor:  # (p, m)
        return self._HQ[: self.size].T

    def extend(self, block: torch.Tensor, image: torch.Tensor) -> None:
        cross = self.Q.T @ image  # (m, b): Qᵀ H Qn (the old-new entries of T)
        corner = block.T @ image
        corner = (corner + corner.T) / 2
        self.T = torch.cat([torch.cat([self.T, cross], 1),
                            torch.cat([cross.T, corner], 1)], 0)
        g_cross, g_corner = self.HQ.T @ image, image.T @ image
        self.G = torch.cat([torch.cat([self.G, g_cross], 1),
                            torch.cat([g_cross.T, g_corner], 1)], 0)
        end = self.size + block.shape[1]
        if end > self._Q.shape[0]:  # (only a start block wider than the basis size)
            grow = end - self._Q.shape[0]
            self._Q = torch.cat([self._Q, self._Q.new_empty(grow, self._Q.shape[1])])
            self._HQ = torch.cat([self._HQ, self._HQ.new_empty(grow, self._HQ.shape[1])])
        self._Q[self.size:end] = block.T
        self._HQ[self.size:end] = image.T
        self.size = end

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (descending) and coefficient vectors ``y`` of the projected matrix."""
        theta, Y = torch.linalg.eigh((self.T + self.T.T) / 2)
        return theta.flip(0), Y.flip(1)

    def restart(self, Y: torch.Tensor, theta: torch.Tensor) -> None:
        """Keep only the Ritz vectors ``Q Y`` (thick restart)."""
        keep = Y.shape[1]
        self._Q[:keep] = Y.T @ self._Q[: self.size]
        self._HQ[:keep] = Y.T @ self._HQ[: self.size]
        self.size = keep
        self.T, self.G = torch.diag(theta), Y.T @ self.G @ Y

    def residual_gram(self, theta: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``RᵀR`` of the Ritz residuals ``R = HQ Y − Q Y diag(θ)``, from small matrices only:
        ``Yᵀ G Y − diag(θ²)`` (``QᵀHQ = T``, ``TY = Yθ``), in float64. Cancellation leaves an
        error of about ``eps · ‖H‖²`` (see :func:`_estimate_floor`)."""
        Y64, G64 = Y.double(), self.G.double()
        M = Y64.T @ G64 @ Y64 - torch.diag(theta.double() ** 2)
        return (M + M.T) / 2

    def residual_directions(self, theta: torch.Tensor, Y: torch.Tensor, b: int) -> torch.Tensor:
        """The ``b`` leading left singular directions of ``R = HQ Y − Q Y diag(θ)`` (all of
        ``R`` if it has at most ``b`` columns), computed as ``R Z`` without forming ``R``."""
        if Y.shape[1] > b:
            _, Z = torch.linalg.eigh(self.residual_gram(theta, Y))
            Z = Z[:, -b:].flip(1).to(Y.dtype)
            return self.HQ @ (Y @ Z) - self.Q @ (Y @ (theta[:, None] * Z))
        return self.HQ @ Y - self.Q @ (Y * theta)


def _validate(op, k: int, skip: int, tol: float, init: torch.Tensor | None,
              block_size: int | None, basis_size: int | None, max_matvecs: int | None) -> int:
    p = op.shape[0]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be a non-negative integer, got {skip!r}")
    if k + skip >= p:
        raise ValueError(f"k + skip = {k + skip} must be smaller than the operator's dimension "
                         f"p = {p}; for the whole spectrum of a small operator use "
                         "torch.linalg.eigvalsh on a dense matrix")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if init is not None and (init.ndim not in (1, 2) or init.shape[0] != p):
        raise ValueError(f"init must have shape ({p},) or ({p}, m), got {tuple(init.shape)}")
    if init is not None and not bool(torch.isfinite(init).all()):
        raise ValueError("init has non-finite entries")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if basis_size is not None and basis_size < k + skip + 1:
        raise ValueError(f"basis_size must exceed k + skip = {k + skip}, got {basis_size}")
    if max_matvecs is not None:
        least = max(k + skip, 1 if init is None else init.reshape(p, -1).shape[1])
        if max_matvecs < least:
            raise ValueError(f"max_matvecs must be at least k + skip = {k + skip} and at least "
                             f"the number of columns of init; got {max_matvecs} (needs {least})")
    return p


def top_eigenpairs(op, k: int, tol: float = 1e-6, init: torch.Tensor | None = None,
                   seed: int = 0, max_matvecs: int | None = None, skip: int = 0,
                   block_size: int | None = None,
                   basis_size: int | None = None) -> Eigenpairs:
    """The ``k`` largest (algebraic) eigenpairs of a symmetric operator.

    Convergence: every returned pair (and every skipped one) satisfies
    ``‖H v − λ v‖ ≤ tol · |λ_1|``, with ``|λ_1|`` estimated by the largest ``|θ|`` among the
    current Ritz values (``≈ ‖H‖``; equal to ``|λ_1|`` for a Hessian whose largest-magnitude
    eigenvalue is its top one).

    Args:
        op: symmetric operator with ``shape``, ``dtype``, ``device`` and ``@``.
        k: number of eigenpairs wanted.
        tol: relative residual tolerance (> 0).
        init: ``(p,)`` or ``(p, m0)`` start block (e.g. the previous measurement's vectors); it
            need not be orthonormal. ``None``: a random block from ``seed``.
        seed: seed of the random start and of any random fill (identical on every device).
        max_matvecs: stop (``converged=False``) once this many products are used; never
            exceeded (at least ``k + skip`` and at least the columns of ``init``).
        skip: leave out the ``skip`` largest pairs and return ``λ_{skip+1} … λ_{skip+k}`` (the
            paper's "next k" subspace is ``skip=k``). They are computed all the same.
        block_size: vectors added per iteration (one data pass each). Default 1 for a cold
            start, and ``min(n, m0)`` for a warm start with ``m0`` columns (fewest passes; for
            fewest products use :func:`tinysubspace.linalg.warm_start.track_eigenpairs`).
        basis_size: largest basis before a thick restart (default ``max(2n + 2b, n + 20)``,
            at most ``p``).

    Returns:
        :class:`Eigenpairs` with the ``k`` pairs, descending.

    Raises:
        FloatingPointError: the operator returned NaN or infinity.
        ValueError: ``k + skip ≥ p``, ``tol ≤ 0``, ``init`` of the wrong shape or not finite, or
            ``max_matvecs`` below ``k + skip`` or below the number of columns of ``init``.
    """
    p = _validate(op, k, skip, tol, init, block_size, basis_size, max_matvecs)
    n = k + skip
    gen = torch.Generator().manual_seed(seed)
    start = _start_block(op, init, n, block_size, gen)
    b = block_size or (1 if init is None else max(1, min(n, start.shape[1])))
    m = min(p, max(basis_size or max(2 * n + 2 * b, n + 20), n + b))
    budget = max_matvecs if max_matvecs is not None else 50 * p
    if b == 1 and start.shape[1] == 1:  # a Krylov basis: Krylov–Schur, residuals for free
        values, V, res, used, done = krylov_schur(op, start, n, tol, m, budget, gen)
        return Eigenpairs(values[skip:].clone(), V[:, skip:].clone(), res[skip:].clone(),
                          used, done, skip)
    used = 0
    state = _Krylov(start, capacity=m)
    block = start
    while True:
        image = op @ block
        used += block.shape[1]
        if not bool(torch.isfinite(image).all()):
            raise FloatingPointError(f"the operator returned non-finite values (after {used} "
                                     "products)")
        state.extend(block, image)
        theta, Y = state.ritz()
        scale = max(float(theta.abs().max()), float(torch.finfo(theta.dtype).tiny))
        threshold = tol * scale
        # residual norms from the small Gram matrix first: p-sized work only where needed
        estimate = state.residual_gram(theta[:n], Y[:, :n]).diagonal().clamp_min(0).sqrt()
        floor = _estimate_floor(op, max(scale, float(state.G.diagonal().max()) ** 0.5))
        maybe = bool((estimate <= threshold + floor).all())
        full = state.Q.shape[1] >= p
        if (maybe and state.Q.shape[1] >= n) or full or used >= budget:
            V = state.Q @ Y[:, :n]
            R = state.HQ @ Y[:, :n] - V * theta[:n]
            res = R.norm(dim=0)
            # fewer than n basis vectors give fewer than n Ritz pairs: never "converged" then
            done = (state.Q.shape[1] >= n and bool((res <= threshold).all())) or full
            if done or used >= budget:
                return Eigenpairs(theta[skip:n].clone(), V[:, skip:].clone(),
                                  res[skip:].clone(), used, done, skip)
            directions = _next_block(R, res, threshold, b)
        else:  # some pair is certainly unconverged: its residual direction, without R
            active = estimate > threshold
            if not bool(active.any()):
                active = estimate == estimate.max()
            directions = state.residual_directions(theta[:n][active], Y[:, :n][:, active], b)
        if state.Q.shape[1] + b > m:
            keep = min(max(n + b, (m + n) // 2), m - b)
            state.restart(Y[:, :keep], theta[:keep])
        block = _orthonormal_fill(directions, state.Q, b, gen)[:, : budget - used]


def _estimate_floor(op, norm: float) -> float:
    """How far a residual norm from :meth:`_Krylov.residual_gram` may be off: the Gram
    entries are ``p``-term sums in the operator's precision, so ``yᵀGy − θ²`` carries an error
    of about ``√p · eps · ‖H‖²`` (taken 10 times larger; ``norm`` ≥ the largest ``‖Hq‖`` seen)."""
    eps = torch.finfo(op.dtype).eps
    return (10 * eps * op.shape[0] ** 0.5) ** 0.5 * norm


def _start_block(op, init: torch.Tensor | None, n: int, block_size: int | None,
                 gen: torch.Generator) -> torch.Tensor:
    """Orthonormal first block: ``init`` (rank-revealed), filled up at random if needed."""
    p = op.shape[0]
    want = block_size or 1
    columns = torch.empty(p, 0, dtype=op.dtype, device=op.device)
    if init is not None:
        columns = orthonormalize_against(init.reshape(p, -1).to(op.device, op.dtype), None)
        want = block_size or max(1, min(n, init.reshape(p, -1).shape[1]))
    while columns.shape[1] < want:
        extra = random_block(p, want - columns.shape[1], op.dtype, op.device, gen)
        columns = torch.cat([columns, orthonormalize_against(extra, columns)], 1)
    return columns


def _next_block(R: torch.Tensor, res: torch.Tensor, threshold: float, b: int) -> torch.Tensor:
    """Up to ``b`` directions that carry most of the unconverged wanted residuals ``R``.

    With at most ``b`` unconverged pairs these are their residuals (for a Krylov basis all
    residuals lie in the next Krylov block, so this *is* block Lanczos). With more (a warm start),
    they are the ``b`` leading left singular vectors of ``[r_i]`` (each ``r_i ⊥ Q``): the
    ``b``-dimensional subspace closest to all residuals, instead of the ``b`` largest ones (fewer
    products for the same accuracy, measured in docs/performance.md).
    """
    active = res > threshold
    if not bool(active.any()):
        active = res == res.max()
    block = R[:, active]
    if block.shape[1] > b:  # Rayleigh–Ritz residuals are already orthogonal to Q
        _, Z = torch.linalg.eigh(block.T @ block)  # thin SVD through the small Gram matrix
        block = block @ Z[:, -b:].flip(1)
    return block


def _orthonormal_fill(block: torch.Tensor, Q: torch.Tensor, b: int,
                      gen: torch.Generator) -> torch.Tensor:
    """``block`` made orthonormal to ``Q``; random directions replace any already spanned."""
    block = orthonormalize_against(block, Q)
    p = Q.shape[0]
    while block.shape[1] < min(b, p - Q.shape[1]):
        extra = random_block(p, b - block.shape[1], Q.dtype, Q.device, gen)
        block = torch.cat([block, orthonormalize_against(extra, torch.cat([Q, block], 1))], 1)
    return block
