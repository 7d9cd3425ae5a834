"""The Hessian of a model sharded with FSDP2 (``fully_shard``): sharded vectors, products from
finite differences of ordinary gradients.

Under FSDP2 every parameter is a ``DTensor`` of which each rank holds a shard (rows of dimension
0). The operator's vectors are sharded the same way (:mod:`tinysubspace.curvature.shards`): on
rank ``r`` a vector is the concatenation of the rank's local shards of each measured parameter
(``p_r`` numbers, ``Σ_r p_r = p``), so a Lanczos basis of ``m`` vectors costs each rank
``m · p_r ≈ m p / world`` numbers; inner products and norms are sums over ranks
(:class:`~tinysubspace.curvature.shards.ShardedSpace`, the operator's ``vector_space``).

**Loss.** Rank ``r`` holds batches ``B_{r,j}`` of sizes ``n_{r,j}`` — the batch dimension, or
the count a :class:`~tinysubspace.curvature.data.Batch` states (the size hook: counted tokens of
a language model, ``count_tokens(labels, shift=True)``), exactly as a single-process
:class:`~tinysubspace.HessianOperator` weights its batches — with mean losses ``ℓ_{r,j}``. The
loss measured is the mean over all ranks' data, ``L = Σ_{r,j} (n_{r,j} / N) ℓ_{r,j}``
(``N = Σ_{r,j} n_{r,j}``). FSDP2 reduce-scatters gradients as a *mean* over ranks and
accumulates them over backward passes, so each rank back-propagates
``(n_{r,j} · world / N) ℓ_{r,j}`` for each of its batches: the accumulated gradient is ``∇L``.
FSDP2's all-gathers need the same number of forward passes on every rank: a rank with fewer
batches than the most any rank holds repeats its last batch with weight 0.

**Products.** Double backward does not run through FSDP2's gradient hooks, so ``H v`` is the
central difference of ordinary gradients (``hvp_method="finite_difference"``),

.. math::  H v \\approx \\frac{\\nabla L(\\theta + h v) - \\nabla L(\\theta - h v)}{2 h},
           \\qquad h = \\kappa \\max(\\lVert\\theta\\rVert, 1) / \\lVert v \\rVert,

or its Richardson extrapolation (``"finite_difference4"``), with the step (``κ`` calibrated at
the first product), the probes of the truncation and the error floor of
:class:`~tinysubspace.curvature.finite_difference.FiniteDifference` (norms over all ranks, so
every rank picks the same step). Each rank adds its shard of ``h v`` to its shards of the
parameters in place (under ``no_grad``), runs ordinary forwards and backwards over its local
batches and reads its gradient shards. The point ``θ`` and the buffers (batch-norm statistics)
are snapshots taken when the operator is built: every gradient is taken at the snapshot, and
the model's parameters, buffers and any ``.grad`` the caller had are restored exactly
afterwards.

**Half precision** (a bf16 or float16 model, no float32 copy): as in one process
(:class:`~tinysubspace.curvature.finite_difference.FiniteDifference`), the point ``θ ± h v`` is
formed in float32 from the snapshot's shard and the float32 direction, one parameter shard at a
time (a transient float32 shadow of the largest local shard), and rounded to the model's dtype
once; each backward's gradient shards are added into a float32 sum over the batches
(:func:`~tinysubspace.curvature.finite_difference.accumulation_dtype`), and the differences and
the division by ``2h`` are float32; products and the gradient are returned in the model's dtype.
Left in the model's dtype: the forward and backward passes, FSDP2's reduce-scatter over ranks
(its sum is in the parameters' dtype unless the model was wrapped with a
``MixedPrecisionPolicy(reduce_dtype=torch.float32)``) and, where the loss itself is bf16, the
batch weight ``n_{r,j} world / N`` by which it is scaled before the backward (2^-9 relative).
Measured on 2 ranks (docs/scale.md, "Low precision"): top-3 eigenvalues within 3.7e-2 of the
float64 ones of the same weights, within 3.6e-2 of the single-process bf16 ones.

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

from tinysubspace.curvature.data import Batch, BatchSource, call_model, checked_loss
from tinysubspace.curvature.dataset_operator import module_mode
from tinysubspace.curvature.finite_difference import FiniteDifference, accumulation_dtype
from tinysubspace.curvature.layout import select_parameters
from tinysubspace.curvature.shards import (
    ShardedSpace,
    dtensor_type,
    global_index,
    is_sharded_model,
)
from tinysubspace.operator import SymmetricOperator

__all__ = ["ShardedHessianOperator", "ShardedSpace", "is_sharded_model"]

_POINTS = {"auto": 2, "finite_difference": 2, "finite_difference4": 4}


class ShardedHessianOperator(SymmetricOperator):
    """``H = ∇²L`` of an FSDP2 model over every rank's data, on vectors sharded like the
    parameters (module docstring). Every rank must call each method together.

    ``op.shape`` is ``(p_r, p_r)``, the local rows ``@`` takes and returns; the global dimension
    is ``op.vector_space.dim``. Eigenvalues from :func:`~tinysubspace.top_eigenpairs` are the
    same on every rank, eigenvectors local shards (:meth:`ShardedSpace.gather` assembles them).

    Args:
        model: a module whose measured parameters are FSDP2 ``DTensor`` s (sharded on
            dimension 0), in the dtype to measure in.
        loss_fn: ``loss_fn(outputs, targets)``, the *mean* loss of a batch.
        data: this rank's data, as a single-process operator takes it: ``(X, Y)`` tensors
            (split by ``chunk_size``), a ``DataLoader`` or list of ``(inputs, targets)`` pairs,
            of dicts (keyword inputs, targets ``item["labels"]``) or of
            :class:`~tinysubspace.curvature.data.Batch` es (their ``size`` weights them). Every
            rank needs at least one counted example; ranks may hold different numbers of
            batches, but each pass must yield the same batches as the first.
        params: ``None`` (every trainable parameter) or names / parameter tensors, all sharded
            and requiring grad (the operator acts on their subspace).
        dtype, device: ``None`` or the parameters' own (the model itself is perturbed).
        mode: ``"eval"`` (default) or ``"train"``.
        chunk_size: examples of an ``(X, Y)`` pair per forward pass (``batch_size``: old name).
        hvp_method: ``"finite_difference"`` (``"auto"``) or ``"finite_difference4"``.
        distributed: accepted for :class:`~tinysubspace.HessianOperator`'s signature and
            ignored (the operator is always distributed); so is ``graph_memory``.

    Raises:
        TypeError: a measured parameter that is not a ``DTensor``, or ``data`` of an unusable
            kind (as for :class:`~tinysubspace.HessianOperator`).
        ValueError: an exact ``hvp_method``, another ``dtype`` / ``device``, a bad ``params``
            selection or ``mode``, a rank without data, or (in a pass) a rank whose data yields
            more batches than when the operator was built.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None,
                 dtype: torch.dtype | None = None, device: Any = None, mode: str = "eval",
                 chunk_size: int | None = None, distributed: bool | None = None,
                 hvp_method: str = "auto", *, batch_size: int | None = None,
                 **ignored: Any) -> None:
        self._params = _sharded_parameters(model, params)
        first = self._params[0]
        _check_options(first, dtype, device, mode, hvp_method)
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.hvp_method, self._fd = hvp_method, FiniteDifference(_POINTS[hvp_method])
        self.group = first.device_mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.batches = BatchSource(data, device=first.device, dtype=first.dtype,
                                   chunk_size=chunk_size, batch_size=batch_size)
        local = self._local_shards()
        super().__init__(sum(t.numel() for t in local), first.dtype, first.device)
        self.vector_space = ShardedSpace(sum(p.numel() for p in self._params),
                                         global_index(self._params), self.group)
        self._theta = torch.cat([t.detach().reshape(-1) for t in local]).clone()
        self._theta_norm = float(self.vector_space.norm(
            self._theta.to(accumulation_dtype(first.dtype))))
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._count_batches()
        self._largest_error = self.last_product_error = 0.0

    # ------------------------------------------------------------------ the maths
    @property
    def parameters_vector(self) -> torch.Tensor:
        """This rank's shard of the point ``θ`` (``(p_r,)``)."""
        return self._theta.clone()

    @property
    def product_error(self) -> float:
        """Relative error floor of the products (``ε^{2/3}``; bf16's measured 0.1), or larger
        estimates seen, at most 0.5 (as for a single-process operator)."""
        return min(max(self._fd.error_floor(self.dtype), self._largest_error), 0.5)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss ``L`` over all ranks' data and this rank's shard of ``∇L`` (summed
        in float32 for a half-precision model, returned in the model's dtype)."""
        loss, grad = self._gradient(None)
        return loss, grad.to(self.dtype)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        work = accumulation_dtype(self.dtype)  # float32 for a half-precision model
        out = torch.empty(block.shape, dtype=work, device=block.device)
        norms = self.vector_space.norm(block.to(work))
        errors = []
        for j in range(block.shape[1]):
            out[:, j], error = self._column(block[:, j].to(work), float(norms[j]),
                                            self._fd.probes(self.matvecs + j))
            errors.append(error)
        self.last_product_error = max(errors)
        self._largest_error = max(self._largest_error, self.last_product_error)
        return out.to(self.dtype)

    def _column(self, v: torch.Tensor, v_norm: float, probe: bool) -> tuple[torch.Tensor, float]:
        """``H v`` by central differences (Richardson with 4 points) and its relative error,
        in ``v``'s dtype (float32 for a half-precision model): the step calibrated at the
        first product and the truncation probed on every ``probe_every``-th column, by the
        shared :class:`~tinysubspace.curvature.finite_difference.FiniteDifference`."""
        if v_norm == 0:
            return torch.zeros_like(v), 0.0
        result, error = self._fd.column(
            lambda t: self._gradient(v, t)[1], self._theta_norm, v_norm, self.dtype,
            lambda x: float(self.vector_space.norm(x)), probe=probe)
        scale = max(float(self.vector_space.norm(result)), float(torch.finfo(self.dtype).tiny))
        return result, error / scale

    def _gradient(self, v: torch.Tensor | None, t: float = 0.0) -> tuple[float, torch.Tensor]:
        """``(L, ∇L)`` at ``θ + t v`` (this rank's shard of each), model restored after.

        The gradient is summed over the batches in :func:`~tinysubspace.curvature.finite_difference.
        accumulation_dtype` (float32 for a half-precision model): each backward's gradient
        shards are read and added, the ``.grad`` cleared, so no sum is rounded to bf16."""
        scale = self.world / self.num_examples
        work = accumulation_dtype(self.dtype)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        grads = [torch.zeros(shard.numel(), dtype=work, device=self.device)
                 for shard in self._local_shards()]
        with self._perturbed(v, t), module_mode(self.model, self.mode == "train"):
            for index, batch, size in self._passes():
                with torch.enable_grad():
                    loss = checked_loss(self.loss_fn(call_model(self.model, batch.inputs),
                                                     batch.targets), index)
                    (size * scale * loss).backward()
                total += size * loss.detach().to(torch.float64)
                for p, acc in zip(self._params, grads, strict=True):
                    if p.grad is not None:
                        acc += p.grad.to_local().detach().reshape(-1).to(work)
                        p.grad = None
        total = self.vector_space.reduce(total)
        if not bool(torch.isfinite(total).all()):
            raise FloatingPointError("the loss is not finite at the perturbed parameters")
        return float(total[0]) / self.num_examples, torch.cat(grads)

    # ---------------------------------------------------------------- the data
    def _passes(self) -> Iterator[tuple[int, Batch, int]]:
        """``(index, batch, weight)`` for each forward this rank runs in one pass: its own
        batches (weight ``n_{r,j}``), then its last batch again with weight 0 until every rank
        has run :attr:`max_batches` forwards (FSDP2's collectives must match)."""
        last, count = None, 0
        for index, batch in enumerate(self.batches):
            if index >= self.max_batches:
                raise ValueError(f"this rank's data yielded more than the {self.max_batches} "
                                 f"batches it held when the operator was built; every pass "
                                 f"must yield the same batches (no shuffling with drop_last)")
            last, count = batch, index + 1
            yield index, batch, batch.size
        if last is None:
            raise ValueError("this rank's data yielded no batch in this pass, but held some "
                             "when the operator was built; every pass must yield the same "
                             "batches")
        for index in range(count, self.max_batches):
            yield index, last, 0

    def _count_batches(self) -> None:
        """``num_examples`` (``N``, all ranks), ``local_batches`` and ``max_batches``."""
        sizes = [batch.size for batch in self.batches]
        self.local_batches = len(sizes)
        counts = torch.tensor([[float(sum(sizes)), float(not sizes)], [len(sizes), 0.0]],
                              dtype=torch.float64, device=self.device)
        summed = self.vector_space.reduce(counts[0])
        largest = counts[1].clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.group)
        if summed[1] > 0:
            raise ValueError(f"every rank needs at least one example; {int(summed[1])} of "
                             f"{self.world} ranks hold none")
        self.num_examples, self.max_batches = int(summed[0]), int(largest[0])

    # ----------------------------------------------------------- the model
    @contextlib.contextmanager
    def _perturbed(self, v: torch.Tensor | None, t: float) -> Iterator[None]:
        """Parameters at ``θ + t v``, buffers at their snapshot, every ``.grad`` cleared; all
        restored on exit. The point is formed in ``v``'s dtype (float32 for a half-precision
        model) one parameter shard at a time and rounded once to the model's dtype, as
        :func:`~tinysubspace.curvature.finite_difference.FiniteDifference` does in one process."""
        local = self._local_shards()
        saved = [shard.detach().clone() for shard in local]
        buffers = [b.detach().clone() for b, _ in self._buffers]
        everything = list(self.model.parameters())
        grads = [p.grad for p in everything]
        try:
            with torch.no_grad():
                offset = 0
                for shard in local:
                    theta = self._theta[offset: offset + shard.numel()].view_as(shard)
                    if v is None:
                        shard.copy_(theta)
                    else:
                        piece = v[offset: offset + shard.numel()].view_as(shard)
                        shard.copy_(theta.to(v.dtype) + t * piece)  # rounded once
                    offset += shard.numel()
                for b, snapshot in self._buffers:
                    b.copy_(snapshot)
            for p in everything:
                p.grad = None
            yield
        finally:
            with torch.no_grad():
                for shard, s in zip(local, saved, strict=True):
                    shard.copy_(s)
                for (b, _), s in zip(self._buffers, buffers, strict=True):
                    b.copy_(s)
            for p, g in zip(everything, grads, strict=True):
                p.grad = g

    def _local_shards(self) -> list[torch.Tensor]:
        return [p.to_local() for p in self._params]


def _sharded_parameters(model: torch.nn.Module, params: Any) -> list[torch.Tensor]:
    """The measured parameters (``select_parameters``), each a trainable ``DTensor``."""
    kind = dtensor_type()
    chosen = select_parameters(model, params)
    plain = [name for name, p in chosen if kind is None or not isinstance(p, kind)]
    if plain:
        raise TypeError(f"ShardedHessianOperator needs every measured parameter sharded by "
                        f"FSDP2 (a DTensor; wrap the model with fully_shard); got plain tensors "
                        f"for {plain}")
    frozen = [name for name, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(f"a sharded model's Hessian is measured through FSDP2's gradients, "
                         f"which skip parameters with requires_grad=False; got {frozen}")
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
