"""Where a :class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker` sends its rows.

``"csv"``: the run store (``metrics.csv`` and ``eigenvectors/``, docs/run-store.md), so that
``ts.load_run``, ``tinysubspace plot``, ``report`` and ``table1`` read the run. ``"tensorboard"``:
TensorBoard event files in ``<out>/tensorboard`` (one scalar per column; needs the
``tensorboard`` package). Any callable ``fn(row, step)``: e.g. ``wandb.log`` (called as
``wandb.log(row, step)``). Only rank 0 of a ``torchrun`` job logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CallableLogger", "Logger", "RunStoreLogger", "TensorBoardLogger", "build_loggers"]

LOGGER_NAMES = ("csv", "tensorboard")


class Logger:
    """What a tracker calls: :meth:`write` once per measurement, :meth:`close` at the end."""

    def write(self, row: dict[str, float], step: int, vectors: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release files (nothing by default)."""


class RunStoreLogger(Logger):
    """Appends each row to ``metrics.csv`` of a :class:`~tinysubspace.results.store.RunStore`
    and saves the eigenvectors of anchor / ``save_vectors_at`` steps.

    Args:
        store: the run store (created or resumed by its owner).
        columns: write only these columns (``None``: every column of the row; the store
            refuses a column that is not in its header).
    """

    def __init__(self, store: Any, columns: Collection[str] | None = None) -> None:
        self.store = store
        self.columns = None if columns is None else set(columns)

    def write(self, row: dict[str, float], step: int, vectors: dict[str, Any] | None) -> None:
        if self.columns is not None:
            row = {key: value for key, value in row.items() if key in self.columns}
        self.store.append_metrics(row)
        if vectors is not None:
            self.store.save_eigenvectors(step, vectors)


class TensorBoardLogger(Logger):
    """One TensorBoard scalar per finite column (tag = column name, e.g. ``hessian/f_top``).

    Args:
        log_dir: folder of the event files.

    Raises:
        ImportError: the ``tensorboard`` package is missing (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("the 'tensorboard' logger needs the tensorboard package: "
                              "pip install tensorboard (or tinysubspace[tensorboard])") from error
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            if key != "step" and value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def write(self, row: dict[str, float], step: int, vectors: dict[str, Any] | None) -> None:
        self(row, step)

    def close(self) -> None:
        self.writer.close()


class DeferredLogger(Logger):
    """Holds each row until :meth:`release` (the loop's call once the update after the
    measurement is taken, with the deferred columns, e.g. ``sharpness/step_share``) and then
    writes it to ``loggers``; a new row or :meth:`close` releases a held one as it is."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers, self.held = list(loggers), None

    def write(self, row: dict[str, float], step: int, vectors: dict[str, Any] | None) -> None:
        self.release({})
        self.held = (row, step, vectors)

    def release(self, columns: dict[str, float]) -> None:
        """Write the held row (if any) with ``columns`` added."""
        if self.held is None:
            return
        (row, step, vectors), self.held = self.held, None
        row.update(columns)
        for logger in self.loggers:
            logger.write(row, step, vectors)

    def close(self) -> None:
        self.release({})
        for logger in self.loggers:
            logger.close()


class CallableLogger(Logger):
    """A user's ``fn(row, step)``; it gets a copy of the row."""

    def __init__(self, fn: Callable[[dict[str, float], int], Any]) -> None:
        self.fn = fn

    def write(self, row: dict[str, float], step: int, vectors: dict[str, Any] | None) -> None:
        self.fn(dict(row), step)


def build_loggers(specs: Sequence[Any], out: Path | None, store: Any = None,
                  columns: Collection[str] | None = None) -> list[Logger]:
    """Loggers from names and callables (the tracker's ``loggers=``).

    Args:
        specs: ``"csv"``, ``"tensorboard"``, :class:`Logger` objects, callables ``fn(row, step)``.
        out: the run folder (``"csv"`` and ``"tensorboard"`` write into it).
        store: the run store ``"csv"`` writes to; ``columns``: the columns it gets (other keys
            of a row, e.g. a loop's ``extra``, go to the other loggers only).

    Raises:
        ValueError: an unknown name, or a file logger without ``out``.
        TypeError: something that is neither a name nor callable.
    """
    if isinstance(specs, (str, bytes)) or callable(specs):
        specs = [specs]
    loggers: list[Logger] = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in LOGGER_NAMES:
                raise ValueError(f"unknown logger {spec!r}; loggers are 'csv', 'tensorboard' or "
                                 "callables taking (row, step)")
            if out is None:
                raise ValueError(f"the {spec!r} logger writes into the run folder: pass out=DIR "
                                 "(or leave it out of loggers)")
            if spec == "csv":
                loggers.append(RunStoreLogger(store, columns))
            else:
                loggers.append(TensorBoardLogger(out / "tensorboard"))
        elif isinstance(spec, Logger):
            loggers.append(spec)
        elif callable(spec):
            loggers.append(CallableLogger(spec))
        else:
            raise TypeError(f"loggers must be 'csv', 'tensorboard' or callables taking "
                            f"(row, step), got {type(spec).__name__}")
    return loggers
