"""The subspace tracker: when to measure during training, and what each measurement holds.

At each scheduled step the tracker measures on the *full* training set (PAPER.txt section 2):
loss, accuracy, gradient ``g``, the top ``2k`` Hessian eigenpairs (warm-started from the previous
measurement), and from them ``f_top`` (eq. 2) for the top-k and next-k subspaces,
``overlap(g, Hg)`` (eq. 3), ``c_i²`` (eq. 12) and the overlap (eq. 5) of the current subspaces with
those kept at anchor steps ``t1`` (Figs. 2, 3, 9, 10). It returns flat scalar dicts
(STYLE.md point 13) and hands big arrays back to the caller to store; it writes nothing.

A measurement changes nothing of the caller's: the model's parameters, buffers (train-mode
batch norm runs on copies) and train/eval flags, ``p.grad``, and the global random streams
(torch CPU and CUDA, numpy, ``random``) are as they were before it. :class:`~tinysubspace.
experiments.subspace_tracker.SubspaceTracker` is the user-facing API on top of this class.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch
from torch.func import functional_call

from tinysubspace.curvature.data import BatchSource, call_model
from tinysubspace.curvature.hessian import HessianOperator, module_mode
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.schedules import measurement_steps
from tinysubspace.linalg.lanczos import Eigenpairs, top_eigenpairs
from tinysubspace.linalg.tolerance import TOL_SCALES
from tinysubspace.linalg.warm_start import track_eigenpairs
from tinysubspace.metrics import (
    eigenvector_overlaps,
    gradient_overlap,
    subspace_overlap,
    top_fraction,
)
from tinysubspace.problems.block_curvature import block_measurements
from tinysubspace.problems.models.blocks import parameter_blocks
from tinysubspace.runtime import distributed as tsdist

__all__ = ["Measurement", "Tracker", "measurement_steps"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Measurement:
    """One measurement: the flat row for ``metrics.csv`` and the arrays worth keeping."""

    row: dict[str, float]
    eigenpairs: Eigenpairs
    gradient: torch.Tensor
    vectors_to_save: dict[str, Any] | None = None


@dataclass
class _State:
    previous: torch.Tensor | None = None  # (p, 2k) basis of the last measurement (warm start)
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)  # t1 -> (p, 2k) basis


class Tracker:
    """Measures the Hessian's top subspace and the gradient on the full training set.

    Args:
        config: what and when to measure.
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``.
        train: the whole training set: anything :class:`HessianOperator` accepts (``(X, Y)``,
            a list of batches, a ``DataLoader``; dict batches with ``"labels"``).
        test: optional test set, the same kinds (``test/...`` columns).
        classification: whether accuracy is defined (targets are class labels).
        solver: ``solver(op, n, previous, tol, seed) -> Eigenpairs`` for the top ``n`` pairs
            (default: ``SOLVERS[config.solver]``, the warm-started :func:`track_eigenpairs`,
            with ``tol_scale=config.tol_scale``; a solver given here applies its own criterion).
        distributed: ``train`` and ``test`` are this process's shards and every measurement is
            a collective over the ranks of ``torch.distributed`` (every rank calls
            :meth:`measure` at the same steps and gets the same row). ``None``: on iff
            ``torch.distributed`` runs more than one process (as :class:`HessianOperator`).
        dtype: dtype of the measurement; ``None``: ``config.dtype``.
    """

    def __init__(self, config: TrackerConfig, loss_fn: Callable, train: tuple, test=None,
                 classification: bool = True, solver: Callable | None = None,
                 distributed: bool | None = None, dtype: torch.dtype | None = None) -> None:
        if config.k < 1:
            raise ValueError(f"tracker.k must be at least 1, got {config.k}")
        if config.dtype not in DTYPES:
            raise ValueError(f"tracker.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        self.config, self.loss_fn = config, loss_fn
        self.dtype = dtype if dtype is not None else DTYPES[config.dtype]
        self.train, self.test, self.classification = train, test, classification
        if config.solver not in SOLVERS:
            raise ValueError(f"tracker.solver must be one of {sorted(SOLVERS)}, got "
                             f"{config.solver!r}")
        if config.tol_scale not in TOL_SCALES:
            raise ValueError(f"tracker.tol_scale must be one of {TOL_SCALES}, got "
                             f"{config.tol_scale!r}")
        self.solver = solver or functools.partial(SOLVERS[config.solver],
                                                  tol_scale=config.tol_scale)
        self.distributed = tsdist.is_distributed() if distributed is None else bool(distributed)
        self.state = _State()

    # ----------------------------------------------------------------- columns
    def columns(self, model: torch.nn.Module | None = None) -> list[str]:
        """Every column a measurement row can have, in order (the run's ``metrics.csv``); the
        per-block columns (``tracker.blocks``) need the ``model`` whose blocks they name."""
        k = self.config.k
        cols = ["step", "epoch", "wall_time", "train/loss", "train/accuracy", "train/grad_norm"]
        cols += [f"hessian/eig_{i}" for i in range(1, 2 * k + 1)]
        cols += ["hessian/f_top", "hessian/f_next", "hessian/overlap_g_Hg"]
        cols += [f"hessian/c2_{i}" for i in range(1, 2 * k + 1)]
        cols += ["hessian/residual_max", "hessian/converged"]
        for t1 in sorted(self.config.anchors):
            cols += [f"overlap/top/t1={t1}", f"overlap/next/t1={t1}"]
            cols += [f"overlap/d={d}/t1={t1}" for d in range(2, 2 * k + 1)]
        cols += ["cost/matvecs", "cost/seconds"]
        if self.test is not None:
            cols += ["test/loss", "test/accuracy", "test/f_top", "test/overlap_g_Hg"]
        if self.config.blocks != "none" and model is not None:
            cols += block_columns(model, self.config.blocks, self.config.blocks_k)
        return cols

    # ------------------------------------------------------------- measurement
    def operator(self, model: torch.nn.Module, data: tuple) -> HessianOperator:
        return HessianOperator(model, self.loss_fn, data, dtype=self.dtype,
                               mode=self.config.mode, batch_size=self.config.hvp_batch_size,
                               distributed=self.distributed)

    def measure(self, model: torch.nn.Module, step: int, seed: int = 0) -> Measurement:
        """Measure at ``step`` (``model`` is read, never changed) and update the warm start and
        anchors."""
        with preserved_state(model):
            return self._measure(model, step, seed)

    def _measure(self, model: torch.nn.Module, step: int, seed: int) -> Measurement:
        started = time.perf_counter()
        k = self.config.k
        op = self.operator(model, self.train)
        loss, g = op.loss_and_gradient()
        eig = self.solver(op, 2 * k, self.state.previous, self.config.tol, seed + step)
        Hg = op @ g
        V = eig.vectors
        row: dict[str, float] = {"step": step, "train/loss": loss,
                                 "train/grad_norm": float(g.norm())}
        row["train/accuracy"] = self._accuracy(model, self.train)
        row.update({f"hessian/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)})
        scale = max(float(eig.values.abs().max()), 1e-300)
        row["hessian/residual_max"] = float(eig.residuals.max()) / scale
        row["hessian/converged"] = float(eig.converged)
        row.update(_gradient_metrics(g, Hg, V, k))
        row.update(self._anchor_overlaps(V, step))
        if self.test is not None:
            row.update(self._test_metrics(model, V[:, :k]))
        if self.config.blocks != "none":
            row.update(self._block_metrics(model, seed))
        row["cost/matvecs"] = op.matvecs
        row["cost/seconds"] = time.perf_counter() - started
        self.state.previous = V.detach().clone()
        save = None
        if step in self.config.save_vectors_at or step in self.config.anchors:
            save = {"step": step, "values": eig.values.cpu(), "vectors": V.float().cpu(),
                    "param_names": list(op.layout.names),
                    "param_shapes": [list(s) for s in op.layout.shapes]}
        return Measurement(row, eig, g, save)

    def _anchor_overlaps(self, V: torch.Tensor, step: int) -> dict[str, float]:
        k = self.config.k
        if step in self.config.anchors:
            self.state.anchors[step] = V.detach().float().cpu()
        row: dict[str, float] = {}
        now = V.detach().float().cpu()
        for t1, W in sorted(self.state.anchors.items()):
            row[f"overlap/top/t1={t1}"] = subspace_overlap(W[:, :k], now[:, :k])
            row[f"overlap/next/t1={t1}"] = subspace_overlap(W[:, k:], now[:, k:])
            for d in range(2, 2 * k + 1):
                row[f"overlap/d={d}/t1={t1}"] = subspace_overlap(W[:, :d], now[:, :d])
        return row

    def _block_metrics(self, model: torch.nn.Module, seed: int) -> dict[str, float]:
        """``block/NAME/eig_i``, ``/trace``, ``/trace_se``, ``/size`` and the heterogeneity
        scores of the diagonal Hessian blocks (``tracker.blocks``), on the training data."""
        cfg = self.config
        return block_measurements(model, self.loss_fn, self.train, cfg.blocks, k=cfg.blocks_k,
                                  steps=cfg.blocks_steps, probes=cfg.blocks_probes, seed=seed,
                                  tol=cfg.tol, dtype=self.dtype, mode=cfg.mode,
                                  batch_size=cfg.hvp_batch_size)

    def _test_metrics(self, model: torch.nn.Module, V_top: torch.Tensor) -> dict[str, float]:
        op = self.operator(model, self.test)
        loss, g = op.loss_and_gradient()
        return {"test/loss": loss, "test/accuracy": self._accuracy(model, self.test),
                "test/f_top": _defined(lambda: top_fraction(g, V_top), g),
                "test/overlap_g_Hg": _overlap_with_hessian(op, g)}

    @torch.no_grad()
    def _accuracy(self, model: torch.nn.Module, data: Any) -> float:
        """Share of examples whose largest output is the target (batch norm in train mode runs
        on copies of the buffers, so the model's running statistics never move)."""
        if not self.classification:
            return math.nan
        device = next(model.parameters()).device
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, buffers, args, kwargs)

        correct = total = 0
        with module_mode(model, train=self.config.mode == "train"):
            for batch in BatchSource(data, device=device, batch_size=self.config.hvp_batch_size):
                logits = output_logits(call_model(forward, batch.inputs))
                correct += int((logits.argmax(dim=1) == batch.targets).sum())
                total += int(batch.targets.shape[0])
        if not self.distributed:
            return correct / total
        counts = tsdist.sum_across_ranks(
            lambda: torch.tensor([float(correct), float(total)], dtype=torch.float64,
                                 device=device), device)
        return float(counts[0] / counts[1])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.state.previous, "anchors": dict(self.state.anchors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = _State(state["previous"], dict(state["anchors"]))


BLOCK_OPTIONS = {"k": "blocks_k", "probes": "blocks_probes", "steps": "blocks_steps"}


def block_config(model: torch.nn.Module, blocks: str,
                  options: Mapping[str, int] | None) -> dict[str, Any]:
    """The ``tracker.blocks*`` fields of ``blocks`` and ``options``, checked (the block names of
    ``model`` are formed once, so a bad blocking fails here, not at a measurement).

    At every measurement the tracker then adds ``block/NAME/eig_1`` … ``eig_k`` (top
    eigenvalues of the diagonal block ``H_bb``), ``block/NAME/trace`` (Hutchinson, with
    ``trace_se``), ``block/NAME/size``, ``blocks/heterogeneity`` and
    ``blocks/heterogeneity_normalized`` (:func:`~tinysubspace.problems.block_curvature.
    block_measurements`).

    Args:
        model: the tracked model.
        blocks: ``"none"`` (off), ``"auto"``, ``"layers"`` or ``"types"``.
        options: any of ``{"k": 1, "probes": 4, "steps": 20}``: top eigenvalues, Hutchinson /
            SLQ probes and SLQ Lanczos steps per block.

    Raises:
        ValueError: another ``blocks``, an unknown option or one that is not a positive int.
    """
    if blocks not in ("none", "auto", "layers", "types"):
        raise ValueError(f"blocks must be 'none', 'auto', 'layers' or 'types', got {blocks!r}")
    unknown = sorted(set(options or {}) - set(BLOCK_OPTIONS))
    if unknown:
        raise ValueError(f"block_options takes {sorted(BLOCK_OPTIONS)}, got {unknown}")
    fields = {"blocks": blocks}
    for key, value in (options or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"block_options[{key!r}] must be an integer >= 1, got {value!r}")
        fields[BLOCK_OPTIONS[key]] = value
    if blocks != "none":
        parameter_blocks(model, blocks)
    return fields


def block_columns(model: torch.nn.Module, blocks: str, k: int) -> list[str]:
    """The columns :func:`~tinysubspace.problems.block_curvature.block_measurements` fills
    for ``model``'s ``blocks`` with ``k`` eigenvalues each."""
    cols = []
    for name in parameter_blocks(model, blocks):
        cols += [f"block/{name}/eig_{i}" for i in range(1, k + 1)]
        cols += [f"block/{name}/trace", f"block/{name}/trace_se", f"block/{name}/size"]
    return [*cols, "blocks/heterogeneity", "blocks/heterogeneity_normalized"]


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


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore the global random streams (torch CPU and the model's CUDA device, numpy,
    ``random``) and every ``p.grad`` of ``model`` on exit: a measurement that draws random
    numbers (dropout in train mode, a ``DataLoader`` that shuffles) leaves training unchanged."""
    device = next(model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    grads = [(p, p.grad) for p in model.parameters()]
    np_state, py_state = numpy.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), \
                torch.enable_grad():
            yield
    finally:
        numpy.random.set_state(np_state)
        random.setstate(py_state)
        for p, grad in grads:
            p.grad = grad


def _overlap_with_hessian(op: HessianOperator, g: torch.Tensor) -> float:
    """overlap(g, Hg) (eq. 3); NaN for a zero gradient (then ``Hg`` is not computed)."""
    if float(g.norm()) == 0.0:
        return math.nan
    Hg = op @ g
    return _defined(lambda: gradient_overlap(g, Hg), Hg)


def _defined(fn: Callable[[], float], *vectors: torch.Tensor) -> float:
    """``fn()``, or NaN where the quantity is undefined: one of ``vectors`` (the gradient, or
    ``Hg``) is exactly zero. Any other error (a non-orthonormal basis, a length mismatch) is
    raised."""
    if any(float(v.norm()) == 0.0 for v in vectors):
        return math.nan
    return fn()


def _gradient_metrics(g: torch.Tensor, Hg: torch.Tensor, V: torch.Tensor,
                      k: int) -> dict[str, float]:
    """f_top (eq. 2) for the top-k and next-k bases, overlap(g, Hg) (eq. 3), c_i² (eq. 12)."""
    row = {"hessian/f_top": _defined(lambda: top_fraction(g, V[:, :k]), g),
           "hessian/f_next": _defined(lambda: top_fraction(g, V[:, k:]), g),
           "hessian/overlap_g_Hg": _defined(lambda: gradient_overlap(g, Hg), g, Hg)}
    if float(g.norm()) == 0.0:
        row.update({f"hessian/c2_{i + 1}": math.nan for i in range(V.shape[1])})
    else:
        c2 = eigenvector_overlaps(g, V)
        row.update({f"hessian/c2_{i + 1}": float(c) for i, c in enumerate(c2)})
    return row


SOLVERS: dict[str, Callable[..., Eigenpairs]] = {
    # warm-started from the previous measurement (tracking.py); cold Lanczos at the first one
    "track": lambda op, n, previous, tol, seed, tol_scale="top": track_eigenpairs(
        op, n, previous, tol=tol, seed=seed, tol_scale=tol_scale),
    # a cold single-vector Lanczos at every measurement (the reference)
    "cold": lambda op, n, previous, tol, seed, tol_scale="top": top_eigenpairs(
        op, n, tol=tol, seed=seed, tol_scale=tol_scale),
}
