"""Table 1 as the paper measured it: overlap(g, Hg) (eq. 3) with the gradient and the Hessian of
the *entire* training set, at every one of the last ``N`` steps of training.

.. math::  \\mathrm{overlap}_t = \\frac{g_t^T H_t g_t}{\\|g_t\\|\\,\\|H_t g_t\\|},\\qquad
           g_t = \\nabla L(\\theta_t),\\; H_t = \\nabla^2 L(\\theta_t),\\;
           L = \\frac{1}{N_{\\mathrm{train}}} \\sum_{a} \\ell(x_a, y_a)

PAPER.txt, section 2: "measurements of the gradient and Hessian were evaluated using the entire
training set"; Table 1: "the reported overlap is the mean over the last 1,000 steps of training".
``θ_t`` are the parameters before update ``t`` (the point the mini-batch gradient of step ``t``
is taken at), so each row costs one full-data gradient and one ``H·g``; the test split, where
loaded, adds the same on the test set.

Switched on by ``tracker.overlap_last = N`` (``tracker.overlap_every`` thins the steps); the
rows go to ``full_overlap.csv`` in the run folder (:data:`FULL_OVERLAP_COLUMNS`), never to
``metrics.csv``: with the option off nothing changes. The measurement is in ``tracker.mode``
(default ``eval``: dropout off, batch norm on its running statistics), the same function as the
tracker's ``hessian/overlap_g_Hg``; it changes nothing of the model, its gradients or the random
streams, so training goes exactly as without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.experiments.config import ExperimentConfig
from tinysubspace.experiments.tracker import settings_of
from tinysubspace.metrics import gradient_overlap
from tinysubspace.results.folder import atomic_write_bytes
from tinysubspace.results.table1 import FULL_OVERLAP_COLUMNS, FULL_OVERLAP_FILE

__all__ = ["FullOverlap", "full_data_overlap", "overlap_steps"]



def overlap_steps(last: int, every: int, total: int) -> list[int]:
    """The training steps measured: ``t ∈ [total − last, total)`` with ``total − 1 − t`` a
    multiple of ``every`` (the last training step is always one).

    Raises:
        ValueError: ``last < 0``, ``every < 1`` or ``total < 0``.

    >>> overlap_steps(5, 2, 10)
    [5, 7, 9]
    >>> overlap_steps(1000, 1, 3)   # a run shorter than the window: every step
    [0, 1, 2]
    """
    if last < 0 or every < 1 or total < 0:
        raise ValueError(f"need last >= 0, every >= 1 and total >= 0, got last={last}, "
                         f"every={every}, total={total}")
    return list(range(total - 1, max(total - last, 0) - 1, -every))[::-1]


def full_data_overlap(op: HessianOperator) -> tuple[float, float, float]:
    """``(L, ‖g‖, overlap(g, Hg))`` of the operator's data set: one gradient pass and one
    ``H·g`` product; the overlap is NaN where it is undefined (``g = 0`` or ``Hg = 0``)."""
    loss, g = op.loss_and_gradient()
    norm = float(g.norm())
    if norm == 0.0:
        return loss, norm, math.nan
    Hg = op @ g
    overlap = gradient_overlap(g, Hg) if float(Hg.norm()) > 0.0 else math.nan
    return loss, norm, overlap


class FullOverlap:
    """Measures :func:`full_data_overlap` on the training (and test) set at the steps of
    :func:`overlap_steps` and appends the rows to ``full_overlap.csv``.

    Args:
        config: the resolved experiment (``tracker.overlap_last``, ``overlap_every``, ``mode``,
            ``dtype``, ``chunk_size``; ``train.steps``).
        loss_fn: the mean-reduced training loss.
        train, test: this process's part of each split (``test`` may be ``None``).
        distributed: every rank measures together (the operators all-reduce); only the rank
            that owns the run folder writes.
    """

    def __init__(self, config: ExperimentConfig, loss_fn: Callable, train: Any, test: Any,
                 distributed: bool = False) -> None:
        tracker = config.tracker
        self.steps = set(overlap_steps(tracker.overlap_last, tracker.overlap_every,
                                       config.train.steps))
        self.operators = settings_of(tracker, distributed=distributed).operators
        self.loss_fn, self.train, self.test = loss_fn, train, test
        self._trimmed = False  # rows of an interrupted process dropped (on the first write)

    def measure(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The row of ``step`` (the model, its gradients and the random streams untouched)."""
        parameter = next(model.parameters())
        devices = [] if parameter.device.type != "cuda" else [
            parameter.device.index if parameter.device.index is not None
            else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss, norm, overlap = full_data_overlap(self._operator(model, self.train))
            row = {"step": step, "full/loss": loss, "full/grad_norm": norm,
                   "full/overlap_g_Hg": overlap}
            if self.test is not None:
                test_loss, _, test_overlap = full_data_overlap(self._operator(model, self.test))
                row.update({"full/test_loss": test_loss, "full/test_overlap_g_Hg": test_overlap})
        return row

    def record(self, model: torch.nn.Module, step: int, store: Any | None) -> None:
        """At a measured step: :meth:`measure`, and append the row to ``store.path /
        full_overlap.csv`` (``store`` ``None``: measure only, as on ranks without the folder)."""
        if step not in self.steps:
            return
        row = self.measure(model, step)
        if store is not None:
            self._append(Path(store.path) / FULL_OVERLAP_FILE, row)

    def _operator(self, model: torch.nn.Module, data: Any) -> HessianOperator:
        return self.operators.hessian(model, self.loss_fn, data)

    def _append(self, path: Path, row: dict[str, float]) -> None:
        """Append one row, flushed and fsynced. The first write of a process keeps only the rows
        before its step: rows a killed run wrote after its checkpoint are measured again."""
        header = ",".join(FULL_OVERLAP_COLUMNS) + "\n"
        if not self._trimmed:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True) \
                if path.exists() else []
            kept = [line for line in lines[1:] if line.endswith("\n")
                    and _step(line) is not None and _step(line) < row["step"]]
            atomic_write_bytes(path, (header + "".join(kept)).encode())
            self._trimmed = True
        cells = [_cell(row.get(column)) for column in FULL_OVERLAP_COLUMNS]
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(",".join(cells) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _step(line: str) -> int | None:
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return None


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return "" if math.isnan(value) else repr(float(value))
