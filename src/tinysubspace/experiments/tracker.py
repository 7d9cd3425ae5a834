"""The subspace tracker: when to measure during training, and what each measurement holds.

At each scheduled step the tracker measures on the *full* training set (PAPER.txt section 2):
loss, gradient ``g``, the top ``2k`` Hessian eigenpairs (warm-started from the previous
measurement) and ``H g``, and hands them, in one
:class:`~tinysubspace.experiments.measurement.Context`, to an ordered, named list of column
groups (:mod:`~tinysubspace.experiments.groups`, :mod:`~tinysubspace.experiments.
tracker_curvature`) that turn them into a flat scalar row (STYLE.md point 13): ``f_top``
(eq. 2) for the top-k and next-k subspaces, ``overlap(g, Hg)`` (eq. 3), ``c_i²`` (eq. 12), the
overlaps (eq. 5) with the bases kept at anchor steps ``t1`` (Figs. 2, 3, 9, 10), and whatever
else the groups measure. Big arrays go back to the caller to store; the tracker writes nothing.

A measurement changes nothing of the caller's: the model's parameters, buffers (train-mode
batch norm runs on copies) and train/eval flags, ``p.grad``, and the global random streams
(torch CPU and CUDA, numpy, ``random``) are as they were before it. :class:`~tinysubspace.
experiments.subspace_tracker.SubspaceTracker` is the user-facing API on top of this class.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import torch

from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.groups import (
    AnchorsGroup,
    BlocksGroup,
    CostGroup,
    HessianGroup,
    TestGroup,
    TrainGroup,
    output_logits,
)
from tinysubspace.experiments.groups import gradient_metrics as _gradient_metrics
from tinysubspace.experiments.measurement import (
    Context,
    MeasurementSettings,
    OperatorSettings,
    SolverSettings,
)
from tinysubspace.experiments.measurement import measure_groups as _measure_groups
from tinysubspace.experiments.schedules import measurement_steps
from tinysubspace.experiments.tracker_sharded import reshard, saved_eigenvectors
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.warm_state import WarmStart
from tinysubspace.problems.models.blocks import parameter_blocks
from tinysubspace.runtime import distributed as tsdist

__all__ = ["DTYPES", "Measurement", "Tracker", "measurement_steps", "output_logits",
           "preserved_state"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
HESSIAN = "hessian"  # the warm-start name of the Hessian's top-2k solve
_ = _gradient_metrics  # re-exported for the tests of the gradient metrics


@dataclass
class Measurement:
    """One measurement: the flat row for ``metrics.csv`` and the arrays worth keeping."""

    row: dict[str, float]
    eigenpairs: Eigenpairs | None  # None: no group used the Hessian's top-2k solve
    gradient: torch.Tensor
    vectors_to_save: dict[str, Any] | None = None


def settings_of(config: TrackerConfig, distributed: bool | None = None,
                dtype: torch.dtype | None = None) -> MeasurementSettings:
    """The measurement settings of a ``tracker.*`` config (``dtype`` overrides
    ``config.dtype``; ``distributed=None``: on under torchrun).

    Raises:
        ValueError: ``k`` below 1, an unknown dtype, solver or tol_scale.
    """
    if config.k < 1:
        raise ValueError(f"tracker.k must be at least 1, got {config.k}")
    if config.dtype not in DTYPES:
        raise ValueError(f"tracker.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    solver = SolverSettings(tol=config.tol, tol_scale=config.tol_scale, solver=config.solver,
                            check=config.check, check_every=config.check_every,
                            budget_matvecs=config.budget_matvecs, pass_cost=config.pass_cost)
    distributed = tsdist.is_distributed() if distributed is None else bool(distributed)
    operators = OperatorSettings(dtype=dtype if dtype is not None else DTYPES[config.dtype],
                                 mode=config.mode, chunk_size=config.chunk_size,
                                 distributed=distributed)
    return MeasurementSettings(config.k, operators, solver, frozenset(config.save_vectors_at))


def standard_groups(k: int, anchors: Sequence[int], test: bool,
                    certificate: bool = False) -> list[Any]:
    """The groups every tracker has: ``train``, ``hessian`` (with ``certificate``, its
    ``f_top_error`` and ``certificate`` columns), ``anchors``, ``cost`` and, with test data,
    ``test``."""
    groups = [TrainGroup(), HessianGroup(k, certificate), AnchorsGroup(k, anchors), CostGroup()]
    return groups + ([TestGroup()] if test else [])


class Tracker:
    """Measures the Hessian's top subspace and the gradient on the full training set, and fills
    a row through its column groups.

    Args:
        config: what to measure (``k``, ``tol``, ``tol_scale``, ``solver``, ``dtype``,
            ``mode``, ``chunk_size``, ``anchors``, ``save_vectors_at``, ``blocks*``).
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``.
        train: the whole training set: anything :class:`HessianOperator` accepts (``(X, Y)``,
            a list of batches, a ``DataLoader``; dict batches with ``"labels"``).
        test: optional test set, the same kinds (``test/...`` columns).
        classification: whether accuracy is defined (targets are class labels).
        distributed: ``train`` and ``test`` are this process's shards and every measurement is
            a collective over the ranks of ``torch.distributed`` (every rank calls
            :meth:`measure` at the same steps and gets the same row). ``None``: on iff
            ``torch.distributed`` runs more than one process (as :class:`HessianOperator`).
        dtype: dtype of the measurement; ``None``: ``config.dtype``.

    ``config`` may also be :class:`~tinysubspace.experiments.measurement.MeasurementSettings`
    with ``groups``, the ordered column groups (the façade's way; ``distributed`` and ``dtype``
    are then in the settings).

    Raises:
        ValueError: ``k`` below 1, an unknown dtype, solver or tol_scale.
    """

    def __init__(self, config: TrackerConfig | MeasurementSettings, loss_fn: Callable,
                 train: Any, test: Any = None, classification: bool = True,
                 distributed: bool | None = None, dtype: torch.dtype | None = None, *,
                 groups: Sequence[Any] | None = None) -> None:
        blocks = ("none", 1, 1, 1)
        if isinstance(config, TrackerConfig):
            settings = settings_of(config, distributed, dtype)
            blocks = (config.blocks, config.blocks_k, config.blocks_steps, config.blocks_probes)
            anchors = config.anchors
        else:
            settings, anchors = config, ()
        if groups is None:
            groups = standard_groups(settings.k, anchors, test is not None,
                                     settings.solver.reports_certificate)
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"column groups need distinct names, got {names}")
        self.settings, self.groups, self.loss_fn = settings, list(groups), loss_fn
        self.train, self.test, self.classification = train, test, classification
        self.warm = WarmStart()
        self._blocks = blocks

    # ----------------------------------------------------------------- groups
    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def operators(self) -> OperatorSettings:
        return self.settings.operators

    @property
    def solver(self) -> SolverSettings:
        return self.settings.solver

    @property
    def dtype(self) -> torch.dtype | None:
        return self.operators.dtype

    @property
    def distributed(self) -> bool:
        return self.operators.distributed

    def group(self, name: str) -> Any:
        """The group called ``name`` (``KeyError`` naming the groups there are)."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no column group {name!r}; the tracker has {[g.name for g in self.groups]}")

    def add_group(self, group: Any) -> None:
        """Append ``group`` (its columns come after the others')."""
        if any(g.name == group.name for g in self.groups):
            raise ValueError(f"the tracker already has a column group {group.name!r}")
        self.groups.append(group)

    def _with_blocks(self, model: torch.nn.Module) -> None:
        """Add the ``blocks`` group of a config-built tracker once its model is known."""
        blocks, k, steps, probes = self._blocks
        if blocks != "none" and not any(g.name == "blocks" for g in self.groups):
            self.groups.append(BlocksGroup(model, blocks, k, steps, probes))

    def columns(self, model: torch.nn.Module | None = None) -> list[str]:
        """Every column a measurement row can have, in order (the run's ``metrics.csv``); the
        per-block columns (``tracker.blocks``) need the ``model`` whose blocks they name."""
        if model is not None:
            self._with_blocks(model)
        return ["step", "epoch", "wall_time", *(c for g in self.groups for c in g.names())]

    # ------------------------------------------------------------- measurement
    def operator(self, model: torch.nn.Module, data: Any) -> HessianOperator:
        """The Hessian of ``model`` on ``data`` with the tracker's operator settings."""
        return self.operators.hessian(model, self.loss_fn, data)

    def measure(self, model: torch.nn.Module, step: int, seed: int = 0,
                shared: Mapping[str, Any] | None = None) -> Measurement:
        """Measure at ``step`` (``model`` is read, never changed) and update the warm starts
        and the groups' state; ``shared`` goes into the groups' ``context.shared``."""
        self._with_blocks(model)
        with preserved_state(model):
            context = self.context(model, step, seed)
            context.shared.update(shared or {})
            row = {"step": step, **_measure_groups(self.groups, context)}
        save = None
        kept = step in self.settings.save_vectors_at or step in getattr(self._anchors(),
                                                                        "anchors", ())
        if kept and context.eig is not None:  # gathered from the ranks of a sharded model
            save = saved_eigenvectors(model, context.op, context.eig.values,
                                      context.eig.vectors, step)
        return Measurement(row, context.eig, context.g, save)

    def context(self, model: torch.nn.Module, step: int, seed: int) -> Context:
        """The training Hessian's loss, ``g``, top ``2k`` pairs (warm-started) and ``H g`` at
        ``model``: what every group is given."""
        measuring_since = time.perf_counter()  # cost/seconds counts the loss, g and the solve
        op = self.operator(model, self.train)
        loss, g = op.loss_and_gradient()
        previous = self.warm.get(HESSIAN)
        eig = Hg = None
        if self.solves_hessian:
            started = time.perf_counter()
            eig = self.solver.solve(op, 2 * self.k, self.warm, HESSIAN, seed + step)
            seconds = time.perf_counter() - started
            Hg = op @ g
        context = Context(model=model, loss_fn=self.loss_fn, train=self.train, test=self.test,
                          step=step, seed=seed + step, k=self.k, operators=self.operators,
                          solver=self.solver, warm=self.warm,
                          classification=self.classification, op=op, loss=loss, g=g,
                          Hg=Hg, eig=eig, previous=previous, run_seed=seed,
                          started=measuring_since)
        if eig is not None:
            context.charge(HESSIAN, eig.matvecs, seconds)  # the solve's cost, bucket "hessian"
        return context

    @property
    def solves_hessian(self) -> bool:
        """Whether a measurement finds the Hessian's top ``2k`` pairs and ``H g``: unless every
        group says it reads neither (``uses_hessian_solve = False``, e.g. the edge-of-stability
        group, which solves for its own top ``k``)."""
        return any(getattr(g, "uses_hessian_solve", True) for g in self.groups)

    def _anchors(self) -> AnchorsGroup | None:
        return next((g for g in self.groups if isinstance(g, AnchorsGroup)), None)

    def forget_from(self, step: int) -> None:
        """Drop the anchor bases kept at ``step`` and later (a resumed run measures again)."""
        anchors = self._anchors()
        if anchors is not None:
            anchors.forget_from(step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"warm": the warm starts, "groups": {name: the group's state}}``."""
        return {"warm": self.warm.state_dict(),
                "groups": {g.name: g.state_dict() for g in self.groups}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Missing entries start empty (a cold start, no anchors),
        whatever saved them; states of groups this tracker does not have are ignored. A state
        saved before the groups (``previous``, ``anchors``, ``curvature.previous``) loads too."""
        warm, groups = state.get("warm"), dict(state.get("groups") or {})
        if warm is None:  # the layout of checkpoints written before the column groups
            warm = {HESSIAN: state.get("previous"),
                    **((state.get("curvature") or {}).get("previous") or {})}
            groups.setdefault("anchors", {"anchors": state.get("anchors") or {}})
        self.warm.load_state_dict({k: v for k, v in warm.items() if v is not None})
        for group in self.groups:
            group.load_state_dict(groups.get(group.name) or {})


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
    """The columns of the ``blocks`` group for ``model``'s ``blocks`` with ``k`` eigenvalues
    each (:class:`~tinysubspace.experiments.groups.BlocksGroup`)."""
    return BlocksGroup(model, blocks, k, 1, 1).names()


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore the global random streams (torch CPU and the model's CUDA device, numpy,
    ``random``) and every ``p.grad`` of ``model`` on exit: a measurement that draws random
    numbers (dropout in train mode, a ``DataLoader`` that shuffles) leaves training unchanged.
    An FSDP2 model's parameters are shards on entry and exit (:func:`.tracker_sharded.reshard`)."""
    reshard(model)
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
        reshard(model)
        numpy.random.set_state(np_state)
        random.setstate(py_state)
        for p, grad in grads:
            p.grad = grad
