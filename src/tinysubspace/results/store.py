"""Run folders: resolved config, metrics appended and flushed per measurement, eigenvector files,
an atomic checkpoint, and a status file (format: docs/run-store.md).

A run killed at any moment (even ``kill -9``) keeps every measurement it flushed and resumes
from its last checkpoint; rows written after that checkpoint are dropped and measured again, so
a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import pickle
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["MissingDataError", "Run", "RunLike", "RunStore", "RunStoreError", "as_run", "load_run",
           "run_label"]

CONFIG, METRICS, MINIBATCH, STATUS = "config.json", "metrics.csv", "minibatch.csv", "status.json"
CHECKPOINT, SPECTRUM, VECTORS = "checkpoint.pt", "spectrum.npz", "eigenvectors"
MINIBATCH_COLUMNS = ("step", "minibatch/loss", "minibatch/overlap_g_Hg")


class RunStoreError(RuntimeError):
    """A run folder that cannot be created, resumed or read as asked."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _format(value: Any) -> str:
    """One CSV cell: integers as such, other numbers (numpy and one-element tensors too) as the
    shortest repr of the float64 (bools as 0.0 / 1.0), NaN and ``None`` as empty cells."""
    if value is None:
        return ""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return "" if math.isnan(number) else repr(number)
    return str(value)


class _CsvTable:
    """An append-only CSV file with a fixed header; each append is flushed and fsynced."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, list(columns)

    def create(self) -> None:
        atomic_write_bytes(self.path, (",".join(self.columns) + "\n").encode())

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` (missing columns left empty), flushed and fsynced.

        Raises:
            RunStoreError: a row with a column that is not in the header.
        """
        rows = list(rows)
        unknown = {key for row in rows for key in row} - set(self.columns)
        if unknown:
            raise RunStoreError(f"columns {sorted(unknown)} are not in {self.path.name}")
        lines = "".join(",".join(_format(row.get(c)) for c in self.columns) + "\n" for row in rows)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def keep(self, predicate) -> None:
        """Rewrite the file atomically keeping complete rows whose step satisfies ``predicate``."""
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        lines = text.splitlines(keepends=True)
        header, body = lines[0], lines[1:]
        if body and not body[-1].endswith("\n"):  # a row cut short by a crash
            body = body[:-1]
        kept = [line for line in body
                if len(line.rstrip("\n").split(",")) == len(self.columns)
                and predicate(int(float(line.split(",", 1)[0])))]
        atomic_write_bytes(self.path, (header + "".join(kept)).encode())


class RunStore:
    """Writes one run folder (only the process that owns the run creates a store).

    Args:
        path: the run folder.
        metric_columns: the columns of ``metrics.csv`` (fixed for the run).
    """

    def __init__(self, path: str | Path, metric_columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.metrics = _CsvTable(self.path / METRICS, metric_columns)
        self.minibatch = _CsvTable(self.path / MINIBATCH, MINIBATCH_COLUMNS)

    def create(self, config: dict[str, Any]) -> None:
        """Start a new run: the folder must not hold a run already.

        Raises:
            RunStoreError: ``path`` holds a run already.
        """
        if (self.path / CONFIG).exists():
            raise RunStoreError(f"{self.path} already holds a run; use --resume to continue it or "
                                "--out to choose another folder")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / VECTORS).mkdir(exist_ok=True)
        atomic_write_bytes(self.path / CONFIG, json.dumps(config, indent=2, default=str).encode())
        self.metrics.create()
        self.minibatch.create()
        self.write_status("running", 0)

    def resume(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Reopen a run for ``--resume``; returns its checkpoint (``None``: start from step 0).

        Raises:
            RunStoreError: no run here, or its config differs from ``config``.
        """
        if not (self.path / CONFIG).exists():
            raise RunStoreError(f"nothing to resume: {self.path} holds no run ({CONFIG} missing)")
        saved = json.loads((self.path / CONFIG).read_text())
        mine = {k: v for k, v in config.items() if k != "meta"}
        theirs = {k: v for k, v in saved.items() if k != "meta"}
        if json.loads(json.dumps(mine, default=str)) != theirs:
            raise RunStoreError(f"the run in {self.path} was made with another config; resume it "
                                "with the same experiment and --set options, or start a new run")
        checkpoint = self.load_checkpoint()
        step = checkpoint["step"] if checkpoint else 0
        measured = checkpoint["step"] if checkpoint else -1
        self.metrics.keep(lambda s: s <= measured)
        self.minibatch.keep(lambda s: s < step)
        self.write_status("running", step)
        return checkpoint

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.metrics.append([row])

    def append_minibatch(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.minibatch.append(rows)

    def save_eigenvectors(self, step: int, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.path / VECTORS / f"step_{step:08d}.pt", buffer.getvalue())

    def save_spectrum(self, arrays: dict[str, Any]) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.path / SPECTRUM, buffer.getvalue())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path / CHECKPOINT, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def write_status(self, state: str, step: int, message: str = "") -> None:
        payload = {"state": state, "step": int(step), "message": message}
        atomic_write_bytes(self.path / STATUS, json.dumps(payload, indent=2).encode())


@dataclass(frozen=True)
class Run:
    """A saved run, read back: config, metrics tables and access to the stored arrays."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    minibatch: pd.DataFrame
    status: dict[str, Any]

    @property
    def eigenvector_steps(self) -> list[int]:
        folder = self.path / VECTORS
        if not folder.is_dir():
            return []
        return sorted(int(f.stem.split("_")[1]) for f in folder.glob("step_*.pt"))

    def eigenvectors(self, step: int) -> dict[str, Any]:
        """The saved ``values``, ``vectors``, ``param_names``, ``param_shapes`` at ``step``.

        Read with ``weights_only=True``: a file that asks for anything but tensors and plain
        containers is refused, so plotting someone else's run cannot run code.

        Raises:
            RunStoreError: nothing saved at ``step``, or a file with other objects.
        """
        path = self.path / VECTORS / f"step_{step:08d}.pt"
        if not path.exists():
            raise RunStoreError(f"no eigenvectors saved at step {step} in {self.path}; saved "
                                f"steps: {self.eigenvector_steps}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise RunStoreError(f"{path} holds more than tensors and plain containers; "
                                f"refusing to load it ({str(error).splitlines()[0]})") from error

    def spectrum(self) -> dict[str, Any] | None:
        import numpy as np

        path = self.path / SPECTRUM
        if not path.exists():
            return None
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # drop a row cut short by a crash
        text = text[: text.rfind("\n") + 1]
    return pd.read_csv(io.StringIO(text), on_bad_lines="skip")


def load_run(path: str | Path) -> Run:
    """Read a run folder written by :class:`RunStore` (see docs/run-store.md).

    Raises:
        RunStoreError: ``path`` holds no run.
    """
    path = Path(path)
    if not (path / CONFIG).exists():
        raise RunStoreError(f"{path} is not a run folder ({CONFIG} missing)")
    config = json.loads((path / CONFIG).read_text())
    status_path = path / STATUS
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    return Run(path, config, _read_csv(path / METRICS), _read_csv(path / MINIBATCH), status)


# ------------------------------------------------------------------ runs given by folder or object
RunLike = Run | str | Path


class MissingDataError(ValueError):
    """The run holds nothing of what a figure needs (says what is missing and how to get it)."""


def as_run(run: RunLike) -> Run:
    """A loaded run: ``run`` itself, or :func:`~tinysubspace.results.store.load_run` of a folder."""
    return load_run(run) if isinstance(run, (str, Path)) else run


def run_label(run: Run) -> str:
    """The experiment's name from the config, else the folder's name."""
    config = run.config
    name = config.get("name") or (config.get("experiment") or {}).get("name")
    return str(name) if name else Path(run.path).name
