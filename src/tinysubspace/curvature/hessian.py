"""The Hessian of a mean loss over a whole data set, as an operator (never formed).

For a data set split into batches :math:`B_j` of sizes :math:`n_j` (:math:`N = \\sum_j n_j`) and a
mean-reduced loss :math:`\\ell_j(\\theta)` on each batch, the loss measured is

.. math::  L(\\theta) = \\frac{1}{N} \\sum_j n_j\\, \\ell_j(\\theta),

exactly the mean over all examples, and ``op @ V`` returns :math:`\\nabla^2 L(\\theta)\\, V`.

Products are exact (double backprop or forward-over-reverse, no finite differences; the
strategies are in :mod:`tinysubspace.curvature.hvp`). For a block ``V`` of ``b`` columns the data
is traversed once: per batch the gradient graph is built once and differentiated ``b`` times
(PAPER.txt, Appendix A, computes H·v the same way, one vector at a time).

**Graph retention.** The operator is a snapshot, so the graph of ``g_j = ∇ℓ_j(θ)`` stays valid:
with ``loop`` or ``batched`` each chunk's graph is kept after it is first built (by a product or
:meth:`HessianOperator.loss_and_gradient`) while the kept graphs fit ``graph_memory``; a later
product is then one backward pass per column through it (no forward pass, no first backward),
and once every chunk is kept there is no pass over the data at all. Chunks beyond the budget are
rebuilt each time. :meth:`HessianOperator.release_graphs` (or dropping the operator) frees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.func import functional_call

from tinysubspace.curvature import collectives as tsdist
from tinysubspace.curvature.data import (
    Batch,
    BatchSource,
    NonFiniteError,
    call_model,
    check_operator_loss,
    checked_loss,
)
from tinysubspace.curvature.hvp import (
    DEFAULT_GRAPH_MEMORY,
    GradientGraph,
    build_gradient_graph,
    check_functional_mode,
    graph_budget,
    hvp_strategy,
    validate_graph_memory,
)
from tinysubspace.curvature.layout import ParameterLayout, select_parameters
from tinysubspace.operator import SymmetricOperator

__all__ = ["HessianOperator", "NonDeterministicError", "NonFiniteError"]

LossFn = Callable[[Any, Any], torch.Tensor]


class NonDeterministicError(RuntimeError):
    """Two evaluations of the same quantity at the same point disagreed."""


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, then restore each one's own flag."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


class HessianOperator(SymmetricOperator):
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
        batch_size: chunk size when ``data`` is an ``(X, Y)`` tuple (``None``: one chunk).
        distributed: ``data`` is this process's shard, and sums over the data are all-reduced
            across the processes of ``torch.distributed`` (see
            :mod:`tinysubspace.curvature.collectives`).
            ``None`` (default): on iff ``torch.distributed`` is initialised with more than one
            process. Every rank must then build the operator and call each method together
            (collectively); results are identical on every rank. Ranks holding the whole data
            set (instead of shards) also get the right mean, with redundant work.
        hvp_method: how ``∇²ℓ V`` is computed, all exact (``HVP_METHODS``): ``"loop"`` (double
            backprop through one retained graph per batch), ``"batched"`` (one vmapped backward),
            ``"jvp"`` (forward-over-reverse, vmapped), or ``"auto"`` (default: ``jvp`` on CUDA in
            eval mode, ``loop`` otherwise — the fastest measured, docs/performance.md).
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

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", batch_size: int | None = None,
                 distributed: bool | None = None, hvp_method: str = "auto",
                 graph_memory: float | int = DEFAULT_GRAPH_MEMORY) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        hvp_strategy(hvp_method, torch.device(device or "cpu"), mode)  # validate early
        check_functional_mode(model, hvp_method, mode)
        if distributed and not (torch.distributed.is_available()
                                and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised "
                             "(torch.distributed.init_process_group, or run under torchrun)")
        self.distributed = tsdist.is_distributed() if distributed is None else bool(distributed)
        chosen = select_parameters(model, params)
        first = chosen[0][1]
        dtype = dtype or first.dtype
        device = torch.device(device) if device is not None else first.device
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.hvp_method = hvp_method
        self._graph_memory = validate_graph_memory(graph_memory)
        self._graph_budget: int | None = None  # bytes, fixed when the first graph is built
        self._fresh = False  # True: every pass rebuilds (check_deterministic)
        self.release_graphs()
        self.layout = ParameterLayout(tuple(name for name, _ in chosen),
                                      tuple(p.shape for _, p in chosen))
        self.batches = BatchSource(data, device=device, dtype=dtype, batch_size=batch_size)
        super().__init__(self.layout.numel, dtype, device)
        self._leaves = [p.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
                        for _, p in chosen]
        measured = set(self.layout.names)
        self._fixed = {name: _snapshot(t, device, dtype) for name, t in model.named_parameters()
                       if name not in measured}
        self._buffers = {name: _snapshot(t, device, dtype) for name, t in model.named_buffers()}
        self._num_examples = self._count_examples()
        check_operator_loss(model, loss_fn, self.batches, self._fixed, self._buffers, dict(
            zip(self.layout.names, self._leaves, strict=True)))  # loss_fn is a mean (data.py)

    # ------------------------------------------------------------------ public
    @property
    def num_examples(self) -> int:
        """``N``, the number of examples in the data set (all shards together)."""
        return self._num_examples

    @property
    def parameters_vector(self) -> torch.Tensor:
        """The point ``θ`` (flat, ``(p,)``) at which this operator measures."""
        return torch.cat([leaf.detach().reshape(-1) for leaf in self._leaves])

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss and its gradient ``(p,)`` over the whole data set, in one pass.

        Raises:
            NonFiniteError: the loss or gradient of a batch is not finite (the batch and
                parameter are named).
        """
        def local_sums() -> torch.Tensor:  # [Σ n_j ℓ_j, Σ n_j ∇ℓ_j] over this process's data
            total = torch.zeros(1 + self.shape[0], dtype=self.dtype, device=self.device)
            retaining = self._retains()
            for index, batch, graph in self._chunks():
                if graph is None and retaining and not self._graphs_full:
                    graph, _ = self._graph_for(index, batch)  # kept for the products to come
                if graph is not None:
                    loss, size = graph.loss, graph.size
                    grads = [None if g is None else g.detach() for g in graph.grads]
                else:
                    with torch.enable_grad():
                        loss = self._batch_loss(batch, index)
                        grads = torch.autograd.grad(loss, self._leaves, allow_unused=True)
                    size = batch.size
                flat = self.layout.flatten(grads, like=total[1:])
                self._check_finite(flat, "gradient", index)
                total[0] += size * loss.detach()
                total[1:] += size * flat
            return total

        total = self._sum_over_data(local_sums)
        return float(total[0] / self._num_examples), total[1:] / self._num_examples

    def check_deterministic(self, seed: int = 0, rtol: float | None = None) -> None:
        """Check that two gradients and two products with the same vector agree.

        Args:
            seed: seed of the random test vector.
            rtol: relative tolerance (default ``1000 eps`` of the dtype).

        Raises:
            NonDeterministicError: they differ; the message names the likely culprits (dropout or
                batch norm in train mode, random augmentation, shuffling with ``drop_last``).
        """
        rtol = rtol if rtol is not None else 1000 * torch.finfo(self.dtype).eps
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.shape[0], generator=gen, dtype=self.dtype).to(self.device)
        with self._fresh_passes():  # kept graphs would hide randomness in the data or model
            pairs = [("gradient", self.loss_and_gradient()[1], self.loss_and_gradient()[1]),
                     ("Hessian-vector product", self @ v, self @ v)]
        for what, first, second in pairs:
            gap = float((first - second).norm() / first.norm().clamp_min(1e-300))
            if gap > rtol:
                raise NonDeterministicError(
                    f"two evaluations of the {what} at the same point differ by {gap:.2e} "
                    f"(relative, tolerance {rtol:.1e}); likely causes: "
                    + "; ".join(self._randomness_suspects()))

    def release_graphs(self) -> None:
        """Free the kept gradient graphs; later products build (and keep) them again."""
        self._graphs: dict[int, GradientGraph] = {}
        self._graphs_complete = False  # every chunk of this process's data is kept
        self._graphs_full = False  # a chunk did not fit the budget: keep no more

    @property
    def retained_graph_bytes(self) -> int:
        """Memory the kept gradient graphs hold, in bytes (the distinct storages their nodes
        save plus the gradients: :func:`~tinysubspace.curvature.hvp.graph_nbytes`)."""
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
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        strategy, retaining = self._strategy(), self._retains()

        def local_sum() -> torch.Tensor:  # Σ n_j ∇²ℓ_j V over this process's data
            total = torch.zeros_like(block)
            for index, batch, graph in self._chunks():
                if not retaining:
                    total += batch.size * self._batch_hvp(batch, index, block)
                    continue
                kept = graph is not None
                if not kept:
                    graph, kept = self._graph_for(index, batch)
                total += graph.size * strategy.through(graph, self, block, keep=kept)
            return total

        result = self._sum_over_data(local_sum, block=block) / self._num_examples
        self._check_finite(result, "Hessian-vector product", None)
        return result

    def _batch_hvp(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        """``∇²ℓ_j V`` for one batch (exact), by the strategy ``self.hvp_method`` names."""
        return self._strategy()(self, batch, index, block)

    def _strategy(self) -> Any:
        return hvp_strategy(getattr(self, "hvp_method", "auto"), self.device, self.mode)

    def _retains(self) -> bool:
        """Whether passes keep and reuse gradient graphs: a budget, a double-backward method,
        and this class's own products (a subclass with other products, e.g. the GGN, keeps none).
        """
        return (self._graph_memory != 0 and not self._fresh
                and getattr(self._strategy(), "uses_graph", False)
                and type(self)._matmat is HessianOperator._matmat)

    def _chunks(self) -> Iterator[tuple[int, Batch | None, GradientGraph | None]]:
        """``(index, batch, kept graph or None)`` for each chunk of this process's data; once
        every chunk's graph is kept, the kept graphs alone (``batch`` None, no data pass)."""
        retaining = self._retains()
        if retaining and self._graphs_complete:
            yield from ((index, None, graph) for index, graph in self._graphs.items())
            return
        count = 0
        for index, batch in enumerate(self.batches):
            count += 1
            yield index, batch, self._graphs.get(index) if retaining else None
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
        self._graphs[index] = graph
        return graph, True

    def _order_is_fixed(self) -> bool:
        """Whether each pass yields the same chunks in the same order (not a ``DataLoader``
        with a sampler other than the sequential one)."""
        sampler = getattr(self.batches.data, "sampler", None)
        return sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler)

    @contextlib.contextmanager
    def _fresh_passes(self) -> Iterator[None]:
        """Within: every pass rebuilds its graphs (kept ones are neither used nor added)."""
        saved, self._fresh = self._fresh, True
        try:
            yield
        finally:
            self._fresh = saved

    def _functional_loss(self, batch: Batch) -> Callable[..., torch.Tensor]:
        """``ℓ_j`` as a function of the measured parameters (for ``torch.func`` transforms)."""
        names = self.layout.names

        def loss_of(*leaves: torch.Tensor) -> torch.Tensor:
            state = {**self._fixed, **self._buffers, **dict(zip(names, leaves, strict=True))}
            with module_mode(self.model, train=self.mode == "train"):
                outputs = call_model(_Bound(self.model, state), batch.inputs)
            return self.loss_fn(outputs, batch.targets)

        return loss_of

    def _batch_loss(self, batch: Batch, index: int) -> torch.Tensor:
        state = {**self._fixed, **self._buffers, **dict(zip(self.layout.names, self._leaves,
                                                            strict=True))}
        if self.mode == "train":  # running statistics update our copies, never the model's
            state.update({name: b.clone() for name, b in self._buffers.items()})
        with module_mode(self.model, train=self.mode == "train"):
            outputs = call_model(_Bound(self.model, state), batch.inputs)
        loss = checked_loss(self.loss_fn(outputs, batch.targets), index)
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError(f"the loss does not depend on any measured parameter "
                             f"({', '.join(self.layout.names)}): the forward pass does not use "
                             "them, so their Hessian is zero; pass params= naming parameters the "
                             "model's forward uses (or None for every trainable one)")
        return loss

    def _check_finite(self, flat: torch.Tensor, what: str, batch: int | None) -> None:
        bad = ~torch.isfinite(flat)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            where = f" of batch {batch}" if batch is not None else ""
            raise NonFiniteError(f"the {what}{where} is not finite in parameter "
                                 f"{self.layout.owner(row)!r}")

    def _sum_over_data(self, local_sum: Callable[[], torch.Tensor],
                       **agree: torch.Tensor) -> torch.Tensor:
        """The one place where sums over the data meet: ``local_sum()`` in one process; under
        ``distributed`` its all-reduce over ranks, which must all hold the same parameters and
        ``agree`` tensors (an exception on any rank is raised on every rank)."""
        if not self.distributed:
            return local_sum()
        return tsdist.sum_across_ranks(
            local_sum, self.device, agree={"parameters": self.parameters_vector, **agree},
            propagate=(NonFiniteError, ValueError, TypeError))

    def _count_examples(self) -> int:
        def local_count() -> torch.Tensor:
            return torch.tensor([float(sum(batch.size for batch in self.batches))],
                                dtype=torch.float64, device=self.device)

        total = int(self._sum_over_data(local_count))
        if total == 0:
            raise ValueError("the data set is empty: the mean loss and its Hessian are undefined")
        return total

    def _randomness_suspects(self) -> list[str]:
        suspects = list(self.batches.describe_randomness())
        if self.mode == "train":
            kinds = {type(m).__name__ for m in self.model.modules()
                     if isinstance(m, (torch.nn.modules.dropout._DropoutNd,
                                       torch.nn.modules.batchnorm._BatchNorm))}
            if kinds:
                suspects.append(f"mode='train' with {', '.join(sorted(kinds))} (use mode='eval')")
        return suspects or ["randomness inside the model or loss (e.g. dropout implemented with "
                            "torch.rand), or a data set that changes between passes"]


class _Bound:
    """``model`` called with the given parameters and buffers (``functional_call``)."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.state, args, kwargs)


def _snapshot(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy; floating tensors cast to ``dtype`` (integer buffers keep theirs)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype).clone()
    return tensor.to(device=device).clone()
