"""The Hessian of a model sharded with FSDP2 (``fully_shard``): sharded vectors, products from
finite differences of ordinary gradients.

Under FSDP2 every parameter is a ``DTensor`` of which each rank holds a shard (rows of dimension
0). The operator's vectors are sharded the same way: on rank ``r`` a vector is the concatenation
of the rank's local shards of each parameter (``p_r`` numbers, ``Σ_r p_r = p``), so a Lanczos
basis of ``m`` vectors costs each rank ``m · p_r ≈ m p / world`` numbers. Inner products and
norms are sums over ranks (:class:`ShardedSpace`, the operator's ``vector_space``; every solver
of :mod:`tinysubspace.linalg` forms its inner products through it).

**Loss.** Rank ``r`` holds ``n_r`` examples (``N = Σ_r n_r``, uneven shards allowed) and
computes its mean loss ``ℓ_r``; the loss measured is the mean over all examples,
``L = Σ_r (n_r / N) ℓ_r``. FSDP2 reduce-scatters gradients as a *mean* over ranks, so each rank
back-propagates ``(n_r · world / N) ℓ_r``: the mean over ranks of these gradients is ``∇L``.

**Products.** Double backward does not run through FSDP2's gradient hooks, so ``H v`` is the
central difference of ordinary gradients (``hvp_method="finite_difference"``),

.. math::  H v \\approx \\frac{\\nabla L(\\theta + h v) - \\nabla L(\\theta - h v)}{2 h},
           \\qquad h = \\epsilon^{1/3} \\max(\\lVert\\theta\\rVert, 1) / \\lVert v \\rVert,

or its Richardson extrapolation (``"finite_difference4"``), with the step and error floor of
:class:`~tinysubspace.curvature.hvp.FiniteDifference` (norms over all ranks). Each rank adds its
shard of ``h v`` to its shards of the parameters in place (under ``no_grad``), runs an ordinary
forward and backward over its local data and reads its gradient shard; the parameters (and any
``.grad`` the caller had) are restored exactly afterwards.

**Random directions** are the rows this rank holds of one global Gaussian ``(p, b)`` block drawn
on the CPU from the solver's seeded generator (the same draw on every rank), so a solve makes
the same random choices as a single-process solve of the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tinysubspace.curvature.data import call_model, checked_loss
from tinysubspace.curvature.dataset_operator import module_mode
from tinysubspace.curvature.hvp import FiniteDifference
from tinysubspace.operator import SymmetricOperator, VectorSpace

__all__ = ["ShardedHessianOperator", "ShardedSpace", "is_sharded_model"]

_POINTS = {"auto": 2, "finite_difference": 2, "finite_difference4": 4}


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``)."""
    kind = _dtensor_type()
    return kind is not None and any(isinstance(p, kind) for p in model.parameters()
                                    if p.requires_grad)


class ShardedSpace(VectorSpace):
    """Vectors held as local rows on each rank: inner products all-reduced over ``group``.

    Args:
        dim: the global dimension ``p``.
        index: ``(p_r,)`` int64, the global positions (``named_parameters`` order, each parameter
            flattened) of the rows this rank holds.
        group: the process group of the shards.
    """

    def __init__(self, dim: int, index: torch.Tensor, group: Any = None) -> None:
        super().__init__(dim)
        self.index, self.group = index, group

    def reduce(self, local: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks local`` (every rank gets the same numbers)."""
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks A_rᵀ B_r``."""
        return self.reduce(super().gram(A, B))

    def local_rows(self, block: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global ``(p, ·)`` (or ``(p,)``) tensor."""
        return block[self.index.to(block.device)]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The global ``(p, ·)`` tensor from every rank's rows (e.g. eigenvectors of a small
        model; every rank gets it, and must call this together)."""
        full = local.new_zeros((self.dim, *local.shape[1:]))
        full[self.index.to(local.device)] = local
        return self.reduce(full)


class ShardedHessianOperator(SymmetricOperator):
    """``H = ∇²L`` of an FSDP2 model over every rank's data, on vectors sharded like the
    parameters (module docstring). Every rank must call each method together.

    ``op.shape`` is ``(p_r, p_r)``, the local rows ``@`` takes and returns; the global dimension
    is ``op.vector_space.dim``. Eigenvalues from :func:`~tinysubspace.top_eigenpairs` are the
    same on every rank, eigenvectors local shards (:meth:`ShardedSpace.gather` assembles them).

    Args:
        model: a module whose trainable parameters are all FSDP2 ``DTensor`` s (sharded on
            dimension 0), in the dtype to measure in.
        loss_fn: ``loss_fn(outputs, targets)``, the *mean* loss of a batch.
        data: this rank's ``(inputs, targets)`` (one forward pass each gradient; at least one
            example on every rank).
        params: ``None`` only (every trainable parameter).
        dtype, device: ``None`` or the parameters' own (the model itself is perturbed).
        mode: ``"eval"`` (default) or ``"train"``.
        hvp_method: ``"finite_difference"`` (``"auto"``) or ``"finite_difference4"``.
        chunk_size (old name ``batch_size``), distributed: accepted for
            :class:`~tinysubspace.HessianOperator`'s signature and ignored (the local data is
            one batch; the operator is always distributed); so is ``graph_memory`` (``**ignored``).

    Raises:
        TypeError: a parameter that is not a ``DTensor``, or ``data`` not an ``(X, Y)`` pair.
        ValueError: an exact ``hvp_method``, another ``dtype`` / ``device`` or a ``params``
            selection, a bad ``mode``, or a rank without data.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None,
                 dtype: torch.dtype | None = None, device: Any = None, mode: str = "eval",
                 chunk_size: int | None = None, distributed: bool | None = None,
                 hvp_method: str = "auto", **ignored: Any) -> None:
        self._params = _sharded_parameters(model, params)
        first = self._params[0]
        _check_options(first, dtype, device, mode, hvp_method)
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.hvp_method, self._fd = hvp_method, FiniteDifference(_POINTS[hvp_method])
        self.group = first.device_mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.inputs, self.targets = _local_data(data, first.dtype, first.device)
        local = self._local_shards()
        super().__init__(sum(t.numel() for t in local), first.dtype, first.device)
        self.vector_space = ShardedSpace(sum(p.numel() for p in self._params),
                                         _global_index(self._params), self.group)
        self._theta = torch.cat([t.detach().reshape(-1) for t in local]).clone()
        self._theta_norm = float(self.vector_space.norm(self._theta))
        self._local_count = int(_batch_size(self.targets))
        counts = self.vector_space.reduce(torch.tensor(
            [float(self._local_count), float(self._local_count == 0)], dtype=torch.float64,
            device=self.device))
        if counts[1] > 0:
            raise ValueError(f"every rank needs at least one example; {int(counts[1])} of "
                             f"{self.world} ranks hold none")
        self.num_examples = int(counts[0])
        self._largest_error = self.last_product_error = 0.0

    # ------------------------------------------------------------------ the maths
    @property
    def parameters_vector(self) -> torch.Tensor:
        """This rank's shard of the point ``θ`` (``(p_r,)``)."""
        return self._theta.clone()

    @property
    def product_error(self) -> float:
        """Relative error floor of the products (``ε^{2/3}``, or larger estimates seen)."""
        return max(self._fd.error_floor(self.dtype), self._largest_error)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss ``L`` over all ranks' data and this rank's shard of ``∇L``."""
        loss, grad = self._gradient(None)
        return loss, grad

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(block)
        norms = self.vector_space.norm(block)
        errors = []
        for j in range(block.shape[1]):
            out[:, j], error = self._column(block[:, j], float(norms[j]))
            errors.append(error)
        self.last_product_error = max(errors)
        self._largest_error = max(self._largest_error, self.last_product_error)
        return out

    def _column(self, v: torch.Tensor, v_norm: float) -> tuple[torch.Tensor, float]:
        """``H v`` by central differences (Richardson with 4 points) and its relative error."""
        if v_norm == 0:
            return torch.zeros_like(v), 0.0
        eps = torch.finfo(self.dtype).eps
        h = self._fd.step(self._theta_norm, v_norm, self.dtype)
        plus, minus = self._gradient(h * v)[1], self._gradient(-h * v)[1]
        d2 = (plus - minus) / (2 * h)
        rounding = 2 * eps * float(self.vector_space.norm(torch.stack([plus, minus], 1)).sum())
        rounding /= 2 * h
        result, error = d2, rounding
        if self._fd.points == 4:
            wide = (self._gradient(2 * h * v)[1] - self._gradient(-2 * h * v)[1]) / (4 * h)
            result = (4 * d2 - wide) / 3
            error = float(self.vector_space.norm(result - d2)) + rounding
        scale = max(float(self.vector_space.norm(result)), float(torch.finfo(self.dtype).tiny))
        return result, error / scale

    def _gradient(self, shift: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        """``(L, ∇L)`` at ``θ + shift`` (this rank's shard of each), model restored after."""
        weight = self._local_count * self.world / self.num_examples
        with self._perturbed(shift), module_mode(self.model, self.mode == "train"):
            with torch.enable_grad():
                loss = checked_loss(self.loss_fn(call_model(self.model, self.inputs),
                                                 self.targets), 0)
                (weight * loss).backward()
            grads = [torch.zeros(t.numel(), dtype=self.dtype, device=self.device)
                     if p.grad is None else p.grad.to_local().detach().reshape(-1).clone()
                     for p, t in zip(self._params, self._local_shards(), strict=True)]
        total = self.vector_space.reduce(loss.detach().reshape(1) * self._local_count)
        if not bool(torch.isfinite(total).all()):
            raise FloatingPointError("the loss is not finite at the perturbed parameters")
        return float(total[0]) / self.num_examples, torch.cat(grads)

    @contextlib.contextmanager
    def _perturbed(self, shift: torch.Tensor | None) -> Iterator[None]:
        """Parameters at ``θ + shift`` and ``.grad`` cleared; both restored on exit."""
        local = self._local_shards()
        saved = [t.detach().clone() for t in local]
        grads = [p.grad for p in self._params]
        point = self._theta if shift is None else self._theta + shift
        try:
            with torch.no_grad():
                offset = 0
                for t in local:
                    t.copy_(point[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()
            for p in self._params:
                p.grad = None
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(local, saved, strict=True):
                    t.copy_(s)
            for p, g in zip(self._params, grads, strict=True):
                p.grad = g

    def _local_shards(self) -> list[torch.Tensor]:
        return [p.to_local() for p in self._params]


def _sharded_parameters(model: torch.nn.Module, params: Any) -> list[torch.Tensor]:
    if params is not None:
        raise ValueError(f"a sharded (FSDP2) model is measured in all its trainable parameters: "
                         f"params must be None, got {params!r}")
    kind = _dtensor_type()
    chosen = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    plain = [name for name, p in chosen if kind is None or not isinstance(p, kind)]
    if not chosen or plain:
        raise TypeError(f"ShardedHessianOperator needs every trainable parameter sharded by "
                        f"FSDP2 (a DTensor; wrap the model with fully_shard); got plain tensors "
                        f"for {plain or 'no parameters at all'}")
    return [p for _, p in chosen]


def _check_options(first: torch.Tensor, dtype: Any, device: Any, mode: str,
                   hvp_method: str) -> None:
    if hvp_method not in _POINTS:
        raise ValueError(f"an FSDP2 model's Hessian needs hvp_method 'finite_difference' "
                         f"(or 'auto') or 'finite_difference4': double backward does not run "
                         f"through FSDP2's gradient hooks; got {hvp_method!r}")
    if dtype is not None and dtype != first.dtype:
        raise ValueError(f"an FSDP2 model is measured in its own dtype {first.dtype} (its "
                         f"parameters are perturbed in place); got dtype={dtype}")
    if device is not None and torch.device(device) != first.device:
        raise ValueError(f"an FSDP2 model is measured on its own device {first.device}; got "
                         f"device={device}")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")


def _local_data(data: Any, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], torch.Tensor)):
        raise TypeError(f"an FSDP2 operator takes this rank's data as an (inputs, targets) pair "
                        f"of tensors, got {type(data).__name__}")
    inputs, targets = data
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.to(device=device, dtype=dtype)
    return inputs, targets.to(device=device)


def _batch_size(targets: torch.Tensor) -> int:
    return int(targets.shape[0]) if targets.ndim else 1


def _global_index(params: list[torch.Tensor]) -> torch.Tensor:
    """Global flat positions of this rank's rows: each parameter's index tensor sharded the same
    way as the parameter (``distribute_tensor`` with its mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    pieces, offset = [], 0
    for p in params:
        numbers = torch.arange(offset, offset + p.numel(), dtype=torch.int64,
                               device=p.device).reshape(p.shape)
        pieces.append(distribute_tensor(numbers, p.device_mesh, p.placements).to_local()
                      .reshape(-1))
        offset += p.numel()
    return torch.cat(pieces)
