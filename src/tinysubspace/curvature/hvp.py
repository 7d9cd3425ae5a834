"""The ways to compute ``∇²ℓ_j V`` for one batch: small strategy objects, one per method.

Each strategy is called as ``strategy(op, batch, index, block)`` with a
:class:`~tinysubspace.curvature.dataset_operator.DataSetOperator` and returns the ``(p, b)``
block ``∇²ℓ_j V``. It sees only the operator's public interface: the measured parameter copies
``op.leaves`` (the point ``θ``), their ``op.layout``, the batch loss ``op.batch_loss(batch,
index)`` (with a graph in grad mode) and ``op.functional_loss(batch)`` (for ``torch.func``).

``loop``: double backprop, the gradient graph built once per batch and one backward pass per
column (``retain_graph``). ``batched``: the same graph, one vmapped backward for the block
(``is_grads_batched``). ``jvp``: forward-over-reverse ``jvp(grad ℓ)`` vmapped over the columns
(``torch.func``; not in ``mode="train"`` with batch norm). ``auto``: ``jvp`` on a GPU in eval
mode (1.5× faster single products and 2.6× faster blocks than ``loop`` for ResNet-18 on an
H200), ``loop`` otherwise (on a CPU ``loop`` is as fast as any for blocks and the fastest for
single products). Timings: docs/performance.md. In torch 2.13 ``jvp(grad ℓ)`` raises
"ZeroTensors are immutable" for ``nn.MSELoss`` / ``F.mse_loss``; ``auto`` then falls back to
``loop`` for the rest of the operator's life (:class:`FallbackOnError`), so ``auto`` always
works; an explicit ``jvp`` still raises.

``finite_difference`` / ``finite_difference4``: central differences of ordinary gradients along
each column, 2 or 4 points (:class:`FiniteDifference`; no double backward, so they run through
``@once_differentiable`` kernels); the product is a :class:`ProductEstimate` carrying its error
estimate, and :meth:`FiniteDifference.error_floor` is the a-priori relative error. The exact
double-backward methods name them when a kernel cannot be differentiated twice.

**Graph retention.** The double-backward strategies also take a prebuilt
:class:`~tinysubspace.curvature.graphs.GradientGraph` (:meth:`DoubleBackward.through`); the
Hessian operator keeps one per chunk while they fit a memory budget
(:mod:`tinysubspace.curvature.graphs`). ``jvp`` has no graph that outlives a call
(``torch.func`` transforms trace anew each time), so it always rebuilds.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tinysubspace.curvature.finite_difference import (
    HALF_PRECISION_FLOOR,
    HALF_PRECISION_STEP,
    FiniteDifference,
    ProductEstimate,
    accumulation_dtype,
)
from tinysubspace.curvature.graphs import (
    DEFAULT_GRAPH_MEMORY,
    GradientGraph,
    build_gradient_graph,
    free_memory,
    graph_budget,
    graph_nbytes,
    validate_graph_memory,
)

__all__ = [
    "DEFAULT_GRAPH_MEMORY",
    "FINITE_DIFFERENCE_METHODS",
    "HALF_PRECISION_FLOOR",
    "HALF_PRECISION_STEP",
    "HVP_METHODS",
    "KNOWN_METHODS",
    "FallbackOnError",
    "FiniteDifference",
    "GradientGraph",
    "HvpStrategy",
    "ProductEstimate",
    "accumulation_dtype",
    "build_gradient_graph",
    "check_functional_mode",
    "free_memory",
    "graph_budget",
    "graph_nbytes",
    "hvp_strategy",
    "resolve_hvp_method",
    "validate_graph_memory",
]

HVP_METHODS = ("auto", "loop", "batched", "jvp")
"""Exact ways to compute ``∇²ℓ V`` (``op.hvp_method``); see the module docstring."""

FINITE_DIFFERENCE_METHODS = ("finite_difference", "finite_difference4")
"""Approximate ways: differences of ordinary gradients (2 or 4 points, :class:`FiniteDifference`),
for kernels without double backward; each product carries its error estimate."""

KNOWN_METHODS = HVP_METHODS + FINITE_DIFFERENCE_METHODS
"""Every name ``hvp_method`` accepts."""


class HvpStrategy(Protocol):
    def __call__(self, op: Any, batch: Any, index: int,
                 block: torch.Tensor) -> torch.Tensor | ProductEstimate: ...


class DoubleBackward:
    """``∇(∇ℓ · v)`` through one gradient graph per batch: a backward per column (``batched``
    false) or one vmapped backward for the whole block (``batched`` true, ``b > 1``)."""

    uses_graph = True

    def __init__(self, batched: bool) -> None:
        self.batched = batched

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        return self.through(build_gradient_graph(op, batch, index), op, block, keep=False)

    def through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                keep: bool) -> torch.Tensor:
        """``∇²ℓ_j V`` by backward passes through ``graph``; ``keep``: leave the graph usable
        for later products (``retain_graph=True`` on every pass).

        Raises:
            RuntimeError: a kernel on the graph is differentiable only once (a custom
                ``autograd.Function`` marked ``@once_differentiable``); the message names
                ``hvp_method="finite_difference"``, which needs ordinary gradients only.
        """
        if graph.once_only:
            raise RuntimeError(
                f"hvp_method={'batched' if self.batched else 'loop'!r} needs double backward, "
                f"but {', '.join(graph.once_only)} on the model's graph is differentiable only "
                "once (@once_differentiable; torch would silently drop its second derivative); "
                "use hvp_method='finite_difference' (or 'finite_difference4'), which needs "
                "ordinary gradients only")
        return self._through(graph, op, block, keep)

    def _through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                 keep: bool) -> torch.Tensor:
        out = torch.zeros_like(block)
        if not graph.live:  # the loss is at most linear in every parameter: zero curvature
            return out
        b, leaves, grads = block.shape[1], op.leaves, graph.grads
        slices, shapes = op.layout.slices(), op.layout.shapes
        with torch.enable_grad():
            if self.batched and b > 1:  # one vmapped backward for the whole block
                directions = [block[slices[i]].T.reshape(b, *shapes[i]) for i in graph.live]
                hv = torch.autograd.grad([grads[i] for i in graph.live], leaves,
                                         grad_outputs=directions, is_grads_batched=True,
                                         retain_graph=keep, allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part] = h.reshape(b, -1).T
                return out
            for column in range(b):  # one backward per column through the retained graph
                directions = [block[slices[i], column].view(shapes[i]) for i in graph.live]
                hv = torch.autograd.grad([grads[i] for i in graph.live], leaves,
                                         grad_outputs=directions,
                                         retain_graph=keep or column < b - 1,
                                         allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part, column] = h.reshape(-1)
        return out


class ForwardOverReverse:
    """``jvp(grad ℓ_j)`` (``torch.func``), vmapped over the block's columns. Nothing outlives a
    call, so there is no graph to retain (``uses_graph`` false)."""

    uses_graph = False

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        b = block.shape[1]
        primals = tuple(leaf.detach() for leaf in op.leaves)
        grad_fn = torch.func.grad(op.functional_loss(batch), argnums=tuple(range(len(primals))))
        tangents = tuple(block[part].T.reshape(b, *shape)
                         for part, shape in zip(op.layout.slices(), op.layout.shapes,
                                                strict=True))
        hv = torch.func.vmap(lambda *t: torch.func.jvp(grad_fn, primals, t)[1])(*tangents)
        return torch.cat([h.reshape(b, -1) for h in hv], 1).T



class FallbackOnError:
    """``primary``, until a product hits a known torch failure of it; then ``fallback`` for the
    rest of this object's life (one object per operator). Used by ``auto`` where it picks
    ``jvp``: torch 2.13's ``jvp(grad ℓ)`` raises "ZeroTensors are immutable" for a
    mean-squared-error loss, and double backprop (``loop``) computes the same product.

    Attributes:
        current: the strategy now in use.
        failure: the message of the error that caused the fallback (``None`` before).
    """

    def __init__(self, primary: Any, fallback: Any,
                 known: tuple[str, ...] = ("ZeroTensors are immutable",)) -> None:
        self.primary, self.fallback, self.known = primary, fallback, known
        self.current, self.failure = primary, None

    @property
    def uses_graph(self) -> bool:
        return bool(getattr(self.current, "uses_graph", False))

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        if self.current is self.primary:
            try:
                return self.primary(op, batch, index, block)
            except RuntimeError as error:
                if not any(text in str(error) for text in self.known):
                    raise
                self.current, self.failure = self.fallback, str(error)
        return self.current(op, batch, index, block)

    def through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                keep: bool) -> torch.Tensor:
        """As the current strategy's ``through`` (only while it :attr:`uses_graph`)."""
        return self.current.through(graph, op, block, keep)


_STRATEGIES: dict[str, HvpStrategy] = {
    "loop": DoubleBackward(batched=False),
    "batched": DoubleBackward(batched=True),
    "jvp": ForwardOverReverse(),
}


def auto_choice(device: torch.device, mode: str) -> str:
    """What ``auto`` picks first: ``jvp`` on a GPU in eval mode, else ``loop``."""
    return "jvp" if torch.device(device).type == "cuda" and mode == "eval" else "loop"


def resolve_hvp_method(name: str, device: torch.device, mode: str) -> str:
    """The method ``name`` stands for (``auto`` resolved for ``device`` and ``mode`` by
    :func:`auto_choice`; a fallback after a failure is :class:`FallbackOnError`'s).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    if name not in KNOWN_METHODS:
        raise ValueError(f"hvp_method must be one of {KNOWN_METHODS}, got {name!r}")
    return auto_choice(device, mode) if name == "auto" else name


def check_functional_mode(model: torch.nn.Module, name: str, mode: str) -> None:
    """``jvp`` (``torch.func``) cannot run a train-mode batch norm that updates its running
    statistics (an in-place write) or dropout (random numbers inside ``vmap``).

    Raises:
        ValueError: ``name="jvp"`` with ``mode="train"`` and such modules (they are named).
    """
    if name != "jvp" or mode != "train":
        return
    found = sorted({type(m).__name__ for m in model.modules()
                    if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        and m.track_running_stats)
                    or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)})
    if found:
        raise ValueError(f"hvp_method='jvp' cannot run mode='train' with {', '.join(found)}: "
                         "torch.func transforms forbid batch norm's in-place running-statistics "
                         "update and dropout's random numbers; use hvp_method='loop' (or "
                         "'auto'), or mode='eval'")


def hvp_strategy(name: str, device: torch.device, mode: str) -> HvpStrategy:
    """The strategy object for ``name`` (see :func:`resolve_hvp_method`); ``auto`` resolving to
    ``jvp`` gives a new :class:`FallbackOnError` (``jvp``, then ``loop``) for each call, and
    each call for a finite difference a new :class:`FiniteDifference` (its calibrated step is
    one operator's).

    Raises:
        ValueError: an unknown name.
    """
    resolved = resolve_hvp_method(name, device, mode)
    if name == "auto" and resolved == "jvp":
        return FallbackOnError(_STRATEGIES["jvp"], _STRATEGIES["loop"])
    if resolved in FINITE_DIFFERENCE_METHODS:
        return FiniteDifference(points=2 if resolved == "finite_difference" else 4)
    return _STRATEGIES[resolved]
