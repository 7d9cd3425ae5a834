"""Kept gradient graphs: one chunk's ``∇ℓ_j`` with its graph, its size, and the memory budget.

The Hessian operator is a snapshot, so the graph of ``g_j = ∇ℓ_j(θ)`` built with
``create_graph=True`` stays valid for every later product: ``∇²ℓ_j v = ∇_θ (g_j · v)`` is one
backward pass through it (``retain_graph=True``), with no forward pass and no first backward.
:class:`GradientGraph` holds one such graph; :func:`graph_nbytes` is its size (the sum of the
distinct storages its nodes save plus the gradients); the operator keeps one per chunk while they
fit a budget (:func:`graph_budget`, from ``graph_memory``: :func:`validate_graph_memory`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_GRAPH_MEMORY", "GradientGraph", "build_gradient_graph", "free_memory",
           "graph_budget", "graph_nbytes", "once_only_kernels", "validate_graph_memory"]

DEFAULT_GRAPH_MEMORY = 0.25
"""Default budget for retained gradient graphs: this fraction of the memory free on the
operator's device when the first graph is built (:func:`graph_budget`)."""


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
        once_only: a kernel on the graph is differentiable only once (:func:`once_only_kernels`):
            double backward through it would silently leave out that kernel's curvature.
    """

    loss: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]
    live: tuple[int, ...]
    size: int
    nbytes: int = 0
    once_only: tuple[str, ...] = ()


def build_gradient_graph(op: Any, batch: Any, index: int, measure: bool = False) -> GradientGraph:
    """``ℓ_j`` and ``∇ℓ_j`` of ``batch`` with the graph kept for double backprop; with
    ``measure`` its size in bytes (:func:`graph_nbytes`)."""
    with torch.enable_grad():
        loss = op.batch_loss(batch, index)
        grads = torch.autograd.grad(loss, op.leaves, create_graph=True, allow_unused=True)
    live = tuple(i for i, g in enumerate(grads) if g is not None and g.requires_grad)
    nbytes = graph_nbytes(grads, exclude=op.leaves) if measure else 0
    return GradientGraph(loss.detach(), tuple(grads), live, batch.size, nbytes,
                         once_only_kernels(loss))


def once_only_kernels(loss: torch.Tensor) -> tuple[str, ...]:
    """Names of the custom ``autograd.Function`` s on the graph of ``loss`` whose backward is
    marked ``@once_differentiable``. torch 2.13 does not raise when such a backward is
    differentiated again (the second derivative through it is silently dropped), so the
    double-backward strategies check this list instead."""
    found, stack, visited = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        cls = getattr(node, "_forward_cls", None)
        code = getattr(getattr(cls, "backward", None), "__code__", None)
        if code is not None and getattr(code, "co_qualname", "once_differentiable.") \
                .startswith("once_differentiable.") and code.co_name == "wrapper" \
                and code.co_filename.endswith("function.py"):  # co_qualname: Python >= 3.11
            found.add(cls.__name__)
        stack.extend(child for child, _ in node.next_functions)
    return tuple(sorted(found))


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
