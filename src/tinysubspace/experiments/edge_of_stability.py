"""Edge-of-stability runs: the sharpness every few steps against the optimizer's threshold.

A small driver of its own (it measures only what an edge-of-stability figure needs, cheaply, and
the share of the step taken *after* each measurement, which the tracker's groups cannot see;
operators, solver settings, warm starts, accuracy and schedule are the tracker's:
:mod:`~tinysubspace.experiments.measurement`): train as ``config`` says (full batch when
``optim.batch_size ≥ n``) and at every step of :func:`eos_steps` measure on the whole
training set

* ``sharpness/lambda_1 … lambda_k``: the top ``k = tracker.k`` eigenvalues of the Hessian
  (warm-started, :func:`tinysubspace.optim.stability.sharpness`, to ``tracker.tol``), with
  ``sharpness/threshold`` = ``2/η`` (SGD/GD; NaN for adaptive optimizers) and their ratio;
* for Adam, AdamW, RMSprop, Adagrad: ``preconditioned/lambda_i`` of ``P^{-1/2} H P^{-1/2}``
  (``P`` the optimizer's diagonal with the first-moment correction, Cohen et al. 2022's
  ``P_t``) and ``preconditioned/threshold`` (``38/η`` for Adam with ``β₁ = 0.9``);
* ``…/step_share``: the share of the step taken right after the measurement in the measured top
  ``k`` subspace (eq. 2 applied to the step: ``Δθ`` for GD, ``P^{1/2} Δθ`` for the
  preconditioned operator).

Rows go to ``metrics.csv`` of a run folder (:class:`~tinysubspace.results.store.RunStore`);
there is no resume (runs are minutes). ``python -m tinysubspace.experiments.edge_of_stability
eos-gd-fc-digits --out runs/eos-gd`` runs one from the catalog.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.hessian import NonFiniteError
from tinysubspace.curvature.preconditioned import PreconditionedOperator
from tinysubspace.experiments.build import batch_indices, build_optimizer, build_problem
from tinysubspace.experiments.config import ExperimentConfig, config_to_dict
from tinysubspace.experiments.groups import accuracy
from tinysubspace.experiments.schedules import measurement_steps
from tinysubspace.experiments.tracker import settings_of
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.warm_state import WarmStart
from tinysubspace.metrics import top_fraction
from tinysubspace.optim.stability import sharpness_threshold, stability_row
from tinysubspace.results.store import RunStore

__all__ = ["ADAPTIVE", "eos_columns", "eos_steps", "run_edge_of_stability", "train_step"]

ADAPTIVE = ("Adam", "AdamW", "RMSprop", "Adagrad")


def eos_steps(tracker: Any, total: int) -> list[int]:
    """Every ``tracker.dense_every`` steps up to ``tracker.dense_until``, then every
    ``tracker.sparse_every``, plus ``tracker.extra_steps`` and the last step: the tracker's
    :func:`~tinysubspace.experiments.schedules.measurement_steps` without anchors and saved
    vectors."""
    return measurement_steps(dataclasses.replace(tracker, anchors=(), save_vectors_at=()), total)


def eos_columns(k: int, preconditioned: bool) -> list[str]:
    """The ``metrics.csv`` columns of an edge-of-stability run."""
    cols = ["step", "wall_time", "train/loss", "train/accuracy", "train/grad_norm"]
    prefixes = ["sharpness"] + (["preconditioned"] if preconditioned else [])
    for prefix in prefixes:
        cols += [f"{prefix}/lambda_{i}" for i in range(1, k + 1)]
        cols += [f"{prefix}/{name}" for name in ("threshold", "ratio", "residual",
                                                 "step_share", "matvecs")]
    return cols


class _Measurer:
    """One run's warm starts and operators (so that the loop stays short)."""

    def __init__(self, config: ExperimentConfig, problem: Any,
                 optimizer: torch.optim.Optimizer) -> None:
        self.config, self.problem, self.optimizer = config, problem, optimizer
        self.adaptive = type(optimizer).__name__ in ADAPTIVE
        self.threshold = sharpness_threshold(optimizer)
        self.settings = settings_of(config.tracker, distributed=False)
        self.warm = WarmStart()

    def measure(self, step: int) -> tuple[dict[str, float], dict[str, tuple[Any, Eigenpairs]]]:
        """The row at ``step`` and, per prefix, (operator, eigenpairs) for the step share."""
        cfg, model = self.config.tracker, self.problem.model
        X, Y = self.problem.tensors("train")
        H = self.settings.operators.hessian(model, self.problem.loss_fn, (X, Y))
        loss, g = H.loss_and_gradient()
        evaluation = dataclasses.replace(self.settings.operators, mode="eval")
        row = {"step": step, "train/loss": loss, "train/grad_norm": float(g.norm()),
               "train/accuracy": accuracy(model, (X, Y), evaluation,
                                          self.problem.classification)}
        operators: dict[str, Any] = {"sharpness": H}
        if self.adaptive and self.optimizer.state:
            operators["preconditioned"] = PreconditionedOperator(H, self.optimizer,
                                                                 first_moment_correction=True)
        solved = {}
        for prefix, op in operators.items():
            before = op.matvecs
            eig = self.settings.solver.solve(op, cfg.k, self.warm, prefix,
                                             self.config.train.seed + step, start="subspace")
            threshold = self.threshold if (prefix == "preconditioned") == self.adaptive \
                else math.nan
            row.update(stability_row(eig, threshold, prefix))
            row[f"{prefix}/matvecs"] = op.matvecs - before
            solved[prefix] = (op, eig)
        return row, solved


def _step_shares(solved: dict[str, tuple[Any, Eigenpairs]],
                 delta: torch.Tensor) -> dict[str, float]:
    """Share of the step ``Δθ`` in each measured top-k subspace (eq. 2 on the step)."""
    row = {}
    for prefix, (op, eig) in solved.items():
        step = op.to_preconditioned(delta) if isinstance(op, PreconditionedOperator) else delta
        step = step.to(dtype=eig.vectors.dtype)
        row[f"{prefix}/step_share"] = (top_fraction(step, eig.vectors)
                                       if float(step.norm()) > 0 else math.nan)
    return row


def train_step(problem: Any, optimizer: torch.optim.Optimizer, batch_size: int, seed: int,
                step: int) -> float:
    X, Y = problem.tensors("train")
    if batch_size < len(X):
        index = batch_indices(len(X), batch_size, seed, step).to(X.device)
        X, Y = X[index], Y[index]
    model = problem.model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = problem.loss_fn(model(X), Y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run_edge_of_stability(config: ExperimentConfig, out: str | Path | None, *,
                          data_root: str | None = None,
                          log: Callable[[dict[str, float]], None] | None = None) -> list[dict]:
    """Train ``config`` and measure the (preconditioned) sharpness at the tracker's steps.

    Args:
        config: the experiment (``tracker.k`` pairs, ``tracker.tol``, ``tracker.dense_every``
            … choose the steps).
        out: the run folder (``None``: keep nothing on disk).
        data_root: folder with data files when ``config.data.root`` is unset.
        log: called with each row (e.g. ``print``).

    Returns:
        The rows written, in order.

    Raises:
        TypeError, ValueError: an optimizer without a stability threshold (see
            :func:`~tinysubspace.optim.stability.sharpness_threshold`), or a bad config.
    """
    problem = build_problem(config, data_root)
    with torch.random.fork_rng():
        torch.manual_seed(config.train.seed)
        optimizer = build_optimizer(config.optim, problem.model, {"problem": problem})
        measurer = _Measurer(config, problem, optimizer)
        store = None
        if out is not None:
            store = RunStore(out, eos_columns(config.tracker.k, measurer.adaptive))
            store.create({**config_to_dict(config), "meta": {"driver": __name__}})
        rows = _loop(config, problem, optimizer, measurer, store, log)
    if store is not None:
        last = rows[-1]["step"] if rows else 0
        state = "diverged" if rows and rows[-1].get("diverged") else "finished"
        store.write_status(state, int(last))
    return rows


def _loop(config: ExperimentConfig, problem: Any, optimizer: torch.optim.Optimizer,
          measurer: _Measurer, store: RunStore | None,
          log: Callable[[dict[str, float]], None] | None) -> list[dict]:
    steps = config.train.steps
    schedule = set(eos_steps(config.tracker, steps))
    params = [p for p in problem.model.parameters() if p.requires_grad]
    started, rows = time.perf_counter(), []
    for step in range(steps + 1):
        measured = None
        if step in schedule:
            try:
                row, solved = measurer.measure(step)
            except NonFiniteError:
                rows.append({"step": step, "diverged": True})
                break
            row["wall_time"] = time.perf_counter() - started
            measured = (row, solved)
        if step < steps:
            before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
            loss = train_step(problem, optimizer, config.optim.batch_size, config.train.seed,
                               step)
            if measured is not None:
                delta = torch.cat([p.detach().reshape(-1) for p in params]) - before
                measured[0].update(_step_shares(measured[1], delta))
            if not math.isfinite(loss):
                rows.append({"step": step, "diverged": True})
                break
        if measured is not None:
            rows.append(measured[0])
            if store is not None:
                store.append_metrics(measured[0])
            if log is not None:
                log(measured[0])
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m tinysubspace.experiments.edge_of_stability NAME --out DIR [--set k=v ...]``."""
    from tinysubspace.experiments.catalog import load_experiment
    from tinysubspace.experiments.config import parse_assignment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = dict(parse_assignment(item) for item in args.set)
    config = load_experiment(args.experiment, overrides)

    def show(row: dict[str, float]) -> None:
        cols = [c for c in ("sharpness/lambda_1", "preconditioned/lambda_1") if c in row]
        text = "  ".join(f"{c} {row[c]:.4g} (ratio {row[c.replace('lambda_1', 'ratio')]:.3f})"
                         for c in cols)
        print(f"step {row['step']:6d}  loss {row['train/loss']:.4f}  {text}", flush=True)

    run_edge_of_stability(config, args.out, log=show)


if __name__ == "__main__":
    main()
