"""The tracker's standard column groups: training loss and gradient, the Hessian's top ``2k``,
anchor overlaps, the cost, the test split, the diagonal blocks (protocol:
:mod:`~tinysubspace.experiments.measurement`).

Each group names its columns in ``names()`` and fills exactly those in ``measure(context)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call

from tinysubspace.curvature.data import BatchSource, call_model
from tinysubspace.curvature.hessian import module_mode
from tinysubspace.experiments.measurement import Context, OperatorSettings
from tinysubspace.experiments.tracker_sharded import reshard
from tinysubspace.metrics import (
    eigenvector_overlaps,
    gradient_overlap,
    subspace_overlap,
    top_fraction,
)
from tinysubspace.problems.block_curvature import block_columns, block_measurements
from tinysubspace.problems.models.blocks import parameter_blocks
from tinysubspace.runtime import distributed as tsdist

__all__ = [
    "CERTIFICATES",
    "AnchorsGroup",
    "BlocksGroup",
    "CostGroup",
    "HessianGroup",
    "OverheadGroup",
    "StatelessGroup",
    "SubsetGroup",
    "TestGroup",
    "TrainGroup",
    "accuracy",
    "output_logits",
]


class StatelessGroup:
    """Base of a group without state (``state_dict`` is empty)."""

    name = ""
    deferred = False
    bucket: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class TrainGroup(StatelessGroup):
    """``train/loss`` ``L``, ``train/accuracy`` and ``train/grad_norm`` ``‖g‖`` of the whole
    training set."""

    name = "train"

    def names(self) -> list[str]:
        return ["train/loss", "train/accuracy", "train/grad_norm"]

    def measure(self, ctx: Context) -> dict[str, float]:
        return {"train/loss": ctx.loss, "train/grad_norm": vector_norm(ctx.g, ctx.space),
                "train/accuracy": accuracy(ctx.model, ctx.train, ctx.operators,
                                           ctx.classification)}


class HessianGroup(StatelessGroup):
    """``hessian/eig_1 … eig_2k``; ``f_top`` and ``f_next`` (eq. 2) of the top-k and next-k
    bases, ``overlap_g_Hg`` (eq. 3), ``c2_i`` (eq. 12); ``residual_max``
    (``max_i ‖H v_i − λ_i v_i‖ / max_i |λ_i|``) and ``converged``."""

    name = "hessian"

    def __init__(self, k: int, certificate: bool = False) -> None:
        self.k, self.certificate = k, certificate

    def names(self) -> list[str]:
        n = 2 * self.k
        return ([f"hessian/eig_{i}" for i in range(1, n + 1)]
                + ["hessian/f_top", "hessian/f_next", "hessian/overlap_g_Hg"]
                + [f"hessian/c2_{i}" for i in range(1, n + 1)]
                + ["hessian/residual_max", "hessian/converged"]
                + (list(SOLVE_COLUMNS) if self.certificate else []))

    def measure(self, ctx: Context) -> dict[str, float]:
        eig = ctx.eig
        row = {f"hessian/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)}
        row.update(gradient_metrics(ctx.g, ctx.Hg, eig.vectors, self.k, ctx.space))
        scale = max(float(eig.values.abs().max()), 1e-300)
        row["hessian/residual_max"] = float(eig.residuals.max()) / scale
        row["hessian/converged"] = float(eig.converged)
        if self.certificate:
            row["hessian/f_top_error"] = f_top_error(eig, self.k)
            row["hessian/certificate"] = CERTIFICATES[eig.certificate]
        return row


SOLVE_COLUMNS = ("hessian/f_top_error", "hessian/certificate")
"""The Hessian group's columns of a non-default solve (``SolverSettings.reports_certificate``):
the ``f_top`` error estimate of a budget solve and the certificate as a number."""

CERTIFICATES = {"full": 2.0, "guard": 1.0, "folded": 1.0, "scheduled": 0.5, "none": 0.0}
"""``hessian/certificate``: ``Eigenpairs.certificate`` as a number (docs/run-store.md)."""


def f_top_error(eig: Any, k: int) -> float:
    """Davis–Kahan estimate of ``|f_top(V_k) − f_top(V*_k)|`` (eq. 2) for the top ``k`` of a
    budget solve's ``2k`` pairs (:mod:`tinysubspace.linalg.budget`): ``min(1, ‖R_k‖ / δ̂)`` with
    ``‖R_k‖₂ ≤ ‖R_k‖_F = (Σ_{i≤k} r_i²)^{1/2}`` and ``δ̂ = θ_k − (θ_{k+1} + r_{k+1})`` (1 when
    ``δ̂ ≤ 0``); NaN for a solve to ``tol`` (not estimated). A bound when ``λ_{k+1} ≤ θ_{k+1} +
    r_{k+1}``; the Krylov budget's unresolved ``(k+1)``-th pair can break that (linalg/budget.py:
    short of the true ``sin θ`` by up to 1.29× in its tests)."""
    if getattr(eig, "solver", "lanczos") != "budget" or eig.values.numel() <= k:
        return float("nan")
    norm = float(eig.residuals[:k].double().pow(2).sum().sqrt())
    gap = float(eig.values[k - 1]) - float(eig.values[k]) - float(eig.residuals[k])
    return min(1.0, norm / gap) if gap > 0 else 1.0


class AnchorsGroup:
    """``overlap/top/t1=T``, ``overlap/next/t1=T`` and ``overlap/d=D/t1=T`` (eq. 5) between the
    bases kept at the anchor steps ``T`` and the current ones (Figs. 2, 3, 9, 10)."""

    name = "anchors"
    deferred = False
    bucket = None

    def __init__(self, k: int, anchors: Any) -> None:
        self.k, self.anchors = k, tuple(sorted(anchors))
        self.bases: dict[int, torch.Tensor] = {}  # t1 -> (p, 2k) basis, float32 on the CPU

    def names(self) -> list[str]:
        cols = []
        for t1 in self.anchors:
            cols += [f"overlap/top/t1={t1}", f"overlap/next/t1={t1}"]
            cols += [f"overlap/d={d}/t1={t1}" for d in range(2, 2 * self.k + 1)]
        return cols

    def measure(self, ctx: Context) -> dict[str, float]:
        k, space, now = self.k, ctx.space, ctx.eig.vectors.detach().float().cpu()
        if ctx.step in self.anchors:
            self.bases[ctx.step] = now
        if space is not None:  # local rows: the sums over ranks run on the operator's device
            now = now.to(ctx.op.device)
        row: dict[str, float] = {}
        for t1, W in sorted(self.bases.items()):
            W = W.to(now.device)
            subspace_overlap(W, now, space=space)  # checks both bases (orthonormal, same rows)
            # one (2k, 2k) Gram, accumulated in float64 (summed over ranks if sharded); every
            # column is a block of it
            W64, now64 = W.double(), now.double()
            gram = W64.T @ now64 if space is None else space.gram(W64, now64)
            row[f"overlap/top/t1={t1}"] = _block_overlap(gram[:k, :k])
            row[f"overlap/next/t1={t1}"] = _block_overlap(gram[k:, k:])
            for d in range(2, 2 * k + 1):
                row[f"overlap/d={d}/t1={t1}"] = _block_overlap(gram[:d, :d])
        return row

    def forget_from(self, step: int) -> None:
        """Drop the bases kept at ``step`` and later (a resumed run measures them again)."""
        for t1 in [t for t in self.bases if t >= step]:
            del self.bases[t1]

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": dict(self.bases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = dict(state.get("anchors") or {})


def _block_overlap(gram: torch.Tensor) -> float:
    """Eq. 5 of two ``d``-column orthonormal bases from their ``(d, d)`` Gram ``V1ᵀ V2``:
    ``‖V1ᵀ V2‖_F² / d`` (what :func:`~tinysubspace.metrics.subspace_overlap` computes, without
    forming the Gram of every leading pair of columns again)."""
    return min(1.0, float(gram.square().sum()) / gram.shape[0])


class CostGroup(StatelessGroup):
    """``cost/matvecs`` (products of the training Hessian's operator) and ``cost/seconds`` (of
    the measurement up to the deferred groups); ``bucket``: ``cost/{bucket}_matvecs`` and
    ``_seconds``, what the groups of that bucket spent."""

    deferred = True

    def __init__(self, bucket: str | None = None) -> None:
        self.of = bucket
        self.name = "cost" if bucket is None else f"cost_{bucket}"

    def names(self) -> list[str]:
        if self.of is None:
            return ["cost/matvecs", "cost/seconds"]
        return [f"cost/{self.of}_matvecs", f"cost/{self.of}_seconds"]

    def measure(self, ctx: Context) -> dict[str, float]:
        if self.of is None:
            return {"cost/matvecs": ctx.op.matvecs,
                    "cost/seconds": time.perf_counter() - ctx.started}
        products, seconds = ctx.cost.get(self.of, [0, 0.0])
        return {f"cost/{self.of}_matvecs": int(products), f"cost/{self.of}_seconds": seconds}


class TestGroup(StatelessGroup):
    """``test/loss``, ``test/accuracy``, ``test/f_top`` (eq. 2 with the test gradient and the
    training Hessian's top-k) and ``test/overlap_g_Hg`` (eq. 3 with the test set's ``g`` and
    ``H``)."""

    name = "test"

    def names(self) -> list[str]:
        return ["test/loss", "test/accuracy", "test/f_top", "test/overlap_g_Hg"]

    def measure(self, ctx: Context) -> dict[str, float]:
        if ctx.test is None:
            return {}
        op = ctx.operators.hessian(ctx.model, ctx.loss_fn, ctx.test)
        loss, g = op.loss_and_gradient()
        top, space = ctx.eig.vectors[:, :ctx.k], getattr(op, "vector_space", None)
        overlap = math.nan
        if vector_norm(g, space) != 0.0:
            Hg = op @ g
            overlap = _defined(lambda: gradient_overlap(g, Hg, space=space), Hg, space=space)
        return {"test/loss": loss,
                "test/accuracy": accuracy(ctx.model, ctx.test, ctx.operators, ctx.classification),
                "test/f_top": _defined(lambda: top_fraction(g, top, space=space), g,
                                       space=space),
                "test/overlap_g_Hg": overlap}


class BlocksGroup(StatelessGroup):
    """``block/NAME/eig_1 … eig_k``, ``/trace``, ``/trace_se``, ``/size`` of every diagonal
    Hessian block, ``blocks/heterogeneity`` and ``blocks/heterogeneity_normalized``: the names
    and the values both from :mod:`~tinysubspace.problems.block_curvature`
    (:func:`~.block_curvature.block_columns` beside :func:`~.block_curvature.block_measurements`),
    which the CLI's ``measure_run_blocks`` shares."""

    name = "blocks"

    def __init__(self, model: torch.nn.Module, blocks: str, k: int, steps: int,
                 probes: int) -> None:
        self.blocks, self.k, self.steps, self.probes = blocks, k, steps, probes
        self.block_names = list(parameter_blocks(model, blocks))

    def names(self) -> list[str]:
        return block_columns(self.block_names, self.k)

    def measure(self, ctx: Context) -> dict[str, float]:
        options = ctx.operators.keywords()
        options.pop("distributed")
        return block_measurements(ctx.model, ctx.loss_fn, ctx.train, self.blocks, k=self.k,
                                  steps=self.steps, probes=self.probes, seed=ctx.run_seed,
                                  tol=ctx.solver.tol, tol_scale=ctx.solver.tol_scale, **options)


class OverheadGroup(StatelessGroup):
    """``cost/overhead``: the seconds spent measuring (this measurement included) over the wall
    seconds since the tracker was built (measured last, from the façade's clock)."""

    name, deferred = "overhead", True

    def names(self) -> list[str]:
        return ["cost/overhead"]

    def measure(self, ctx: Context) -> dict[str, float]:
        clock = ctx.shared.get("overhead")
        return {} if clock is None else {"cost/overhead": clock()}


class SubsetGroup(StatelessGroup):
    """Once per run (the first measurement): ``subset/overlap_top``, eq. 5 between the
    subset's top-k and the full data's, and ``subset/eig_1_full``."""

    name = "subset"

    def __init__(self, full_data: Any, seed: int) -> None:
        self.full_data, self.seed = full_data, seed
        self.report: dict[str, float] | None = None

    def names(self) -> list[str]:
        return ["subset/overlap_top", "subset/eig_1_full"]

    def measure(self, ctx: Context) -> dict[str, float]:
        if self.report is None:
            op = ctx.operators.hessian(ctx.model, ctx.loss_fn, self.full_data)
            full = ctx.solver.cold(op, ctx.k, self.seed)
            self.report = {"subset/overlap_top": subspace_overlap(ctx.eig.vectors[:, :ctx.k],
                                                                  full.vectors),
                           "subset/eig_1_full": float(full.values[0])}
            return dict(self.report)
        return {}


# ---------------------------------------------------------------------------- shared helpers
def gradient_metrics(g: torch.Tensor, Hg: torch.Tensor, V: torch.Tensor, k: int,
                     space: Any = None) -> dict[str, float]:
    """f_top (eq. 2) for the top-k and next-k bases, overlap(g, Hg) (eq. 3), c_i² (eq. 12);
    ``space``: the vectors' inner product when they are shards (``Context.space``)."""
    row = {"hessian/f_top": _defined(lambda: top_fraction(g, V[:, :k], space=space), g,
                                     space=space),
           "hessian/f_next": _defined(lambda: top_fraction(g, V[:, k:], space=space), g,
                                      space=space),
           "hessian/overlap_g_Hg": _defined(lambda: gradient_overlap(g, Hg, space=space), g, Hg,
                                            space=space)}
    if vector_norm(g, space) == 0.0:
        row.update({f"hessian/c2_{i + 1}": math.nan for i in range(V.shape[1])})
    else:
        c2 = eigenvector_overlaps(g, V, space=space)
        row.update({f"hessian/c2_{i + 1}": float(c) for i, c in enumerate(c2)})
    return row


def _defined(fn: Callable[[], float], *vectors: torch.Tensor, space: Any = None) -> float:
    """``fn()``, or NaN where the quantity is undefined: one of ``vectors`` (the gradient, or
    ``Hg``) is exactly zero. Any other error (a non-orthonormal basis, a length mismatch) is
    raised."""
    if any(vector_norm(v, space) == 0.0 for v in vectors):
        return math.nan
    return fn()


def vector_norm(v: torch.Tensor, space: Any = None) -> float:
    """``‖v‖``; with ``space`` (vectors sharded over ranks) its norm, summed over ranks."""
    return float(v.norm()) if space is None else float(space.norm(v))


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Any, operators: OperatorSettings,
             classification: bool = True) -> float:
    """Share of examples of ``data`` whose largest output is the target, in ``operators.mode``
    and chunks of ``operators.chunk_size`` (batch norm in train mode runs on copies of the
    buffers, so the running statistics never move; summed over ranks when distributed); NaN
    where accuracy is undefined (``classification`` false)."""
    if not classification:
        return math.nan
    device = next(model.parameters()).device
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, buffers, args, kwargs)

    correct = total = 0
    with module_mode(model, train=operators.mode == "train"):
        for batch in BatchSource(data, device=device, chunk_size=operators.chunk_size):
            logits = output_logits(call_model(forward, batch.inputs))
            correct += int((logits.argmax(dim=1) == batch.targets).sum())
            total += int(batch.targets.shape[0])
    reshard(model)  # an FSDP2 model's root parameters are shards again
    if not operators.distributed:
        return correct / total
    counts = tsdist.sum_across_ranks(
        lambda: torch.tensor([float(correct), float(total)], dtype=torch.float64,
                             device=device), device)
    return float(counts[0] / counts[1])


def output_logits(outputs: Any) -> torch.Tensor:
    """The class scores of a model's outputs: the tensor itself, or ``outputs.logits`` /
    ``outputs["logits"]`` (Hugging Face model outputs)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot read class scores from model outputs of type "
                        f"{type(outputs).__name__}; return a tensor or an object with .logits")
    return logits
