"""The exact ways to compute ``∇²ℓ_j V`` for one batch: small strategy objects, one per method.

Each strategy is called as ``strategy(op, batch, index, block)`` with a
:class:`~tinysubspace.curvature.hessian.HessianOperator` (its measured parameter copies
``op._leaves``, their ``op.layout``, the batch loss ``op._batch_loss`` with a graph, and
``op._functional_loss`` for ``torch.func``) and returns the ``(p, b)`` block ``∇²ℓ_j V``.

``loop``: double backprop, the gradient graph built once per batch and one backward pass per
column (``retain_graph``). ``batched``: the same graph, one vmapped backward for the block
(``is_grads_batched``). ``jvp``: forward-over-reverse ``jvp(grad ℓ)`` vmapped over the columns
(``torch.func``; not in ``mode="train"`` with batch norm). ``auto``: ``jvp`` on a GPU in eval
mode (1.5× faster single products and 2.6× faster blocks than ``loop`` for ResNet-18 on an
H200), ``loop`` otherwise (on a CPU ``loop`` is as fast as any for blocks and the fastest for
single products). Timings: docs/performance.md.

**Graph retention.** The operator is a snapshot, so the graph of ``g_j = ∇ℓ_j(θ)`` built with
``create_graph=True`` stays valid for every later product: ``∇²ℓ_j v = ∇_θ (g_j · v)`` is one
backward pass through it (``retain_graph=True``), with no forward pass and no first backward.
The double-backward strategies therefore also take a prebuilt :class:`GradientGraph`
(:meth:`DoubleBackward.through`); the operator keeps one per chunk while they fit a memory budget
(:func:`graph_budget`). The graph's size (:func:`graph_nbytes`) is the sum of the distinct
storages its nodes save plus the gradients. ``jvp`` has no graph that outlives a call
(``torch.func`` transforms trace anew each time), so it always rebuilds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["DEFAULT_GRAPH_MEMORY", "HVP_METHODS", "GradientGraph", "HvpStrategy",
           "build_gradient_graph", "check_functional_mode", "free_memory", "graph_budget",
           "graph_nbytes", "hvp_strategy", "resolve_hvp_method", "validate_graph_memory"]

HVP_METHODS = ("auto", "loop", "batched", "jvp")
"""Exact ways to compute ``∇²ℓ V`` (``op.hvp_method``); see the module docstring."""

DEFAULT_GRAPH_MEMORY = 0.25
"""Default budget for retained gradient graphs: this fraction of the memory free on the
operator's device when the first graph is built (:func:`graph_budget`)."""


class HvpStrategy(Protocol):
    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GradientGraph:
    """One chunk's gradient ``g_j = ∇ℓ_j(θ)`` with the graph that made it (``create_graph``).

    Attributes:
        loss: ``ℓ_j(θ)``, detached.
        grads: ``g_j`` per measured parameter (``None``: the loss does not depend on it), with
            their graph.
        live: indices of the gradients that depend on the parameters (curvature flows there).
        size: ``n_j``, the chunk's weight in the mean.
        nbytes: memory the graph holds (:func:`graph_nbytes`; 0 when not measured).
    """

    loss: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]
    live: tuple[int, ...]
    size: int
    nbytes: int = 0


def build_gradient_graph(op: Any, batch: Any, index: int, measure: bool = False) -> GradientGraph:
    """``ℓ_j`` and ``∇ℓ_j`` of ``batch`` with the graph kept for double backprop; with
    ``measure`` its size in bytes (:func:`graph_nbytes`)."""
    with torch.enable_grad():
        loss = op._batch_loss(batch, index)
        grads = torch.autograd.grad(loss, op._leaves, create_graph=True, allow_unused=True)
    live = tuple(i for i, g in enumerate(grads) if g is not None and g.requires_grad)
    nbytes = graph_nbytes(grads, exclude=op._leaves) if measure else 0
    return GradientGraph(loss.detach(), tuple(grads), live, batch.size, nbytes)


def graph_nbytes(grads: tuple[torch.Tensor | None, ...], exclude: list[torch.Tensor]) -> int:
    """Bytes a gradient graph holds: the distinct storages saved by its nodes (each
    ``grad_fn``'s ``_saved_*`` tensors, found by walking ``next_functions`` from ``grads``) plus
    the gradients themselves, leaving out the storages of ``exclude`` (the parameters).

    Inputs saved by the first layer are counted (for an ``(X, Y)`` data set in the operator's
    dtype they are views of the caller's tensors, so this errs on the large side).
    """
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total, stack, visited = 0, [g.grad_fn for g in grads if g is not None], set()

    def count(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for g in grads:
        count(g)
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    saved = getattr(node, name)
                except RuntimeError:  # e.g. an optional saved tensor that is absent
                    continue
                for item in saved if isinstance(saved, (tuple, list)) else (saved,):
                    count(item)
        stack.extend(child for child, _ in node.next_functions)
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: on CUDA the driver's free memory plus what the
    caching allocator holds unused (``torch.cuda.mem_get_info``); on the CPU ``MemAvailable`` of
    ``/proc/meminfo`` (else ``os.sysconf`` available pages); 0 where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


def validate_graph_memory(graph_memory: Any) -> float | int:
    """``graph_memory`` checked: an ``int`` ≥ 0 is bytes, a ``float`` in ``[0, 1]`` a fraction of
    the free memory (:func:`free_memory`); 0 turns retention off.

    Raises:
        TypeError: neither an int nor a float (a bool included).
        ValueError: a negative int, or a float outside ``[0, 1]`` (or NaN).
    """
    if isinstance(graph_memory, bool) or not isinstance(graph_memory, (int, float)):
        raise TypeError(f"graph_memory must be an int (bytes) or a float in [0, 1] (a fraction "
                        f"of the free memory), got {type(graph_memory).__name__}")
    if isinstance(graph_memory, int) and graph_memory < 0:
        raise ValueError(f"graph_memory in bytes must be >= 0, got {graph_memory}")
    if isinstance(graph_memory, float) and not (0.0 <= graph_memory <= 1.0):
        raise ValueError(f"graph_memory as a fraction of the free memory must be in [0, 1], got "
                         f"{graph_memory} (pass an int for bytes)")
    return graph_memory


def graph_budget(graph_memory: float | int, device: torch.device) -> int:
    """Bytes the retained graphs may hold: ``graph_memory`` itself if an int, else that
    fraction of :func:`free_memory` on ``device`` now."""
    if isinstance(graph_memory, int):
        return graph_memory
    return int(graph_memory * free_memory(device))


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
        for later products (``retain_graph=True`` on every pass)."""
        out = torch.zeros_like(block)
        if not graph.live:  # the loss is at most linear in every parameter: zero curvature
            return out
        b, leaves, grads = block.shape[1], op._leaves, graph.grads
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
        primals = tuple(leaf.detach() for leaf in op._leaves)
        grad_fn = torch.func.grad(op._functional_loss(batch), argnums=tuple(range(len(primals))))
        tangents = tuple(block[part].T.reshape(b, *shape)
                         for part, shape in zip(op.layout.slices(), op.layout.shapes,
                                                strict=True))
        hv = torch.func.vmap(lambda *t: torch.func.jvp(grad_fn, primals, t)[1])(*tangents)
        return torch.cat([h.reshape(b, -1) for h in hv], 1).T


_STRATEGIES: dict[str, HvpStrategy] = {
    "loop": DoubleBackward(batched=False),
    "batched": DoubleBackward(batched=True),
    "jvp": ForwardOverReverse(),
}


def resolve_hvp_method(name: str, device: torch.device, mode: str) -> str:
    """The method ``name`` stands for (``auto`` resolved for ``device`` and ``mode``).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    if name not in HVP_METHODS:
        raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {name!r}")
    if name != "auto":
        return name
    return "jvp" if device.type == "cuda" and mode == "eval" else "loop"


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
    """The strategy object for ``name`` (see :func:`resolve_hvp_method`)."""
    return _STRATEGIES[resolve_hvp_method(name, device, mode)]
