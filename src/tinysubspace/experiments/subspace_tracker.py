"""Track the tiny subspace inside anyone's training loop (docs/own-loop.md).

::

    tracker = ts.SubspaceTracker(model, loss_fn, data, k=10, schedule="paper", out="runs/mine")
    for step in range(steps):
        row = tracker.on_step(step)      # measures when the schedule says so, before the update
        ...                              # the user's own step
    tracker.close()
    run = ts.load_run("runs/mine")       # the CLI's run folder format

At a measured step the whole data set gives the loss, the gradient ``g``, the top ``2k``
eigenpairs of the Hessian (warm-started from the previous measurement) and from them ``f_top``
(eq. 2), ``overlap(g, Hg)`` (eq. 3), ``c_i²`` (eq. 12) and the overlaps (eq. 5) with the bases
kept at anchor steps — the same :class:`~tinysubspace.experiments.tracker.Tracker` as the CLI.
Each row also carries its cost (``cost/seconds``, ``cost/matvecs``) and ``cost/overhead``, the
seconds spent measuring over the wall seconds since the tracker was built; ``budget=b`` skips
due steps that would push it over ``b`` (:class:`~tinysubspace.experiments.schedules.Budget`).

A measurement leaves the model (parameters, buffers, flags, ``p.grad``), the optimizer, the
global random streams and the data order exactly as they were. Under ``torchrun`` every rank
passes its shard and calls :meth:`on_step` at the same steps; rank 0 writes. A model sharded
with FSDP2 (``fully_shard``) is measured on sharded vectors and gives the same rows
(:mod:`~tinysubspace.experiments.tracker_sharded`: what is gathered, what is refused).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.data import chunk_size_argument
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.groups import BlocksGroup, OverheadGroup, SubsetGroup
from tinysubspace.experiments.loggers import Logger, build_loggers
from tinysubspace.experiments.measurement import (
    MeasurementSettings,
    OperatorSettings,
    SolverSettings,
)
from tinysubspace.experiments.schedules import Budget, as_schedule
from tinysubspace.experiments.tracker import (
    DTYPES,
    Tracker,
    block_config,
    preserved_state,
    standard_groups,
)
from tinysubspace.experiments.tracker_curvature import (
    BUCKET,
    check_curvature_options,
    curvature_groups,
)
from tinysubspace.experiments.tracker_data import check_steps, measurement_dtype
from tinysubspace.experiments.tracker_folder import (
    STATE_FILE,
    open_run_folder,
    run_config,
    run_meta,
)
from tinysubspace.experiments.tracker_inputs import prepare_inputs
from tinysubspace.experiments.tracker_sharded import (
    check_sharded_data,
    check_sharded_options,
    is_sharded_model,
)
from tinysubspace.runtime import distributed as tsdist

__all__ = ["PAPER_ANCHORS", "SubspaceTracker"]

PAPER_ANCHORS = (0, 50, 100, 200, 400)  # t1 of Figs. 2 and 3 (the CLI's default)


class SubspaceTracker:
    """Measures the Hessian's top subspace during a training loop the caller owns.

    Args:
        model: the model being trained (read at each measurement, never changed).
        loss_fn: ``loss_fn(outputs, targets)``, the *mean* loss of a batch (for Hugging Face
            models ``lambda out, labels: out.loss``).
        data: the data to measure on: ``(X, Y)``, a list of batches, a ``DataLoader`` (measured
            through a sequential copy) or dict batches with ``"labels"``.
        k: top-k; the next k (eigenpairs k+1 … 2k) are measured too.
        schedule: ``"paper"``, an int (every n steps), a list of steps or ``fn(step) -> bool``.
        out: the run folder (``None``: nothing written; rows are returned only).
        loggers: ``"csv"`` (the run folder), ``"tensorboard"`` (``out/tensorboard``), callables
            ``fn(row, step)``. Default: ``("csv",)`` with ``out``, else none.
        tol: relative residual of the eigenpairs.
        tol_scale: what ``tol`` is relative to: ``"top"`` (``‖r_i‖ ≤ tol·|λ_1|``, default) or
            ``"pair"`` (``‖r_i‖ ≤ tol·|λ_i|``, ARPACK's); recorded in the run's config.
        dtype: measurement dtype (``torch.float64`` to measure a float32 model in double);
            ``None``: the parameters' dtype.
        subset: measure on a seeded, fixed subset of this many examples (recorded in the run).
        seed: seed of the subset and of the eigensolver's random start.
        budget: at most this fraction of the wall time spent measuring (``None``: no limit).
        test: optional test data (``test/...`` columns).
        anchors: steps whose bases the later overlaps compare with (they are measured like
            scheduled steps, also subject to the budget).
        save_vectors_at: steps whose eigenvectors are saved in ``out/eigenvectors``.
        mode: ``"eval"`` (dropout off, batch norm on running statistics) or ``"train"``.
        chunk_size: how many examples of an ``(X, Y)`` pair go into one pass (``None``: one
            chunk); ``batch_size`` is its old name (both: ``TypeError``).
        solver: ``"track"`` (warm-started), ``"cold"`` or ``"budget"`` (``budget_matvecs``
            products per measurement); check, check_every, pass_cost: the amortised multiplicity
            check and ``warm="auto"``'s measured pass cost (:class:`~tinysubspace.experiments.
            measurement.SolverSettings`; docs/own-loop.md).
        resume: continue the run in ``out`` (or start it if ``out`` holds none).
        check_subset: with ``subset``, compare once (at the first measurement) the subset's
            top-k with the full data's: columns ``subset/overlap_top`` (eq. 5) and
            ``subset/eig_1_full``.
        ggn, class_means, geometry, optimizer: columns beyond the Hessian's
            (:mod:`~tinysubspace.experiments.tracker_curvature`): the GGN's top-2k and its
            overlap with H's; the class-mean span's overlap; principal angles and displacement
            since the last measurement; the loop's optimizer's threshold, preconditioned top-k
            and update share.
        name: the run's name (default: the folder's name).
        classification: whether ``train/accuracy`` is defined (``None``: detected from the
            outputs: ``(n, C)`` scores and integer labels).
        distributed: as :class:`~tinysubspace.HessianOperator` (``None``: on under torchrun).
        hvp_method: the H·V strategy of every operator (``"auto"``, ``"loop"``, ``"batched"``,
            ``"jvp"``; :class:`~tinysubspace.HessianOperator`).
        groups: more column groups (:class:`~tinysubspace.experiments.measurement.
            ColumnGroup`), measured after the built-in ones, e.g.
            :class:`~tinysubspace.experiments.residuals.ResidualsGroup`.
        blocks, block_options: per-block columns ``block/NAME/eig_1``, ``block/NAME/trace`` …
            (``"none"``, ``"auto"``, ``"layers"``, ``"types"``; :func:`.tracker.block_config`).

    Raises:
        ValueError: a loss that is not a scalar mean, data on another device than the model, a
            bad schedule, budget or subset, an ``out`` that holds another run (or, with
            ``resume``, a run of another configuration) — all before training starts.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, data: Any, k: int = 10,
                 schedule: Any = "paper", out: str | Path | None = None,
                 loggers: Sequence[Any] | None = None, tol: float = 1e-4,
                 dtype: torch.dtype | str | None = None, subset: int | None = None,
                 seed: int = 0, *, budget: float | None = None, test: Any = None,
                 anchors: Sequence[int] = PAPER_ANCHORS, save_vectors_at: Sequence[int] = (),
                 mode: str = "eval", chunk_size: int | None = None, solver: str = "track",
                 resume: bool = False, check_subset: bool = False, name: str | None = None,
                 tol_scale: str = "top",
                 ggn: bool = False, class_means: bool = False, geometry: bool = False,
                 optimizer: torch.optim.Optimizer | None = None,
                 classification: bool | None = None, distributed: bool | None = None,
                 blocks: str = "none", block_options: Mapping[str, int] | None = None,
                 hvp_method: str = "auto", groups: Sequence[Any] = (), check: str = "amortised",
                 check_every: int = 4, budget_matvecs: int | None = None,
                 pass_cost: str | None = None, batch_size: int | None = None) -> None:
        chunk_size = chunk_size_argument(chunk_size, batch_size)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.model, self.loss_fn, self.seed = model, loss_fn, int(seed)
        self.schedule, self.schedule_spec = as_schedule(schedule), schedule
        self.budget = None if budget is None else Budget(budget)
        self.anchors = check_steps("anchors", anchors)
        self.save_vectors_at = check_steps("save_vectors_at", save_vectors_at)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        shared = tsdist.is_distributed() if distributed is None else bool(distributed)
        operators = OperatorSettings(dtype=measurement_dtype(dtype, model), mode=mode,
                                     chunk_size=chunk_size, hvp_method=hvp_method,
                                     distributed=shared)
        if is_sharded_model(model):  # FSDP2: every rank checks its shard first (no hang)
            check_sharded_options(ggn=ggn, class_means=class_means, geometry=geometry,
                                  optimizer=optimizer, blocks=blocks, subset=subset,
                                  chunk_size=chunk_size, resume=resume)
            check_sharded_data(data)
            check_sharded_data(test, "test")
            operators.hessian(model, loss_fn, data)
        with preserved_state(model):  # iterating a DataLoader draws from torch's RNG
            inputs = prepare_inputs(model, loss_fn, data, test, subset=subset, seed=self.seed,
                                    check_subset=check_subset, classification=classification,
                                    shared=shared)
            self._probe, data, test = inputs.probe, inputs.train, inputs.test
            classes = check_curvature_options(model, loss_fn, *self._probe, ggn=ggn,
                                              class_means=class_means, optimizer=optimizer)
            if class_means and shared:
                classes = tsdist.broadcast_object(classes)  # C from rank 0 (it holds examples)
        self.total_examples, self.subset = inputs.total_examples, inputs.subset
        self.full_data, self.check_subset = inputs.full, inputs.check_subset
        classification = inputs.classification
        blocks = block_config(model, blocks, block_options)
        settings = MeasurementSettings(
            k, operators, SolverSettings(tol=tol, tol_scale=tol_scale, solver=solver, check=check,
                           check_every=check_every, budget_matvecs=budget_matvecs,
                           pass_cost=pass_cost), self.save_vectors_at)
        certified = settings.solver.reports_certificate
        self.engine = Tracker(settings, loss_fn, data, test, classification, groups=[
            *self._groups(k, test is not None, blocks, certified), *groups])
        self.blocks, self.extra_groups = blocks, [g.name for g in groups]
        self._curvature = {"ggn": ggn, "class_means": class_means, "geometry": geometry,
                           "classes": classes}
        for group in curvature_groups(k, optimizer=optimizer, **self._curvature):
            self.engine.add_group(group)
        self.is_main = not self.engine.distributed or tsdist.is_main()
        self.started = time.perf_counter()
        self.clock = {"spent": 0.0, "elapsed": 0.0, "last_cost": 0.0}
        self.last_step: int | None = None
        self.skipped = 0
        self.pending_trim = False
        self.out = None if out is None else Path(out)
        self.store = None
        if self.out is not None:
            self._open_run(name, resume)
        if loggers is None:
            loggers = ("csv",) if self.out is not None else ()
        self.loggers: list[Logger] = build_loggers(loggers, self.out, self.store,
                                                     self.columns) if self.is_main else []

    def _groups(self, k: int, test: bool, blocks: dict[str, Any], certified: bool) -> list[Any]:
        """The measurement's column groups, in the columns' order (the curvature options'
        groups are added after these)."""
        groups = standard_groups(k, sorted(self.anchors), test, certified)
        if blocks["blocks"] != "none":
            groups.append(BlocksGroup(self.model, blocks["blocks"], blocks.get("blocks_k", 1),
                                      blocks.get("blocks_steps", 20),
                                      blocks.get("blocks_probes", 4)))
        groups.append(OverheadGroup())
        return groups + ([SubsetGroup(self.full_data, self.seed)] if self.check_subset else [])

    @classmethod
    def from_config(cls, config: TrackerConfig, model: torch.nn.Module, loss_fn: Callable,
                    data: Any, steps: Sequence[int], **options: Any) -> SubspaceTracker:
        """A tracker as the CLI configures it (``tracker.*`` keys), measuring at ``steps``;
        ``options`` are further keywords (``test``, ``seed``, …)."""
        keywords = {"k": config.k, "tol": config.tol, "tol_scale": config.tol_scale,
                    "dtype": DTYPES.get(config.dtype, config.dtype), "anchors": config.anchors,
                    "save_vectors_at": config.save_vectors_at, "mode": config.mode,
                    "chunk_size": config.chunk_size, "solver": config.solver,
                    "blocks": config.blocks, "ggn": config.ggn, "check": config.check,
                    "check_every": config.check_every, "budget_matvecs": config.budget_matvecs,
                    "pass_cost": config.pass_cost,
                    "class_means": config.class_means, "geometry": config.geometry,
                    "block_options": {key: getattr(config, f"blocks_{key}")
                                      for key in ("k", "probes", "steps")}}
        return cls(model, loss_fn, data, schedule=list(steps), out=None, loggers=(),
                   **keywords, **options)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer=`` for a tracker built before its optimizer (the CLI's projected
        optimizers need the tracker first), once, before the first measurement (else
        ``ValueError``)."""
        if self.last_step is not None or any(g.name == "sharpness" for g in self.engine.groups):
            raise ValueError("track_optimizer must be called once, before the first measurement")
        if is_sharded_model(self.model):
            check_sharded_options(optimizer=optimizer)
        check_curvature_options(self.model, self.loss_fn, *self._probe, ggn=False,
                                class_means=False, optimizer=optimizer)
        engine = self.engine
        engine.groups = [g for g in engine.groups if getattr(g, "bucket", None) != BUCKET
                         and g.name != f"cost_{BUCKET}"]
        for group in curvature_groups(self.engine.k, optimizer=optimizer, **self._curvature):
            engine.add_group(group)

    @property
    def columns(self) -> list[str]:
        """Every column of this tracker's rows, in order."""
        return self.engine.columns()

    # ------------------------------------------------------------------ the loop
    @property
    def train(self) -> Any:
        """The data measured on (after ``subset``)."""
        return self.engine.train

    def operator(self, model: torch.nn.Module | None = None, data: Any = None):
        """The :class:`~tinysubspace.HessianOperator` a measurement uses (of ``model`` on
        ``data``, default: the tracked model on the measured data)."""
        return self.engine.operator(model or self.model, self.train if data is None else data)

    def due(self, step: int) -> bool:
        """Whether the schedule (or an anchor / save step) asks for a measurement at ``step``."""
        return bool(self.schedule(step)) or step in self.anchors or step in self.save_vectors_at

    def on_step(self, step: int, *, force: bool = False, epoch: float | None = None,
                extra: dict[str, float] | None = None) -> dict[str, float] | None:
        """Measure at ``step`` if due (and within the budget): returns the row, else ``None``.

        Call it before the update of ``step`` (step 0 measures the initialisation). ``force``
        measures whatever the schedule and budget say (e.g. the last step); a step already
        measured is not measured again. ``epoch`` and ``extra`` (scalars) are added to the row.

        Raises:
            ValueError: ``step`` is not a non-negative integer.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        for group in self.engine.groups:  # e.g. θ_t for the update share
            if hasattr(group, "observe"):
                group.observe(self.model, step)
        if self.pending_trim:
            self._trim(step)
        if step == self.last_step or not (force or self.due(step)):
            return None
        if self.budget is not None and not force:
            allowed = self.budget.allows(self.clock["spent"], self._elapsed(),
                                         self.clock["last_cost"])
            if self.engine.distributed:  # every rank follows rank 0's clock
                allowed = tsdist.broadcast_object(allowed)
            if not allowed:
                self.skipped += 1
                return None
        return self.measure(step, epoch=epoch, extra=extra)

    def measure(self, step: int, *, epoch: float | None = None,
                extra: dict[str, float] | None = None) -> dict[str, float]:
        """Measure at ``step`` now (no schedule, no budget) and log the row."""
        started = time.perf_counter()

        def overhead() -> float:
            return (self.clock["spent"] + time.perf_counter() - started) / max(
                self._elapsed(), 1e-12)

        m = self.engine.measure(self.model, step, seed=self.seed, shared={"overhead": overhead})
        row = m.row
        row["epoch"], row["wall_time"] = epoch, self._elapsed()
        row.update(extra or {})
        for logger in self.loggers:
            logger.write(row, step, m.vectors_to_save)
        if self.is_main and self.out is not None:
            self._save_state(step)
        cost = time.perf_counter() - started
        self.clock["spent"] += cost
        self.clock["last_cost"] = cost
        self.last_step = step
        return row

    def close(self, state: str = "finished", message: str = "") -> None:
        """Close the loggers and mark the run ``state`` in ``status.json``."""
        for logger in self.loggers:
            logger.close()
        self.loggers = []
        if self.store is not None:
            self.store.write_status(state, self.last_step or 0, message)

    def __enter__(self) -> SubspaceTracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close("finished" if kind is None else "stopped",
                   "" if kind is None else f"{kind.__name__}: {error}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Warm starts, the groups' states (anchor bases), clocks: save it with your checkpoint
        for a resume that reproduces the uninterrupted run."""
        return {**self.engine.state_dict(), "clock": {**self.clock, "elapsed": self._elapsed()},
                "last_step": self.last_step, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing entries start empty, as
        :meth:`Tracker.load_state_dict <tinysubspace.experiments.tracker.Tracker.
        load_state_dict>` says)."""
        self.engine.load_state_dict(state)
        self.clock = dict(state.get("clock") or {"spent": 0.0, "elapsed": 0.0, "last_cost": 0.0})
        self.started = time.perf_counter()
        self.last_step, self.skipped = state.get("last_step"), int(state.get("skipped", 0))

    def _elapsed(self) -> float:
        return self.clock["elapsed"] + time.perf_counter() - self.started

    def _trim(self, step: int) -> None:
        """First call after ``resume``: forget what was measured at ``step`` and later."""
        self.pending_trim = False
        if self.store is not None:
            self.store.metrics.keep(lambda s: s < step)
        self.engine.forget_from(step)
        if self.last_step is not None and self.last_step >= step:
            self.last_step = None

    # ------------------------------------------------------------------ run folder
    def _open_run(self, name: str | None, resume: bool) -> None:
        from tinysubspace.results.store import RunStore

        config = json.loads(json.dumps(run_config(self, name), default=str))
        config["meta"] = run_meta(next(self.model.parameters()).device)
        store = RunStore(self.out, self.columns) if self.is_main else None
        state = tsdist.run_on_main(lambda: open_run_folder(store, config, resume))
        if self.is_main:
            self.store = store
        if state is not None:
            self.load_state_dict(state)
            self.pending_trim = True

    def _save_state(self, step: int) -> None:
        from tinysubspace.results.store import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save({**self.state_dict(), "step": step}, buffer)
        atomic_write_bytes(self.out / STATE_FILE, buffer.getvalue())

