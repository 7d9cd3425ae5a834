"""The Hessian of a mean loss over a whole data set, as an operator (never formed).

For a data set split into batches :math:`B_j` of sizes :math:`n_j` (:math:`N = \\sum_j n_j`) and a
mean-reduced loss :math:`\\ell_j(\\theta)` on each batch, the loss measured is

.. math::  L(\\theta) = \\frac{1}{N} \\sum_j n_j\\, \\ell_j(\\theta),

exactly the mean over all examples, and ``op @ V`` returns :math:`\\nabla^2 L(\\theta)\\, V`.

Products are exact (double backprop or forward-over-reverse, no finite differences; the
strategies are in :mod:`tinysubspace.curvature.hvp`). For a block ``V`` of ``b`` columns the data
is traversed once: per batch the gradient graph is built once and differentiated ``b`` times
(PAPER.txt, Appendix A, computes H·v the same way, one vector at a time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.func import functional_call

from tinysubspace.curvature import collectives as tsdist
from tinysubspace.curvature.data import Batch, BatchSource, call_model
from tinysubspace.curvature.hvp import hvp_strategy
from tinysubspace.curvature.layout import ParameterLayout, select_parameters
from tinysubspace.curvature.operator import SymmetricOperator

__all__ = ["HessianOperator", "NonDeterministicError", "NonFiniteError"]

LossFn = Callable[[Any, Any], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or Hessian-vector product came out NaN or infinite."""


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

    Raises:
        ValueError: bad ``mode`` or ``hvp_method``, an empty data set, or a bad parameter
            selection.
        TypeError: ``data`` of an unusable kind.
        DistributedError: (distributed) ranks hold different parameters or another rank failed.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", batch_size: int | None = None,
                 distributed: bool | None = None, hvp_method: str = "auto") -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        hvp_strategy(hvp_method, torch.device(device or "cpu"), mode)  # validate early
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
            for index, batch in enumerate(self.batches):
                with torch.enable_grad():
                    loss = self._batch_loss(batch, index)
                    grads = torch.autograd.grad(loss, self._leaves, allow_unused=True)
                flat = self.layout.flatten(grads, like=total[1:])
                self._check_finite(flat, "gradient", index)
                total[0] += batch.size * loss.detach()
                total[1:] += batch.size * flat
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
        pairs = [("gradient", self.loss_and_gradient()[1], self.loss_and_gradient()[1]),
                 ("Hessian-vector product", self @ v, self @ v)]
        for what, first, second in pairs:
            gap = float((first - second).norm() / first.norm().clamp_min(1e-300))
            if gap > rtol:
                raise NonDeterministicError(
                    f"two evaluations of the {what} at the same point differ by {gap:.2e} "
                    f"(relative, tolerance {rtol:.1e}); likely causes: "
                    + "; ".join(self._randomness_suspects()))

    # ---------------------------------------------------------------- internals
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        def local_sum() -> torch.Tensor:  # Σ n_j ∇²ℓ_j V over this process's data
            total = torch.zeros_like(block)
            for index, batch in enumerate(self.batches):
                total += batch.size * self._batch_hvp(batch, index, block)
            return total

        result = self._sum_over_data(local_sum, block=block) / self._num_examples
        self._check_finite(result, "Hessian-vector product", None)
        return result

    def _batch_hvp(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        """``∇²ℓ_j V`` for one batch (exact), by the strategy ``self.hvp_method`` names."""
        strategy = hvp_strategy(getattr(self, "hvp_method", "auto"), self.device, self.mode)
        return strategy(self, batch, index, block)

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
        loss = self.loss_fn(outputs, batch.targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar (mean-reduced) tensor, got {shape}; "
                             "use reduction='mean'")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss of batch {index} is {loss.item()} (not finite)")
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
