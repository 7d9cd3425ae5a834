"""The training loop: SGD or Adam on mini-batches, a tracker measuring on the full data set, a
run store that survives crashes.

``run_experiment(config, out)`` trains ``config.train.steps`` steps. At every scheduled step it
measures (before that step's update, so step 0 is the initialisation); at every step it records
the mini-batch ``overlap(g, Hg)`` (one extra Hessian-vector product, Table 1). A checkpoint is
written atomically every ``train.checkpoint_every`` steps; ``resume=True`` continues from it and
reproduces the numbers of an uninterrupted run.
"""

from __future__ import annotations

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

from .batches import call_model
from .config import ExperimentConfig, config_to_dict
from .experiment import Problem, batch_indices, build_optimizer, build_problem, epochs_of
from .hessian import NonFiniteError
from .progress import Progress
from .store import RunStore
from .tracker import Tracker, measurement_steps

__all__ = ["RunOutcome", "minibatch_step", "run_experiment"]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended."""

    path: Path
    state: str  # finished | diverged | stopped
    step: int
    message: str = ""


def run_meta(config: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    import numpy

    from . import __version__

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": numpy.__version__, "tinysubspace": __version__},
            "seed": config.train.seed, "device": str(device), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def minibatch_step(model: torch.nn.Module, loss_fn: Callable, inputs: Any, targets: Any,
                   with_overlap: bool) -> tuple[float, float]:
    """Forward/backward on one mini-batch, leaving the gradient in ``p.grad``.

    With ``with_overlap`` the gradient graph is kept for one Hessian-vector product and the
    mini-batch ``overlap(g, H g)`` (eq. 3) is returned (NaN otherwise, or if ``g = 0``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
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


class _Loop:
    """One run's mutable pieces, so that the loop body stays short."""

    def __init__(self, config: ExperimentConfig, problem: Problem, store: RunStore | None,
                 progress: Progress | None) -> None:
        self.config, self.problem, self.store, self.progress = config, problem, store, progress
        self.train_xy = problem.tensors("train")
        self.tracker = Tracker(config.tracker, problem.loss_fn, self.train_xy,
                               problem.tensors("test"), problem.classification)
        context = {"problem": problem, "tracker": self.tracker}
        self.optimizer = build_optimizer(config.optim, problem.model, context)
        self.schedule = set(measurement_steps(config.tracker, config.train.steps))
        self.pending_minibatch: list[dict[str, float]] = []
        self.started = time.perf_counter()

    # ---------------------------------------------------------------- state
    def checkpoint(self, step: int) -> None:
        if self.store is None:
            return
        self.flush_minibatch()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        self.store.save_checkpoint({"step": step, "model": self.problem.model.state_dict(),
                                    "optimizer": self.optimizer.state_dict(),
                                    "tracker": self.tracker.state_dict(), "rng": rng})

    def restore(self, checkpoint: dict[str, Any]) -> int:
        self.problem.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.tracker.load_state_dict(checkpoint["tracker"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        return int(checkpoint["step"])

    def flush_minibatch(self) -> None:
        if self.store is not None:
            self.store.append_minibatch(self.pending_minibatch)
        self.pending_minibatch = []

    # ----------------------------------------------------------------- work
    def measure(self, step: int) -> dict[str, float]:
        m = self.tracker.measure(self.problem.model, step, seed=self.config.train.seed)
        m.row["epoch"] = epochs_of(step, len(self.problem.train), self.config.optim.batch_size)
        m.row["wall_time"] = time.perf_counter() - self.started
        if self.store is not None:
            self.store.append_metrics(m.row)
            if m.vectors_to_save is not None:
                self.store.save_eigenvectors(step, m.vectors_to_save)
            self.flush_minibatch()
        return m.row

    def save_spectrum(self) -> None:
        """The final Hessian's spectrum (``tracker.spectrum``): exact eigenvalues, or SLQ."""
        kind = self.config.tracker.spectrum
        if kind == "none" or self.store is None:
            return
        from .density import exact_spectrum, spectral_density

        op = self.tracker.operator(self.problem.model, self.train_xy)
        if kind == "exact":
            self.store.save_spectrum({"eigenvalues": exact_spectrum(op).cpu().numpy()})
        elif kind == "slq":
            density = spectral_density(op, steps=self.config.tracker.spectrum_steps,
                                       probes=self.config.tracker.spectrum_probes,
                                       seed=self.config.train.seed)
            self.store.save_spectrum(density.to_arrays())
        else:
            raise ValueError(f"tracker.spectrum must be none, exact or slq, got {kind!r}")

    def train_step(self, step: int) -> float:
        cfg = self.config
        X, Y = self.train_xy
        index = batch_indices(len(X), cfg.optim.batch_size, cfg.train.seed, step).to(X.device)
        every = cfg.tracker.minibatch_every
        with_overlap = every > 0 and step % every == 0
        model = self.problem.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, overlap = minibatch_step(model, self.problem.loss_fn, X[index], Y[index],
                                       with_overlap)
        if not math.isfinite(loss):
            return loss
        self.optimizer.step()
        if with_overlap:
            self.pending_minibatch.append({"step": step, "minibatch/loss": loss,
                                           "minibatch/overlap_g_Hg": overlap})
        return loss


def run_experiment(config: ExperimentConfig, out: str | Path | None, *, resume: bool = False,
                   data_root: str | None = None, progress: Progress | None = None,
                   stop_after: int | None = None) -> RunOutcome:
    """Train and track one experiment, storing everything in the run folder ``out``.

    Args:
        config: the resolved experiment.
        out: the run folder (``None``: keep nothing on disk, e.g. for a quick look).
        resume: continue the run in ``out`` from its last checkpoint.
        data_root: folder with data files when ``config.data.root`` is unset.
        progress: where to report progress (``None``: silent).
        stop_after: stop as if killed (no final checkpoint) after this many training steps —
            for tests of ``resume``.

    Returns:
        :class:`RunOutcome`: ``finished``, or ``diverged`` with the step and message (all
        measurements made so far are kept).
    """
    problem = build_problem(config, data_root)
    resolved = {**config_to_dict(config), "meta": run_meta(config, problem.device)}
    with torch.random.fork_rng(devices=_cuda_devices(problem.device)):
        torch.manual_seed(config.train.seed)
        loop = _Loop(config, problem, None, progress)
        start, skip_measure = 0, False
        if out is not None:
            loop.store = RunStore(out, loop.tracker.columns())
            checkpoint = loop.store.resume(resolved) if resume else loop.store.create(resolved)
            if checkpoint is not None:
                start, skip_measure = loop.restore(checkpoint), True
        outcome = _train(loop, start, skip_measure, stop_after, Path(out) if out else None)
    if loop.store is not None:
        loop.store.write_status(outcome.state, outcome.step, outcome.message)
    if progress is not None:
        progress.close()
    return outcome


def _train(loop: _Loop, start: int, skip_measure: bool, stop_after: int | None,
           path: Path | None) -> RunOutcome:
    cfg = loop.config
    total = cfg.train.steps
    if loop.progress is not None:
        loop.progress.start(total, start)
    for step in range(start, total + 1):
        if step in loop.schedule and not (skip_measure and step == start):
            try:
                row = loop.measure(step)
            except NonFiniteError as error:
                return _diverged(loop, path, step,
                                 f"non-finite measurement at step {step}: {error}")
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
