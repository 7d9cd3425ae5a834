"""The Hessian of a mean loss over a whole data set, as an operator (never formed).

For a data set split into batches :math:`B_j` of sizes :math:`n_j` (:math:`N = \\sum_j n_j`) and a
mean-reduced loss :math:`\\ell_j(\\theta)` on each batch, the loss measured is

.. math::  L(\\theta) = \\frac{1}{N} \\sum_j n_j\\, \\ell_j(\\theta),

exactly the mean over all examples, and ``op @ V`` returns :math:`\\nabla^2 L(\\theta)\\, V`
(exactly, or by finite differences of gradients when ``hvp_method`` says so).
The snapshot, the data loop, the weighting and the sum over ranks are the base's
(:class:`~tinysubspace.curvature.dataset_operator.DataSetOperator`); this module supplies the
per-batch product :math:`\\nabla^2 \\ell_j V`, by the strategy ``hvp_method`` names
(:mod:`tinysubspace.curvature.hvp`). For a block ``V`` of ``b`` columns the data is traversed
once: per batch the gradient graph is built once and differentiated ``b`` times (PAPER.txt,
Appendix A, computes H·v the same way, one vector at a time).

**Graph retention.** The operator is a snapshot, so the graph of ``g_j = ∇ℓ_j(θ)`` stays valid:
with ``loop`` or ``batched`` each chunk's graph is kept after it is first built (by a product or
:meth:`HessianOperator.loss_and_gradient`) while the kept graphs fit ``graph_memory``; a later
product is then one backward pass per column through it (no forward pass, no first backward),
and once every chunk is kept there is no pass over the data at all. Chunks beyond the budget are
rebuilt each time. :meth:`HessianOperator.release_graphs` (or dropping the operator) frees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from tinysubspace.curvature.data import Batch, NonFiniteError
from tinysubspace.curvature.dataset_operator import (
    DataSetOperator,
    LossFn,
    NonDeterministicError,
)
from tinysubspace.curvature.dataset_operator import module_mode as module_mode
from tinysubspace.curvature.graphs import (
    DEFAULT_GRAPH_MEMORY,
    GradientGraph,
    build_gradient_graph,
    graph_budget,
    validate_graph_memory,
)
from tinysubspace.curvature.hvp import ProductEstimate
from tinysubspace.curvature.sharded import ShardedHessianOperator, is_sharded_model

__all__ = ["HessianOperator", "NonDeterministicError", "NonFiniteError"]


class HessianOperator(DataSetOperator):
    """Exact Hessian of the mean loss over a data set, at the parameters' current values.

    The operator is a snapshot: parameters and buffers are copied when it is built, so later
    training of ``model`` does not change it, and nothing of ``model`` is modified (its train/eval
    flags are set only during a pass and restored afterwards).

    Args:
        model: any ``nn.Module``; called as ``model(inputs)`` (a tuple of inputs is spread, a dict
            passed as keywords).
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of a batch (a scalar).
        data: a ``DataLoader``, a re-iterable of ``(inputs, targets)`` batches, or ``(X, Y)``.
        params: ``None`` (every parameter that requires grad), or names / parameter tensors: the
            operator then acts on that subspace only.
        dtype: dtype of the measurement (e.g. ``torch.float64`` for a float32 model; the model
            itself is not touched). ``None``: the parameters' dtype.
        device: device of the measurement. ``None``: the parameters' device.
        mode: ``"eval"`` (default: dropout off, batch norm on running statistics) or ``"train"``.
        chunk_size: how many examples of an ``(X, Y)`` tuple go into one pass (``None``: one
            chunk); ``batch_size`` is its old name (both: ``TypeError``).
        distributed: ``data`` is this process's shard, and sums over the data are all-reduced
            across the processes of ``torch.distributed`` (see
            :mod:`tinysubspace.curvature.collectives`).
            ``None`` (default): on iff ``torch.distributed`` is initialised with more than one
            process. Every rank must then build the operator and call each method together
            (collectively); results are identical on every rank. Ranks holding the whole data
            set (instead of shards) also get the right mean, with redundant work.
        hvp_method: how ``∇²ℓ V`` is computed (``HVP_METHODS``, all exact): ``"loop"`` (double
            backprop through one retained graph per batch), ``"batched"`` (one vmapped backward),
            ``"jvp"`` (forward-over-reverse, vmapped), or ``"auto"`` (default: ``jvp`` on CUDA in
            eval mode, ``loop`` otherwise — the fastest measured, docs/performance.md; it falls
            back to ``loop`` where torch's ``jvp`` fails for the loss, e.g. mean-squared error).
            Approximate: ``"finite_difference"`` / ``"finite_difference4"``, central differences
            of ordinary gradients (no double backward; :class:`~tinysubspace.curvature.hvp.
            FiniteDifference`); their error estimate is :attr:`last_product_error`, their floor
            :attr:`product_error` (docs/scale.md).
        graph_memory: budget for keeping each chunk's gradient graph between products (``loop``
            and ``batched``; ``jvp`` keeps none): an ``int`` is bytes, a ``float`` in ``[0, 1]``
            the fraction of the memory free on ``device`` when the first graph is built
            (default 0.25; CPU: ``MemAvailable``, CUDA: ``torch.cuda.mem_get_info``); ``0``: off.
            Kept graphs make products cheaper (about 1.3 gradients instead of 2.2 for an FC
            net on a CPU, docs/performance.md) and do not change any result. Data loaders that
            shuffle keep graphs only when every chunk fits (their chunks differ between passes).

    Raises:
        ValueError: bad ``mode`` or ``hvp_method`` (``jvp`` in train mode with batch norm or
            dropout), an empty data set, a bad parameter selection, or (at the first pass) one
            that the loss does not depend on; a ``loss_fn`` that is not a mean over the batch
            (``reduction="sum"``: :func:`~tinysubspace.curvature.data.check_operator_loss`).
        TypeError: ``data`` of an unusable kind.
        DistributedError: (distributed) ranks hold different parameters or another rank failed.
    """

    product_name = "Hessian-vector product"
    uses_hvp = True

    def __new__(cls, model: torch.nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        """A model sharded with FSDP2 (its parameters are ``DTensor`` s) gets a
        :class:`~tinysubspace.curvature.sharded.ShardedHessianOperator` instead (same
        arguments; products by finite differences, vectors sharded like the parameters)."""
        if cls is HessianOperator and model is not None and is_sharded_model(model):
            return ShardedHessianOperator(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", chunk_size: int | None = None,
                 distributed: bool | None = None, hvp_method: str = "auto",
                 graph_memory: float | int = DEFAULT_GRAPH_MEMORY, *,
                 batch_size: int | None = None) -> None:
        self._graph_memory = validate_graph_memory(graph_memory)
        self._graph_budget: int | None = None  # bytes, fixed when the first graph is built
        self.release_graphs()
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode=mode, chunk_size=chunk_size, distributed=distributed,
                         hvp_method=hvp_method, batch_size=batch_size)

    # ------------------------------------------------------------------ public
    def batch_product(self, batch: Batch, index: int,
                      block: torch.Tensor) -> torch.Tensor | ProductEstimate:
        """``∇²ℓ_j V`` of one batch by the strategy ``hvp_method`` names; through the chunk's
        kept gradient graph where graphs are kept (built, and kept if it fits, on first use)."""
        strategy = self.hvp_strategy()
        if not self._retains():
            return strategy(self, batch, index, block)
        graph, kept = self._graphs.get(index), True
        if graph is None:
            graph, kept = self._graph_for(index, batch)
        return strategy.through(graph, self, block, keep=kept)

    def batch_gradient(self, batch: Batch,
                       index: int) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        """``(ℓ_j, ∇ℓ_j)`` of one batch, detached; from (or into) the kept graph if any."""
        graph = self._graphs.get(index) if self._retains() else None
        if graph is None and self._retains() and not self._graphs_full:
            graph, _ = self._graph_for(index, batch)  # kept for the products to come
        if graph is None:
            return super().batch_gradient(batch, index)
        return graph.loss, [None if g is None else g.detach() for g in graph.grads]

    def release_graphs(self) -> None:
        """Free the kept gradient graphs; later products build (and keep) them again."""
        self._graphs: dict[int, GradientGraph] = {}
        self._kept_batches: dict[int, Batch] = {}
        self._graphs_complete = False  # every chunk of this process's data is kept
        self._graphs_full = False  # a chunk did not fit the budget: keep no more

    @property
    def retained_graph_bytes(self) -> int:
        """Memory the kept gradient graphs hold, in bytes (the distinct storages their nodes
        save plus the gradients: :func:`~tinysubspace.curvature.graphs.graph_nbytes`)."""
        return sum(graph.nbytes for graph in self._graphs.values())

    @property
    def retained_graph_chunks(self) -> int:
        """How many chunks (of this process's data) have their gradient graph kept."""
        return len(self._graphs)

    @property
    def graph_budget(self) -> int | None:
        """Bytes the kept graphs may hold (``None`` until the first graph is built)."""
        return self._graph_budget

    # ---------------------------------------------------------------- internals
    def _retains(self) -> bool:
        """Whether passes keep and reuse gradient graphs: a budget, a double-backward method,
        and not inside :meth:`check_deterministic`."""
        return (self._graph_memory != 0 and not self._fresh
                and getattr(self.hvp_strategy(), "uses_graph", False))

    def _local_batches(self) -> Iterator[tuple[int, Batch]]:
        """Each chunk of this process's data; once every chunk's graph is kept, the kept chunks
        alone (their products and gradients come from the graphs: no data pass)."""
        retaining = self._retains()
        if retaining and self._graphs_complete:
            yield from self._kept_batches.items()
            return
        count = 0
        for index, batch in enumerate(self.batches):
            count += 1
            yield index, batch
        if retaining and not self._graphs_full and count == len(self._graphs):
            self._graphs_complete = True
        elif retaining and self._graphs and not self._order_is_fixed():
            self.release_graphs()  # a shuffled loader: kept chunks would not match later passes
            self._graphs_full = True

    def _graph_for(self, index: int, batch: Batch) -> tuple[GradientGraph, bool]:
        """A new gradient graph of chunk ``index``, and whether it is kept (it fits the budget
        with those already kept; the first that does not fit ends keeping)."""
        if self._graphs_full:
            return build_gradient_graph(self, batch, index), False
        if self._graph_budget is None:
            self._graph_budget = graph_budget(self._graph_memory, self.device)
        graph = build_gradient_graph(self, batch, index, measure=True)
        if self.retained_graph_bytes + graph.nbytes > self._graph_budget:
            self._graphs_full = True
            return graph, False
        self._graphs[index], self._kept_batches[index] = graph, batch
        return graph, True

    def _order_is_fixed(self) -> bool:
        """Whether each pass yields the same chunks in the same order (not a ``DataLoader``
        with a sampler other than the sequential one)."""
        sampler = getattr(self.batches.data, "sampler", None)
        return sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler)
