"""The training loop: SGD or Adam on mini-batches, a tracker measuring on the full data set, a
run store that survives crashes.

``run_experiment(config, out)`` trains ``config.train.steps`` steps. At every scheduled step it
measures (before that step's update, so step 0 is the initialisation); at every step it records
the mini-batch ``overlap(g, Hg)`` (one extra Hessian-vector product, Table 1). A checkpoint is
written atomically every ``train.checkpoint_every`` steps; ``resume=True`` continues from it and
reproduces the numbers of an uninterrupted run.

Under ``torchrun`` (``torch.distributed`` with several processes) every rank runs this loop: each
measures on its shard of the training set (the tracker's operators all-reduce), each computes its
part of every global mini-batch and the parts' gradients (and ``H g``) are averaged with their
sizes, so all ranks take the single-process step; only rank 0 writes the run folder
(docs/distributed.md).
"""

from __future__ import annotations

import functools
import json
import math
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.data import call_model
from tinysubspace.curvature.hessian import NonFiniteError
from tinysubspace.experiments.build import (
    Problem,
    batch_indices,
    build_optimizer,
    build_problem,
    epochs_of,
    with_steps_from_epochs,
)
from tinysubspace.experiments.config import RENAMED_KEYS, ExperimentConfig, config_to_dict
from tinysubspace.experiments.experiment_groups import (
    experiment_groups,
    experiment_steps,
    experiment_tracker,
)
from tinysubspace.experiments.full_overlap import FullOverlap
from tinysubspace.experiments.health import RunHealth, guarded
from tinysubspace.experiments.loggers import DeferredLogger, Logger, RunStoreLogger
from tinysubspace.experiments.progress import Progress
from tinysubspace.experiments.subspace_tracker import SubspaceTracker
from tinysubspace.results.store import RunStore
from tinysubspace.runtime import distributed as tsdist

__all__ = ["RunOutcome", "minibatch_step", "run_experiment"]

RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout masks from seed + r * stride


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended."""

    path: Path
    state: str  # finished | diverged | stopped | interrupted (Ctrl-C) | failed (a write failed)
    step: int
    message: str = ""


def run_meta(config: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    import numpy

    from tinysubspace import __version__

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": numpy.__version__, "tinysubspace": __version__},
            "seed": config.train.seed, "device": str(device), "host": socket.gethostname(),
            "world_size": tsdist.world_size(), "threads": torch.get_num_threads(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def minibatch_step(model: torch.nn.Module, loss_fn: Callable, inputs: Any, targets: Any,
                   with_overlap: bool, average: Callable | None = None) -> tuple[float, float]:
    """Forward/backward on one mini-batch, leaving the gradient in ``p.grad``.

    With ``with_overlap`` the gradient graph is kept for one Hessian-vector product and the
    mini-batch ``overlap(g, H g)`` (eq. 3) is returned (NaN otherwise, or if ``g = 0``).

    ``average`` (under ``torch.distributed``): ``inputs, targets`` are this rank's part of the
    mini-batch (possibly empty) and ``average(tensors) -> tensors`` turns means over the part
    into means over the whole mini-batch (:func:`tinysubspace.runtime.distributed.weighted_mean`
    with
    the part's size), so the loss, ``g`` and ``H g`` are those of the whole mini-batch on every
    rank (a parameter the loss does not reach gets a zero gradient instead of ``None``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if average is not None:
        return _shared_minibatch_step(params, model, loss_fn, inputs, targets, with_overlap,
                                      average)
    loss = loss_fn(call_model(model, inputs), targets)
    if not with_overlap:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        overlap = math.nan
    else:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                 grad_outputs=[grads[i].detach() for i in live],
                                 allow_unused=True) if live else []
        g_dot_hg = sum(float((grads[i].detach() * h).sum()) for i, h in zip(live, hv, strict=True)
                       if h is not None)
        g_norm = math.sqrt(sum(float(g.detach().square().sum()) for g in grads if g is not None))
        hg_norm = math.sqrt(sum(float(h.square().sum()) for h in hv if h is not None))
        overlap = g_dot_hg / (g_norm * hg_norm) if g_norm > 0 and hg_norm > 0 else math.nan
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.detach()
    return float(loss.detach()), overlap


def _shared_minibatch_step(params: list[torch.Tensor], model: torch.nn.Module, loss_fn: Callable,
                           inputs: Any, targets: Any, with_overlap: bool,
                           average: Callable) -> tuple[float, float]:
    """:func:`minibatch_step` on this rank's part, averaged over the parts of all ranks."""
    if len(targets) == 0:  # an empty part: nothing to add but its (zero) weight
        loss, grads = params[0].new_zeros(()), [None] * len(params)
    else:
        loss = loss_fn(call_model(model, inputs), targets)
        grads = list(torch.autograd.grad(loss, params, create_graph=with_overlap,
                                         allow_unused=True))
    mean_loss, *g = average([loss.detach()] + [torch.zeros_like(p) if d is None else d.detach()
                                               for p, d in zip(params, grads, strict=True)])
    overlap = math.nan
    if with_overlap:
        live = [i for i, d in enumerate(grads) if d is not None and d.requires_grad]
        hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                 grad_outputs=[g[i] for i in live],
                                 allow_unused=True) if live else []
        local = [torch.zeros_like(p) for p in params]
        for i, h in zip(live, hv, strict=True):
            local[i] = local[i] if h is None else h
        hg = average(local)
        g_dot_hg = sum(float((a * b).sum()) for a, b in zip(g, hg, strict=True))
        g_norm = math.sqrt(sum(float(a.square().sum()) for a in g))
        hg_norm = math.sqrt(sum(float(b.square().sum()) for b in hg))
        overlap = g_dot_hg / (g_norm * hg_norm) if g_norm > 0 and hg_norm > 0 else math.nan
    for p, d in zip(params, g, strict=True):
        p.grad = d
    return float(mean_loss), overlap


class _Loop:
    """One run's mutable pieces, so that the loop body stays short."""

    def __init__(self, config: ExperimentConfig, problem: Problem, store: RunStore | None,
                 progress: Progress | None) -> None:
        self.config, self.problem, self.store, self.progress = config, problem, store, progress
        self.distributed = tsdist.is_distributed()
        self.keeps_files = store is not None  # on every rank (only rank 0 has the store)
        self.train_xy = problem.tensors("train")  # the whole set: mini-batches index into it
        steps = experiment_steps(config, config.train.steps)
        self.tracker = SubspaceTracker.from_config(  # the one measuring code path (issue 13)
            experiment_tracker(config), problem.model, problem.loss_fn,
            tsdist.shard(self.train_xy), steps,
            test=tsdist.shard(problem.tensors("test")), seed=config.train.seed,
            classification=problem.classification, distributed=self.distributed)
        context = {"problem": problem, "tracker": self.tracker, "seed": config.train.seed}
        self.optimizer = build_optimizer(config.optim, problem.model, context)
        if config.tracker.sharpness:  # issue 15: threshold, preconditioned top-k, update share
            self.tracker.track_optimizer(self.optimizer)
        self.metric_columns = [*(c for c in self.tracker.columns if c != "cost/overhead"),
                               "optim/matvecs"]
        groups = experiment_groups(config, problem, self.optimizer)
        if groups is not None:  # tracker.measure: an experiment's groups alone, their schema
            self.tracker.engine.groups = groups
            self.metric_columns = ["step", "wall_time", *self.tracker.columns[3:]]
        self.deferred = [g for g in self.tracker.engine.groups if hasattr(g, "after_update")]
        self.schedule = set(steps)
        self.pending_minibatch: list[dict[str, float]] = []
        self.health = RunHealth(config.train)  # divergence check; the step the loop is at
        self.full_overlap = FullOverlap(config, problem.loss_fn, tsdist.shard(self.train_xy),
                                        tsdist.shard(problem.tensors("test")),
                                        self.distributed)  # Table 1: tracker.overlap_last
        self.started = time.perf_counter()

    def attach_loggers(self, loggers: list[Logger]) -> None:
        """Where the tracker's rows go; with deferred columns (a group's ``after_update``) each
        row is held until the update after its measurement (:meth:`release`)."""
        self.tracker.loggers = [DeferredLogger(loggers)] if self.deferred else loggers

    def release(self, update_taken: bool) -> None:
        """Write a held row: with its deferred columns if the update after it was taken (each
        group forgets its measurement either way)."""
        columns = [group.after_update(self.problem.model) for group in self.deferred]
        if (held := self._held()) is not None:
            held.release({k: v for c in columns for k, v in c.items()} if update_taken else {})

    def _held(self) -> DeferredLogger | None:
        return next((lg for lg in self.tracker.loggers if isinstance(lg, DeferredLogger)), None)

    # ---------------------------------------------------------------- state
    def checkpoint(self, step: int) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        every_rank = tsdist.gather_objects(rng) if self.distributed else None  # collective
        if self.store is None:
            return
        self.flush_minibatch()
        state = {"step": step, "model": self.problem.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "tracker": self.tracker.state_dict(), "rng": rng,
                 "health": self.health.state_dict(),
                 "config": json.loads(json.dumps(config_to_dict(self.config), default=str))}
        if self._held() is not None:  # a measured row waiting for its step's update
            state["held_row"] = self._held().held
        if every_rank is not None:
            state["rng_ranks"] = every_rank
        self.store.save_checkpoint(state)

    def restore(self, checkpoint: dict[str, Any]) -> int:
        self.problem.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.tracker.load_state_dict(checkpoint["tracker"])
        self.health.load_state_dict(checkpoint.get("health", {}))
        held = checkpoint.get("held_row")
        if self._held() is not None and held is not None:  # written again after its update
            self._held().held = held
            if self.store is not None:
                self.store.metrics.keep(lambda s: s < held[1])
        rng = checkpoint["rng"]
        ranks = checkpoint.get("rng_ranks") or [rng]
        if len(ranks) == tsdist.world_size():
            rng = ranks[tsdist.rank()]
        elif tsdist.rank() > 0:  # another number of processes: fresh streams for ranks > 0
            rng = {"cpu": torch.Generator().manual_seed(
                self.config.train.seed + RANK_SEED_STRIDE * tsdist.rank()
                + int(checkpoint["step"])).get_state()}
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(checkpoint["step"])

    def flush_minibatch(self) -> None:
        if self.store is not None:
            self.store.append_minibatch(self.pending_minibatch)
        self.pending_minibatch = []

    # ----------------------------------------------------------------- work
    def measure(self, step: int) -> dict[str, float] | None:
        """The tracker's ``on_step``: a measurement if ``step`` is scheduled and not measured
        yet (rows and eigenvectors reach the store through the tracker's
        :class:`RunStoreLogger`)."""
        row = self.tracker.on_step(  # optim/matvecs: products spent by a projected optimizer
            step, epoch=epochs_of(step, len(self.problem.train), self.config.optim.batch_size),
            extra={"optim/matvecs": getattr(self.optimizer, "matvecs", 0)})
        if row is not None and self.store is not None:
            self.flush_minibatch()
        return row

    def save_spectrum(self) -> None:
        """The final Hessian's spectrum (``tracker.spectrum``): exact eigenvalues, or SLQ; and
        the top ``tracker.spectrum_top`` eigenvalues by Lanczos (Fig. 5)."""
        kind, top = self.config.tracker.spectrum, self.config.tracker.spectrum_top
        finals = [g for g in self.tracker.engine.groups if hasattr(g, "final_spectra")]
        if (kind == "none" and not top and not finals) or not self.keeps_files:
            return
        from tinysubspace.linalg.density import exact_spectrum, spectral_density
        from tinysubspace.results.spectrum import density_arrays

        op = self.tracker.operator(self.problem.model, self.tracker.train)  # collective
        arrays = {}
        for group in finals:  # e.g. the outliers group's H and G spectra
            arrays.update(group.final_spectra(self.problem.model, self.problem.loss_fn,
                                              self.tracker.train, self.tracker.engine.operators))
        if kind == "exact":
            arrays = {"eigenvalues": exact_spectrum(op).cpu().numpy()}
        elif kind == "slq":
            arrays = density_arrays(spectral_density(
                op, steps=self.config.tracker.spectrum_steps,
                probes=self.config.tracker.spectrum_probes, seed=self.config.train.seed))
        elif kind != "none":
            raise ValueError(f"tracker.spectrum must be none, exact or slq, got {kind!r}")
        if top:  # Fig. 5: "we only computed the top 1000 eigenvalues"
            from tinysubspace.linalg.lanczos import top_eigenpairs

            eig = top_eigenpairs(op, top, tol=self.config.tracker.tol, seed=self.config.train.seed,
                                 tol_scale=self.config.tracker.tol_scale)
            arrays["top_eigenvalues"] = eig.values.cpu().numpy()
        if self.store is not None:
            self.store.save_spectrum(arrays)

    def train_step(self, step: int) -> float:
        cfg = self.config
        X, Y = self.train_xy
        if cfg.optim.batch_size >= len(X):  # full batch: the data set in its order
            index = torch.arange(len(X), device=X.device)
        else:
            index = batch_indices(len(X), cfg.optim.batch_size, cfg.train.seed, step).to(X.device)
        every = cfg.tracker.minibatch_every
        with_overlap = every > 0 and step % every == 0
        model = self.problem.model
        self.full_overlap.record(model, step, self.store)  # θ_t, before the update
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        average = None
        if self.distributed:  # this rank's part of the global mini-batch
            index = index[tsdist.shard_slice(len(index))]
            average = functools.partial(tsdist.weighted_mean, weight=len(index))
        loss, overlap = minibatch_step(model, self.problem.loss_fn, X[index], Y[index],
                                       with_overlap, average)
        if not math.isfinite(loss):
            return loss
        self.optimizer.step()
        tsdist.average_buffers(model, len(index))
        if with_overlap:
            self.pending_minibatch.append({"step": step, "minibatch/loss": loss,
                                           "minibatch/overlap_g_Hg": overlap})
        return loss


def run_experiment(config: ExperimentConfig, out: str | Path | None, *, resume: bool = False,
                   data_root: str | None = None, progress: Progress | None = None,
                   stop_after: int | None = None, loggers: list[Logger] | None = None
                   ) -> RunOutcome:
    """Train and track one experiment, storing everything in the run folder ``out``.

    Args:
        config: the resolved experiment.
        out: the run folder (``None``: keep nothing on disk, e.g. for a quick look).
        resume: continue the run in ``out`` from its last checkpoint.
        data_root: folder with data files when ``config.data.root`` is unset.
        progress: where to report progress (``None``: silent).
        stop_after: stop as if killed (no final checkpoint) after this many training steps —
            for tests of ``resume``.
        loggers: more places for the rows (e.g. a
            :class:`~tinysubspace.experiments.loggers.CallableLogger`), besides the run folder.

    Returns:
        :class:`RunOutcome`: ``finished``, or ``diverged`` with the step and message (all
        measurements made so far are kept).
    """
    problem = build_problem(config, data_root)
    config = with_steps_from_epochs(config, len(problem.train))
    resolved = {**config_to_dict(config), "meta": run_meta(config, problem.device)}
    progress = progress if tsdist.is_main() else None
    with torch.random.fork_rng(devices=_cuda_devices(problem.device)):
        torch.manual_seed(config.train.seed + RANK_SEED_STRIDE * tsdist.rank())
        loop = _Loop(config, problem, None, progress)
        start, sinks = 0, list(loggers or [])
        if out is not None:  # rank 0 owns the run folder; every rank gets the checkpoint
            loop.keeps_files = True
            if tsdist.is_main():
                loop.store = RunStore(out, loop.metric_columns)
                sinks.insert(0, RunStoreLogger(loop.store, loop.metric_columns))
        loop.attach_loggers(sinks)
        if out is not None:
            checkpoint = tsdist.run_on_main(
                lambda: loop.store.resume(resolved, RENAMED_KEYS) if resume
                else loop.store.create(resolved))
            if checkpoint is not None:
                start = loop.restore(checkpoint)
        path = Path(out) if out else None
        outcome = guarded(lambda: _train(loop, start, stop_after, path),
                          loop.health, path, functools.partial(RunOutcome, path or Path()))
        if outcome.state != "stopped":  # (a simulated crash writes nothing more)
            loop.release(update_taken=False)  # the last measurement has no update after it
    if loop.store is not None:  # best effort: a full disk must not hide why the run stopped
        loop.store.write_status(outcome.state, outcome.step, outcome.message, best_effort=True)
    if progress is not None:
        progress.close()
    return outcome


def _train(loop: _Loop, start: int, stop_after: int | None, path: Path | None) -> RunOutcome:
    cfg = loop.config
    total = cfg.train.steps
    if loop.progress is not None:
        loop.progress.start(total, start, loop.schedule)
    for step in range(start, total + 1):
        loop.health.step = step
        try:  # at the tracker's schedule; the step a resumed run starts at was measured
            row = loop.measure(step)
        except NonFiniteError as error:
            return _diverged(loop, path, step, f"non-finite measurement at step {step}: {error}")
        if row is not None:
            if (why := loop.health.observe(row)) is not None:
                return _diverged(loop, path, step, why)
            if loop.progress is not None:
                loop.progress.measured(row)
        if step > start and step % cfg.train.checkpoint_every == 0:
            loop.checkpoint(step)
        if step == total:
            break
        if stop_after is not None and step - start >= stop_after:  # a crash, for tests
            loop.flush_minibatch()
            return RunOutcome(path or Path(), "stopped", step)
        loss = loop.train_step(step)
        loop.release(update_taken=math.isfinite(loss))  # the deferred columns of step's row
        if not math.isfinite(loss):
            return _diverged(loop, path, step, f"the training loss became {loss} at step {step} "
                             "(diverged); lower optim.lr. Measurements so far are kept.")
        if loop.progress is not None:
            loop.progress.step(step + 1, loss)
    loop.checkpoint(total)
    loop.save_spectrum()
    return RunOutcome(path or Path(), "finished", total)


def _diverged(loop: _Loop, path: Path | None, step: int, message: str) -> RunOutcome:
    loop.flush_minibatch()
    return RunOutcome(path or Path(), "diverged", step, message)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
