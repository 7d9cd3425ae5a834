"""The one Krylov basis every Lanczos path of tinysubspace grows: orthonormal vectors, their
images, reorthogonalisation, random directions and the products that fill it.

A :class:`KrylovBasis` holds orthonormal vectors ``q_1 … q_m`` (rows of a buffer, so a step
copies no old vector) and, optionally, their images ``H q_i``; it may be *locked* against a
fixed orthonormal block ``V`` (the multiplicity check's ``(I − VVᵀ) H (I − VVᵀ)``), so that
every new vector is orthogonal to ``V`` as well. One rule each for

* **reorthogonalisation** (:meth:`KrylovBasis.orthogonal_part`): classical Gram–Schmidt twice,
  and a third time when the second pass removed more than half of what was left (DGKS, Daniel,
  Gragg, Kaufman & Stewart 1976);
* **dependence** (:func:`drop_tolerance`): a column whose component outside the basis is below
  ``min(100 · ε_w · √p, 1/4)`` of its norm counts as already spanned (``ε_w`` the working
  precision);
* **breakdown** (:meth:`KrylovBasis.invariant`): a Lanczos step whose new direction has norm
  ``β ≤ 100 ε_w · max(|θ|_max, ‖H q‖)`` has found an invariant subspace;
* **random directions** (:meth:`KrylovBasis.random_direction`): seeded Gaussian vectors drawn on
  the CPU (the same numbers on every device and process), orthogonalised to the basis; at most
  :data:`MAX_DRAWS` draws, then an error, never an endless loop.

Working precision. Half-precision operators (``float16``, ``bfloat16``; ``ε`` = 1e-3, 8e-3) are
solved in ``float32`` (:func:`working_dtype`): the basis, Gram–Schmidt and the projected matrices
are float32 and only the products run in the operator's dtype (:func:`apply_operator` converts
both ways). In half precision the dependence bar ``100 ε √p`` exceeds 1 for ``p ≳ 100``
(``float16``) and always (``bfloat16``): every random column was dropped and drawn again,
forever (issue 24).
"""

from __future__ import annotations

import torch

from tinysubspace.operator import VectorSpace, working_dtype

__all__ = [
    "MAX_DRAWS",
    "KrylovBasis",
    "apply_operator",
    "drop_tolerance",
    "orthonormalize_against",
    "random_block",
    "working_dtype",
]

MAX_DRAWS = 8
"""Random draws for one direction before :meth:`KrylovBasis.random_direction` gives up (a
Gaussian vector in ``p > m`` dimensions has a component outside an ``m``-dimensional basis of
relative size about ``√((p − m)/p)``; eight misses in a row mean the bar is wrong)."""


def drop_tolerance(dtype: torch.dtype, p: int) -> float:
    """Relative norm below which a direction counts as already spanned: ``100 · ε · √p`` of the
    working precision of ``dtype`` (the rounding of ``p``-term inner products, 100 times over),
    at most ``1/4``.

    >>> drop_tolerance(torch.float16, 650) == drop_tolerance(torch.float32, 650) < 1e-3
    True
    """
    eps = torch.finfo(working_dtype(dtype)).eps
    return min(100 * eps * p**0.5, 0.25)


def random_block(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` standard normal block drawn on the CPU (float64) from ``generator``.

    Drawing on the CPU makes the numbers identical on every device and every process.
    """
    block = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return block.to(device=device, dtype=dtype)


def orthonormalize_against(block: torch.Tensor, basis: torch.Tensor | None,
                           drop_tol: float | None = None,
                           space: VectorSpace | None = None) -> torch.Tensor:
    """Orthonormal columns spanning ``(I − QQᵀ) block`` (Gram–Schmidt as
    :meth:`KrylovBasis.orthogonal_part`), computed in the working precision of ``block``'s dtype
    and returned in that dtype.

    Columns whose component outside ``span(basis)`` (and outside the preceding columns) is
    below ``drop_tol`` times their original norm are dropped, so the result may have fewer
    columns than ``block`` (none at all if ``block ⊂ span(basis)``).

    Args:
        block: ``(p, b)``.
        basis: ``(p, m)`` with orthonormal columns, or ``None``.
        drop_tol: relative norm below which a direction counts as already spanned (default
            :func:`drop_tolerance`).
        space: the inner product (default: local, :class:`~tinysubspace.operator.VectorSpace`).
    """
    p = block.shape[0]
    columns = KrylovBasis(p, working_dtype(block.dtype), block.device, block.shape[1],
                          locked=basis, images=False, space=space)
    columns.add_columns(block, drop_tol)
    return columns.Q.to(block.dtype)


def apply_operator(op, block: torch.Tensor, used: int) -> torch.Tensor:
    """``op @ block``, checked, in ``block``'s dtype: the block is converted to the operator's
    dtype (a float32 working block of a half-precision operator), the product must come back
    finite and in the operator's declared shape, dtype and device, and is converted back.

    Raises:
        ValueError: the product has another shape, dtype or device than the operator declares.
        FloatingPointError: it has NaN or infinite entries.
    """
    sent = block.to(dtype=op.dtype)
    image = op @ sent
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"op @ block must return a torch.Tensor, got {type(image).__name__}")
    if (image.shape, image.dtype, image.device) != (sent.shape, sent.dtype, sent.device):
        raise ValueError(
            f"op @ block must return a tensor of the block's shape {tuple(sent.shape)}, dtype "
            f"{sent.dtype} and device {sent.device} (the operator declares dtype={op.dtype}, "
            f"device={op.device}); got shape {tuple(image.shape)}, dtype {image.dtype}, device "
            f"{image.device}. Make the operator's products match its declared dtype and device")
    if not bool(torch.isfinite(image).all()):
        raise FloatingPointError(f"the operator returned non-finite values (after {used + 1} "
                                 "products)")
    return image.to(block.dtype)


class KrylovBasis:
    """Orthonormal vectors (and optionally their images) in row buffers of ``capacity`` rows.

    Args:
        p: the dimension.
        dtype: the working dtype (:func:`working_dtype` of the operator's).
        device: where the vectors live.
        capacity: rows reserved (the buffers grow if more are added).
        locked: ``(p, l)`` orthonormal columns (or a tuple of such blocks) every vector is also
            kept orthogonal to.
        images: keep ``H q_i`` beside each ``q_i``.
        space: the inner product of the vectors (:func:`~tinysubspace.operator.vector_space` of
            the operator); ``None``: local, of dimension ``p``. With a sharded space ``p`` is
            the number of local rows and every inner product and norm is reduced over ranks.
    """

    def __init__(self, p: int, dtype: torch.dtype, device: torch.device, capacity: int,
                 locked: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
                 images: bool = True, space: VectorSpace | None = None) -> None:
        self.p, self.dtype, self.device = p, dtype, torch.device(device)
        self.space = space if space is not None else VectorSpace(p)
        self.dim = self.space.dim
        self._Q = torch.empty(capacity, p, dtype=dtype, device=device)
        self._HQ = torch.empty(capacity, p, dtype=dtype, device=device) if images else None
        blocks = (locked,) if isinstance(locked, torch.Tensor) else (locked or ())
        self.locked = tuple(b.to(dtype) for b in blocks if b.shape[1] > 0)
        self.size = 0

    @property
    def Q(self) -> torch.Tensor:
        """``(p, m)`` the basis vectors as columns (a view)."""
        return self._Q[: self.size].T

    @property
    def HQ(self) -> torch.Tensor:
        """``(p, m)`` their images (a view)."""
        return self._HQ[: self.size].T

    @property
    def room(self) -> int:
        """Dimensions left: ``p`` minus the basis and the locked block."""
        return self.dim - self.size - sum(b.shape[1] for b in self.locked)

    def orthogonal_part(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, h)`` with ``w = Q h + V c + f``, ``f ⊥ Q, V`` (``V`` the locked block):
        classical Gram–Schmidt twice, a third time when the second pass removed more than half
        of what was left (DGKS). ``h`` (``(m,)``) is ``Qᵀ w`` to rounding."""
        Q = self._Q[: self.size]
        h = self.space.gram(Q.T, w)
        f = w - Q.T @ h
        f = self._unlock(f)
        for _ in range(2):
            before = self.space.norm(f)
            correction = self.space.gram(Q.T, f)
            f = self._unlock(f - Q.T @ correction)
            h = h + correction
            if self.space.norm(f) > 0.5 * before:
                break
        return f, h

    def _unlock(self, f: torch.Tensor) -> torch.Tensor:
        for block in self.locked:
            f = f - block @ self.space.gram(block, f)
        return f

    def add_columns(self, block: torch.Tensor, drop_tol: float | None = None) -> torch.Tensor:
        """Append the orthonormalised columns of ``block`` (``(p, b)``) that are not already
        spanned (:func:`drop_tolerance`); returns them, ``(p, b')`` with ``b' ≤ b``. Only for a
        basis without images (the caller adds images with :meth:`append`)."""
        drop_tol = drop_tolerance(self.dtype, self.dim) if drop_tol is None else drop_tol
        start = self.size
        for column in block.to(self.dtype).T:
            norm = float(self.space.norm(column))
            f, _ = self.orthogonal_part(column)
            length = float(self.space.norm(f))
            if norm > 0 and length > drop_tol * norm:
                self._put(f / length)
        return self._Q[start: self.size].T

    def fill_random(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """Append seeded random directions (a ``(p, count − size)`` Gaussian block, orthonormalised
        by :meth:`add_columns`) until the basis holds ``count`` vectors; returns the basis.

        Raises:
            RuntimeError: ``count`` exceeds the room, or :data:`MAX_DRAWS` draws left it short.
        """
        if count - self.size > self.room:
            raise RuntimeError(f"cannot add {count - self.size} directions: the basis "
                               f"({self.size} vectors) and its locked blocks leave {self.room} "
                               f"of p = {self.dim} dimensions")
        for _ in range(MAX_DRAWS):
            if self.size >= count:
                return self.Q
            self.add_columns(self.space.random_block(count - self.size, self.dtype, self.device,
                                                      gen))
        if self.size >= count:
            return self.Q
        raise RuntimeError(f"{MAX_DRAWS} random blocks in p = {self.dim} dimensions left "
                           f"{count - self.size} of {count} directions inside the span of the "
                           f"basis to within the drop tolerance "
                           f"{drop_tolerance(self.dtype, self.dim):.1e} ({self.dtype}); expected a "
                           "component outside it of about sqrt((p - m)/p)")

    def random_direction(self, gen: torch.Generator) -> torch.Tensor:
        """A unit ``(p,)`` vector orthogonal to the basis and the locked blocks, from seeded
        Gaussian draws (:meth:`fill_random`; not appended).

        Raises:
            RuntimeError: no room is left, or :data:`MAX_DRAWS` draws were all dropped.
        """
        scratch = KrylovBasis(self.p, self.dtype, self.device, 1,
                              locked=(*self.locked, self.Q), images=False, space=self.space)
        return scratch.fill_random(1, gen)[:, 0]

    def invariant(self, beta: float, scale: float) -> bool:
        """Whether a new direction of norm ``beta`` is rounding only: ``β ≤ 100 ε_w · scale``
        (``scale`` = max of ``|θ|`` and ``‖H q‖``): an invariant subspace was found."""
        return beta <= 100 * torch.finfo(self.dtype).eps * scale

    def append(self, q: torch.Tensor, image: torch.Tensor | None = None) -> None:
        """Append ``(p, b)`` (or ``(p,)``) orthonormal vectors (already orthogonal to the basis)
        and their images."""
        q = q.reshape(self.p, -1)
        image = None if image is None else image.reshape(self.p, -1)
        for j in range(q.shape[1]):
            self._put(q[:, j], None if image is None else image[:, j])

    def _put(self, q: torch.Tensor, image: torch.Tensor | None = None) -> None:
        if self.size == self._Q.shape[0]:
            grow = max(1, self.size // 2)
            self._Q = torch.cat([self._Q, self._Q.new_empty(grow, self.p)])
            if self._HQ is not None:
                self._HQ = torch.cat([self._HQ, self._HQ.new_empty(grow, self.p)])
        self._Q[self.size] = q
        if image is not None:
            self._HQ[self.size] = image
        self.size += 1

    def rotate(self, Y: torch.Tensor) -> None:
        """Keep only ``Q Y`` (and ``HQ Y``): the thick restart onto Ritz vectors (``Y``
        ``(m, keep)`` with orthonormal columns)."""
        keep = Y.shape[1]
        Y = Y.to(self.dtype)
        self._Q[:keep] = Y.T @ self._Q[: self.size]
        if self._HQ is not None:
            self._HQ[:keep] = Y.T @ self._HQ[: self.size]
        self.size = keep
