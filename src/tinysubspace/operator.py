"""Symmetric linear operators: the one interface every solver in tinysubspace takes.

A solver never sees a model. It sees something with ``shape``, ``dtype``, ``device`` and
``@`` (STYLE.md point 1): a Hessian over a data set, a dense test matrix, or an operator built
from others.
"""

from __future__ import annotations

import abc

import numpy as np
import torch

__all__ = ["DenseOperator", "DifferenceOperator", "SymmetricOperator", "VectorSpace",
           "vector_space", "working_dtype"]


class SymmetricOperator(abc.ABC):
    """A symmetric ``(p, p)`` operator applied to vectors ``(p,)`` or blocks ``(p, b)``.

    Subclasses implement :meth:`_matmat` for a ``(p, b)`` block; this class validates input,
    handles the 1-D case and counts products (a block of ``b`` columns counts ``b``).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self._size = int(size)
        self._dtype = dtype
        self._device = torch.device(device)
        self._matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(p, p)``."""
        return (self._size, self._size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype products are computed and returned in."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device products are computed and returned on."""
        return self._device

    @property
    def matvecs(self) -> int:
        """Operator-vector products done so far (a block of ``b`` columns counts ``b``)."""
        return self._matvecs

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(p,)`` or ``(p, b)``; returns the same shape.

        Raises:
            TypeError: ``v`` is not a tensor.
            ValueError: ``v`` is not 1-D or 2-D, or its first dimension is not ``p``.
        """
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape ({self._size},) or "
                            f"({self._size}, b), got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[0] != self._size:
            raise ValueError(f"expected a vector of shape ({self._size},) or a block of shape "
                             f"({self._size}, b), got shape {tuple(v.shape)}")
        block = v.reshape(self._size, -1).to(device=self._device, dtype=self._dtype)
        if block.shape[1] == 0:
            return torch.empty_like(block).reshape(v.shape)
        result = self._matmat(block)
        self._matvecs += block.shape[1]
        return result.reshape(v.shape)

    @abc.abstractmethod
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``A @ block`` for a validated ``(p, b)`` block, ``b >= 1``."""

    def __sub__(self, other: SymmetricOperator) -> DifferenceOperator:
        """``A - B`` as an operator (:class:`DifferenceOperator`), e.g. Hessian minus GGN."""
        if not isinstance(other, SymmetricOperator):
            return NotImplemented
        return DifferenceOperator(self, other)

    def to_scipy(self):
        """This operator as a :class:`scipy.sparse.linalg.LinearOperator` (numpy in and out).

        Products are computed by this operator (and counted in :attr:`matvecs`); numpy arrays
        are converted to this operator's dtype and device and back.
        """
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty((), dtype=self._dtype).numpy().dtype

        def matmat(x: np.ndarray) -> np.ndarray:
            block = torch.as_tensor(np.asarray(x, dtype=np_dtype))
            out = self @ block.reshape(self._size, -1)
            return out.detach().cpu().numpy().reshape(x.shape)

        return LinearOperator(self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat,
                              rmatmat=matmat, dtype=np_dtype)


class DenseOperator(SymmetricOperator):
    """A symmetric matrix held in memory, as an operator (for tests and small problems).

    Args:
        matrix: a square ``(p, p)`` tensor; it is used as given (symmetry is checked).
        check_symmetric: raise if ``matrix`` is not symmetric to ``max(1e-8, 100 eps)`` relative.

    Raises:
        ValueError: the matrix is not square, not finite, or not symmetric.
    """

    def __init__(self, matrix: torch.Tensor, check_symmetric: bool = True) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape "
                             f"{tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("DenseOperator needs a finite matrix; it has NaN or infinite entries")
        if check_symmetric:
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > max(1e-8, 100 * torch.finfo(matrix.dtype).eps):
                raise ValueError(f"DenseOperator needs a symmetric matrix; max |A - A^T| / max|A| "
                                 f"= {asym:.2e}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block


class DifferenceOperator(SymmetricOperator):
    """``A − B`` of two symmetric operators of the same shape: ``(A − B) V = A V − B V``.

    Each product costs one product with ``A`` and one with ``B`` (each counted by its own
    operator too). Dtype and device are ``A``'s; ``B``'s products are converted to them.

    Raises:
        TypeError: an argument is not a :class:`SymmetricOperator`.
        ValueError: the shapes differ.
    """

    def __init__(self, a: SymmetricOperator, b: SymmetricOperator) -> None:
        for name, op in (("a", a), ("b", b)):
            if not isinstance(op, SymmetricOperator):
                raise TypeError(f"DifferenceOperator needs two SymmetricOperators; {name} is a "
                                f"{type(op).__name__}")
        if a.shape != b.shape:
            raise ValueError(f"cannot subtract operators of different shapes: {a.shape} and "
                             f"{b.shape}")
        super().__init__(a.shape[0], a.dtype, a.device)
        self.a, self.b = a, b
        self.vector_space = getattr(a, "vector_space", None)  # vectors sharded like a's

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.a @ block - (self.b @ block).to(dtype=self.dtype, device=self.device)


class VectorSpace:
    """The inner product of an operator's vectors: plain local tensor algebra.

    A solver forms every inner product, norm and random draw of ``p``-vectors through the
    operator's space (:func:`vector_space`), so that an operator whose vectors are *sharded*
    across processes (each rank holds rows of one global vector,
    :class:`~tinysubspace.curvature.sharded.ShardedSpace`) can reduce them over ranks. For
    ``A`` ``(p, a)`` and ``B`` ``(p, b)`` held as local rows, ``gram(A, B) = Σ_ranks A_rᵀ B_r``.
    This default is one process: ``dim`` is ``p`` and nothing is reduced.

    Args:
        dim: the dimension ``p`` of the (global) space.
    """

    sharded = False
    """Whether vectors are held as rows on several processes (inner products reduced)."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``Aᵀ B`` (``(a, b)``; a vector argument gives the matching lower-dimensional result)."""
        return A.T @ B if A.ndim == 2 else A @ B

    def norm(self, A: torch.Tensor) -> torch.Tensor:
        """``‖A‖``: a scalar for a vector, the column norms ``(b,)`` for a block."""
        squares = A.square().sum(0)
        return self.reduce(squares).sqrt()

    def reduce(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a small tensor computed from local rows (here: itself)."""
        return local

    def random_block(self, cols: int, dtype: torch.dtype, device: torch.device,
                     generator: torch.Generator) -> torch.Tensor:
        """The local rows of a ``(dim, cols)`` standard normal block drawn on the CPU (float64)
        from ``generator``: identical numbers on every device and process."""
        block = torch.randn(self.dim, cols, generator=generator, dtype=torch.float64)
        return self.local_rows(block).to(device=device, dtype=dtype)

    def local_rows(self, block: torch.Tensor) -> torch.Tensor:
        """The rows of a global ``(dim, ·)`` block this process holds (here: all)."""
        return block


def vector_space(op) -> VectorSpace:
    """``op.vector_space`` if the operator declares one, else the local space of dimension
    ``op.shape[0]``."""
    space = getattr(op, "vector_space", None)
    return space if space is not None else VectorSpace(op.shape[0])


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on the vectors of an operator of ``dtype`` is done in: ``float32``
    for ``float16`` and ``bfloat16`` (a solver's basis, a half-precision model's sums and
    finite differences), ``dtype`` itself otherwise.

    >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
