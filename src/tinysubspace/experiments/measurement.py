"""What one measurement is given: operator settings, solver settings, and the step's context.

A tracker's row is filled by an ordered list of *column groups* (:class:`ColumnGroup`): each
declares its column names (``names()``) beside the code that fills them (``measure(context)``)
and keeps its own state (``state_dict`` / ``load_state_dict``). Every group gets the same
:class:`Context`: the model and data, the step's seed, one :class:`OperatorSettings` (dtype,
mode, chunk size, H·V method, distributed) and one :class:`SolverSettings` (tol, tol_scale,
solver, warm start), the shared :class:`~tinysubspace.linalg.warm_state.WarmStart`, and the
Hessian quantities every group may reuse: ``L``, ``g``, ``H g`` and the top ``2k`` eigenpairs.
So every operator a group builds and every solve it runs gets the run's settings
(``settings.operators.build(kind, ...)``, ``settings.solver.solve(...)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.curvature.hvp import HVP_METHODS
from tinysubspace.linalg.amortised import CHECK_EVERY, CHECKS
from tinysubspace.linalg.lanczos import Eigenpairs, top_eigenpairs
from tinysubspace.linalg.tolerance import TOL_SCALES
from tinysubspace.linalg.warm_start import WARM_STARTS, track_eigenpairs
from tinysubspace.linalg.warm_state import WarmStart

__all__ = ["PASS_COSTS", "SOLVERS", "ColumnGroup", "Context", "MeasurementSettings",
           "OperatorSettings", "SolverSettings", "measure_groups"]

SOLVERS = ("cold", "track", "budget")
"""``track``: warm-started from the previous measurement (:func:`track_eigenpairs`); ``cold``:
a cold :func:`top_eigenpairs` at every measurement (the reference); ``budget``: the previous
measurement's pairs refined with exactly ``budget_matvecs`` products, not solved to ``tol``
(:func:`~tinysubspace.linalg.budget.refine_eigenpairs`; its first measurement is a solve to
``tol``)."""

PASS_COSTS = (None, "measure")
"""``pass_cost`` of :class:`SolverSettings`: ``None`` (``warm="auto"`` by the device) or
``"measure"`` (time a pass at the first warm measurement, then choose by that cost)."""


def _budget_keywords(matvecs: int) -> dict[str, Any]:
    """The keyword by which :func:`track_eigenpairs` takes the budget's products (one place,
    so a rename of that keyword is a one-line change)."""
    return {"matvecs": matvecs}


@dataclass(frozen=True)
class OperatorSettings:
    """How every operator of a measurement is built (the Hessian, the GGN, a block's, the test
    split's): the keywords of :class:`~tinysubspace.HessianOperator`."""

    dtype: torch.dtype | None = None
    mode: str = "eval"
    chunk_size: int | None = None  # examples of an (X, Y) pair per pass (None: one chunk)
    hvp_method: str = "auto"
    distributed: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {self.mode!r}")
        if self.hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {self.hvp_method!r}")

    def build(self, kind: type, model: torch.nn.Module, loss_fn: Callable, data: Any,
              **extra: Any) -> Any:
        """``kind(model, loss_fn, data, **settings, **extra)`` (``HessianOperator``,
        ``GGNOperator``, …)."""
        return kind(model, loss_fn, data, **self.keywords(), **extra)

    def hessian(self, model: torch.nn.Module, loss_fn: Callable, data: Any) -> HessianOperator:
        return self.build(HessianOperator, model, loss_fn, data)

    def keywords(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "mode": self.mode, "chunk_size": self.chunk_size,
                "hvp_method": self.hvp_method, "distributed": self.distributed}


@dataclass(frozen=True)
class SolverSettings:
    """How every eigensolve of a measurement runs.

    Attributes:
        tol: relative residual of every pair. tol_scale: ``"top"`` or ``"pair"``
            (:mod:`tinysubspace.linalg.tolerance`). solver: ``"track"``, ``"cold"`` or
            ``"budget"`` (:data:`SOLVERS`).
        warm: how ``track`` uses the previous vectors (:data:`tinysubspace.WARM_STARTS`); a
            group may ask for another (the preconditioned sharpness uses ``"subspace"``).
        check: ``"amortised"`` (default: the full multiplicity check at the first and every
            ``check_every``-th solve of a name, its state carried in the :class:`WarmStart`;
            :mod:`tinysubspace.linalg.amortised`; where a measured pass cost chooses the
            ``subspace`` start, the folded solver, whose check rides in its passes) or
            ``"full"`` (the check at every solve). ``track`` only.
        check_every: ``M`` of the amortised check.
        budget_matvecs: products per measurement of ``solver="budget"`` (required there, at
            least the solve's ``n`` pairs; ``None`` otherwise).
        pass_cost: ``None`` or ``"measure"`` (:data:`PASS_COSTS`): with ``warm="auto"``, time a
            pass at the first warm solve of each name; the cost then travels in the
            :class:`WarmStart` (and the checkpoint) and decides every later warm start.

    Raises:
        ValueError: an unknown ``tol_scale``, ``solver``, ``warm``, ``check`` or ``pass_cost``,
            a bad ``check_every``, ``budget_matvecs`` missing or not a positive integer with
            ``solver="budget"``, or given without it.
    """

    tol: float = 1e-4
    tol_scale: str = "top"
    solver: str = "track"
    warm: str = "auto"
    check: str = "amortised"
    check_every: int = CHECK_EVERY
    budget_matvecs: int | None = None
    pass_cost: str | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"tracker.solver must be one of {sorted(SOLVERS)}, got "
                             f"{self.solver!r}")
        if self.tol_scale not in TOL_SCALES:
            raise ValueError(f"tracker.tol_scale must be one of {TOL_SCALES}, got "
                             f"{self.tol_scale!r}")
        if self.warm not in WARM_STARTS:
            raise ValueError(f"warm must be one of {WARM_STARTS}, got {self.warm!r}")
        if self.check not in CHECKS:
            raise ValueError(f"tracker.check must be one of {CHECKS}, got {self.check!r}")
        every = self.check_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"tracker.check_every must be a positive integer, got {every!r}")
        if self.pass_cost not in PASS_COSTS:
            raise ValueError(f"pass_cost must be one of {PASS_COSTS}, got {self.pass_cost!r}")
        self._check_budget()

    def _check_budget(self) -> None:
        matvecs = self.budget_matvecs
        if self.solver != "budget":
            if matvecs is not None:
                raise ValueError(f"tracker.budget_matvecs={matvecs!r} is the budget of "
                                 f"tracker.solver='budget'; got solver={self.solver!r}")
        elif isinstance(matvecs, bool) or not isinstance(matvecs, int) or matvecs < 1:
            raise ValueError(f"tracker.solver='budget' needs tracker.budget_matvecs, a positive "
                             f"integer (products per measurement), got {matvecs!r}")

    @property
    def reports_certificate(self) -> bool:
        """Whether a row's certificate can differ from the full check's (a budget, the amortised
        check — the default — or a measured pass cost): then the Hessian group also writes
        ``hessian/f_top_error`` and ``hessian/certificate``."""
        return self.solver == "budget" or self.check != "full" or self.pass_cost is not None

    def solve(self, op: Any, n: int, warm: WarmStart, name: str, seed: int,
              start: str | None = None) -> Eigenpairs:
        """The top ``n`` pairs of ``op``, started from ``warm``'s previous result of ``name``
        (and kept there for the next solve of that name, with its guard and pass cost);
        ``start`` overrides :attr:`warm`."""
        previous = warm.previous(name)
        if self.solver == "cold":
            eig = self.cold(op, n, seed)
        else:
            if isinstance(previous, torch.Tensor):
                previous = previous.to(device=op.device, dtype=op.dtype)
            eig = track_eigenpairs(op, n, previous, tol=self.tol, seed=seed,
                                   tol_scale=self.tol_scale, warm=start or self.warm,
                                   **self._track_keywords(previous))
        warm.update(name, eig)
        return eig

    def _track_keywords(self, previous: Eigenpairs | torch.Tensor | None) -> dict[str, Any]:
        """The keywords of :func:`track_eigenpairs` beyond ``tol``, ``seed``, ``tol_scale`` and
        ``warm``: ``check="full"`` only when asked for (its default is the amortised check, or
        the folded solver where a measured pass cost chooses the ``subspace`` start)."""
        options: dict[str, Any] = {}
        if self.solver == "budget":
            options.update(solver="budget", **_budget_keywords(self.budget_matvecs))
        options["check_every"] = self.check_every
        if self.check == "full":
            options["check"] = "full"
        carried = previous.pass_cost if isinstance(previous, Eigenpairs) else None
        if self.pass_cost == "measure" and previous is not None and carried is None:
            options["pass_cost"] = "measure"
        return options

    def cold(self, op: Any, n: int, seed: int) -> Eigenpairs:
        """The top ``n`` pairs of ``op`` by a cold :func:`top_eigenpairs` (no warm start)."""
        return top_eigenpairs(op, n, tol=self.tol, seed=seed, tol_scale=self.tol_scale)


@dataclass(frozen=True)
class MeasurementSettings:
    """Everything a tracker's measurement is set by: the top ``k`` (the solve finds ``2k``),
    the operators' and the solvers' settings, and the steps whose eigenvectors are kept."""

    k: int
    operators: OperatorSettings
    solver: SolverSettings
    save_vectors_at: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        matvecs = self.solver.budget_matvecs
        if matvecs is not None and matvecs <= 2 * self.k:  # 2k pairs: P <= 2k cannot move them
            raise ValueError(f"budget_matvecs must be more than 2 * k = {2 * self.k} (the solve "
                             f"refines the top 2k pairs: top and next k), got {matvecs}")


@dataclass
class Context:
    """One measurement's inputs, shared by every column group.

    ``seed`` is the step's (``run_seed + step``, the solves' random starts); ``run_seed`` the
    run's (the block group's probes, the same at every step). ``op``, ``loss``, ``g``, ``Hg``,
    ``eig`` are the training Hessian's (top ``2k`` pairs of ``eig``; ``Hg`` and ``eig`` are
    ``None`` when no group uses them: ``Tracker.solves_hessian``); ``previous`` is the
    Hessian's basis of the last measurement (``None`` at the first). ``cost`` collects
    ``{bucket: [products, seconds]}`` for the cost groups; ``shared`` holds what one group
    computes for a later one (the GGN operator and its top-k).
    """

    model: torch.nn.Module
    loss_fn: Callable
    train: Any
    test: Any
    step: int
    seed: int
    k: int
    operators: OperatorSettings
    solver: SolverSettings
    warm: WarmStart
    classification: bool
    op: HessianOperator
    loss: float
    g: torch.Tensor
    Hg: torch.Tensor | None
    eig: Eigenpairs | None
    previous: torch.Tensor | None = None
    run_seed: int = 0
    started: float = field(default_factory=time.perf_counter)  # when the measurement began
    cost: dict[str, list[float]] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> Any:
        """The inner product of ``g``, ``Hg`` and the eigenvectors: the operator's
        ``vector_space`` when its vectors are shards over ranks (an FSDP2 model's), else
        ``None`` (plain local tensors)."""
        return getattr(self.op, "vector_space", None)

    def charge(self, bucket: str, products: int, seconds: float) -> None:
        """Add ``products`` and ``seconds`` to the cost ``bucket``."""
        spent = self.cost.setdefault(bucket, [0, 0.0])
        spent[0] += products
        spent[1] += seconds


@runtime_checkable
class ColumnGroup(Protocol):
    """A group of columns: ``name``, ``names()`` (its columns, in order), ``measure(context)
    -> {column: value}`` and its state. A group with ``deferred = True`` is measured after all
    others (the cost columns); ``bucket`` names the cost bucket its products and seconds go to
    (``None``: not counted apart)."""

    name: str

    def names(self) -> list[str]: ...

    def measure(self, context: Context) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def measure_groups(groups: list[Any], context: Context) -> dict[str, float]:
    """Every group's columns at ``context``: the groups in order, the deferred ones last; the
    seconds of a group with a ``bucket`` go to that cost bucket."""
    row: dict[str, float] = {}
    for group in [g for g in groups if not getattr(g, "deferred", False)] + \
            [g for g in groups if getattr(g, "deferred", False)]:
        started = time.perf_counter()
        row.update(group.measure(context))
        bucket = getattr(group, "bucket", None)
        if bucket is not None:
            context.charge(bucket, 0, time.perf_counter() - started)
    return row
