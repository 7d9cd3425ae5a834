"""The tracker on a model sharded with FSDP2 (``fully_shard``, issue 25): what it measures on
sharded vectors, what it refuses, and the eigenvectors it gathers for the run folder.

Under ``torchrun`` each rank passes the FSDP2 model and its own ``(X, Y)`` shard of the data;
the tracker's operator is then :class:`~tinysubspace.curvature.sharded.ShardedHessianOperator`
(products by central differences of ordinary gradients; ``g``, ``H g`` and the eigenvectors are
each rank's rows). Every column of the train, hessian, anchors, test, cost and residuals groups
is formed with the operator's inner product (sums over ranks, :class:`~tinysubspace.curvature.
sharded.ShardedSpace`), so every rank gets the single-process row; rank 0 writes it. The anchor
bases stay local rows (``1/world`` of a basis on each rank).

**Saved eigenvectors** (``save_vectors_at`` and anchor steps) are gathered into the global
``(p, 2k)`` block, in ``named_parameters`` order, the same file as a single process writes:
every rank holds that block for the moment of the gather (an all-reduce), which suits models
whose ``p × 2k`` numbers fit one rank. For a model where they do not, leave ``save_vectors_at``
empty and the anchors at steps you can afford, or keep the shards yourself
(``tracker.operator().vector_space`` and the eigenpairs' local rows).

**Refused** (a ``ValueError`` naming them, before training starts): options whose columns are
not yet formed on sharded vectors — ``ggn``, ``class_means``, ``geometry`` (principal angles),
``optimizer`` (the preconditioned sharpness), ``blocks`` (per-block operators select
parameters), ``subset`` — ``chunk_size`` (each rank's data is one forward pass, so every
rank runs the same collectives) and ``resume`` (the run folder's ``tracker.pt`` is rank 0's
state, and its warm starts and anchor bases are rank 0's rows only; save
:meth:`~tinysubspace.SubspaceTracker.state_dict` of every rank with your own checkpoint and
``load_state_dict`` it on the same rank instead; not tested here). The operator itself
refuses another ``dtype`` than the model's, an exact ``hvp_method``, data that is not an
``(X, Y)`` pair, or a rank without examples
(:class:`~tinysubspace.curvature.sharded.ShardedHessianOperator`).
"""

from __future__ import annotations

from typing import Any

import torch

from tinysubspace.curvature.sharded import ShardedSpace, is_sharded_model

__all__ = ["check_sharded_data", "check_sharded_options", "is_sharded_model", "reshard",
           "saved_eigenvectors"]


def check_sharded_options(**options: Any) -> None:
    """Refuse the tracker options not measured on sharded vectors (module docstring): each of
    ``options`` is off when ``None``, ``False``, ``"none"`` or empty.

    Raises:
        ValueError: naming every option that is on.
    """
    on = [name for name, value in options.items()
          if value is not None and value is not False and value != "none" and value != ()]
    if on:
        raise ValueError(f"a tracker of an FSDP2 (fully_shard) model measures the train, "
                         f"hessian, anchors, test, cost and residuals columns on sharded "
                         f"vectors; these options are not supported there: {sorted(on)} "
                         f"(leave them at their defaults)")


def check_sharded_data(data: Any, name: str = "data") -> None:
    """Refuse data other than one ``(inputs, targets)`` pair of tensors per rank.

    The sharded operator takes several batches per rank (it pads a rank's passes with forwards
    of weight 0), but the tracker's own forwards (accuracy, the test columns) run once per batch,
    and FSDP2's collectives need the same number of forwards on every rank.

    Raises:
        TypeError: naming what arrived.
    """
    if data is None and name == "test":
        return
    if not (isinstance(data, tuple | list) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"a tracker of an FSDP2 (fully_shard) model takes its {name} as one "
                        f"(inputs, targets) pair of tensors per rank (every rank must run the "
                        f"same forwards), got {type(data).__name__}")


def reshard(model: torch.nn.Module) -> None:
    """Register an FSDP2 model's parameters as shards again. FSDP2 keeps the root module's
    parameters unsharded after a forward pass (it expects the backward pass that reshards
    them); the tracker's forward-only passes (the loss check, accuracy) and a user's evaluation
    pass would leave them so, and the sharded operator needs the shards. A no-op for a model
    without FSDP2 modules; the parameters' values are unchanged."""
    kind = _fsdp_module_type()
    if kind is None:
        return
    for module in model.modules():
        if isinstance(module, kind):
            module.reshard()


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def saved_eigenvectors(model: torch.nn.Module, op: Any, values: torch.Tensor,
                       vectors: torch.Tensor, step: int) -> dict[str, Any]:
    """The eigenvector file's payload at ``step``: ``values``, the ``(p, 2k)`` vectors (float32,
    CPU), the parameters' names and shapes. A sharded operator's local rows are gathered first
    (a collective: every rank calls this at the same step)."""
    space = getattr(op, "vector_space", None)
    if isinstance(space, ShardedSpace):
        vectors = space.gather(vectors)
        chosen = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        names, shapes = [name for name, _ in chosen], [list(p.shape) for _, p in chosen]
    else:
        names, shapes = list(op.layout.names), [list(s) for s in op.layout.shapes]
    return {"step": step, "values": values.cpu(), "vectors": vectors.float().cpu(),
            "param_names": names, "param_shapes": shapes}
