"""Run folders: resolved config, metrics appended and flushed per measurement, eigenvector files,
an atomic checkpoint, and a status file (format: docs/run-store.md).

A run killed at any moment (even ``kill -9``) keeps every measurement it flushed and resumes
from its last checkpoint; rows written after that checkpoint are dropped and measured again, so
a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import numbers
import os
import pickle
import socket
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tinysubspace.results.damage import (
    RunDamageWarning,
    cut_row_note,
    drop_duplicate_rows,
    missing_vectors_note,
)
from tinysubspace.results.folder import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    MINIBATCH,
    SPECTRUM,
    STATUS,
    VECTORS,
    RunStoreError,
    atomic_write_bytes,
    check_out_folder,
    config_differences,
    read_config,
    refusal_reason,
    safe_torch_load,
    write_failed,
)

__all__ = ["MissingDataError", "Run", "RunLike", "RunStore", "RunStoreError", "as_run",
           "check_out_folder", "config_differences", "load_run", "read_config", "run_label",
           "safe_torch_load"]

MINIBATCH_COLUMNS = ("step", "minibatch/loss", "minibatch/overlap_g_Hg")


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


def _step_of(line: str) -> int | None:
    """The step in the first cell of a CSV row (``None``: not a number, a damaged row)."""
    try:
        return int(float(line.split(",", 1)[0]))
    except ValueError:
        return None


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
        header = ",".join(self.columns) + "\n"  # also for a file emptied by a crash
        if lines and lines[0] != header:
            theirs = lines[0].rstrip("\n").split(",")
            added = [c for c in self.columns if c not in theirs]
            gone = [c for c in theirs if c not in self.columns]
            raise RunStoreError(f"cannot resume: {self.path} has other columns than this run "
                                f"writes (new: {added}, missing: {gone}); nothing was changed")
        body = lines[1:]
        if body and not body[-1].endswith("\n"):  # a row cut short by a crash
            body = body[:-1]
        kept = [line for line in body
                if len(line.rstrip("\n").split(",")) == len(self.columns)
                and _step_of(line) is not None and predicate(_step_of(line))]
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
        """Start a new run: the folder must not hold a run already. ``config.json`` is written
        last, so a folder whose creation failed (and was cleaned up) never blocks a new try.

        Raises:
            RunStoreError: ``path`` holds a run already, or cannot be written.
        """
        check_out_folder(self.path)
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / VECTORS).mkdir(exist_ok=True)
            self.metrics.create()
            self.minibatch.create()
            self.write_status("running", 0)
            atomic_write_bytes(self.path / CONFIG,
                               json.dumps(config, indent=2, default=str).encode())
        except OSError as error:
            self._remove_partial(made)
            raise write_failed(self.path, error) from None

    def _remove_partial(self, made: bool) -> None:
        """Remove what a failed :meth:`create` wrote (best effort)."""
        for name in (METRICS, MINIBATCH, STATUS, CONFIG):
            with contextlib.suppress(OSError):
                (self.path / name).unlink(missing_ok=True)
        for folder in [self.path / VECTORS] + ([self.path] if made else []):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def resume(self, config: dict[str, Any],
               renamed: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """Reopen a run for ``--resume``; returns its checkpoint (``None``: start from step 0).
        ``renamed``: old config keys and their new names (compared under the new name).

        Raises:
            RunStoreError: no run here, a damaged ``config.json`` or ``checkpoint.pt``, or a
                config that differs from ``config`` (the message names the keys).
        """
        if not (self.path / CONFIG).exists():
            raise RunStoreError(f"nothing to resume: {self.path} holds no run ({CONFIG} missing)")
        saved = read_config(self.path)
        differences = config_differences(saved, config, renamed)
        if differences:
            raise RunStoreError(f"the run in {self.path} was made with another config ("
                                + "; ".join(differences) + "); resume it with the same "
                                "experiment and --set options (or --resume --out alone), or "
                                "start a new run")
        try:
            checkpoint = self.load_checkpoint()
        except RunStoreError as error:
            message = (f"cannot resume: {error}. The measurements in {METRICS} are intact; to "
                       "train again, start a new run with another --out")
            previous = _read_status(self.path)
            self.write_status("failed", int(previous.get("step") or 0), message,
                              best_effort=True)
            raise RunStoreError(message) from None
        edited = (config_differences(checkpoint.get("config") or {}, saved, renamed)
                  if checkpoint else [])
        if edited:  # the checkpoint's model and optimizer were made with other values
            raise RunStoreError(f"{CONFIG} in {self.path} was changed after the last checkpoint ("
                                + "; ".join(edited) + "): the checkpoint's model and optimizer "
                                "hold the run's values, so the edit would be ignored; undo the "
                                "edit, or start a new run with --set")
        for table in (self.metrics, self.minibatch):
            if not table.path.exists():
                raise RunStoreError(f"cannot resume: {table.path} is missing")
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
        """Write ``checkpoint.pt`` atomically and mark the run ``running`` at its step.

        Raises:
            RunStoreError: ``state`` holds objects that ``--resume`` would refuse to read
                (only tensors and plain containers are allowed).
        """
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:  # what --resume will read back: refuse it now, not after a crash
            torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise RunStoreError("a checkpoint may hold only tensors and plain containers: "
                                f"{refusal_reason(error)}") from None
        atomic_write_bytes(self.path / CHECKPOINT, buffer.getvalue())
        self.write_status("running", int(state.get("step", 0)))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint (``None``: none written yet), read with ``weights_only=True``.

        Raises:
            RunStoreError: a damaged checkpoint, or one that holds other objects.
        """
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        checkpoint = safe_torch_load(path)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("step"), int):
            raise RunStoreError(f"{path} is not a tinysubspace checkpoint (no integer 'step')")
        return checkpoint

    def write_status(self, state: str, step: int, message: str = "",
                     best_effort: bool = False, **extra: Any) -> bool:
        """Write ``status.json``: ``state``, ``step``, ``message``, when and by which process.

        Args:
            best_effort: return ``False`` instead of raising when the file cannot be written
                (the disk is full, say), so that the reason the run stopped is not lost.
        """
        payload = {"state": state, "step": int(step), "message": message, **extra,
                   "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "host": socket.gethostname(), "pid": os.getpid()}
        data = json.dumps(payload, indent=2).encode()
        try:
            atomic_write_bytes(self.path / STATUS, data)
        except OSError:
            if not best_effort:
                raise
            return self._overwrite_status(data)
        return True

    def _overwrite_status(self, data: bytes) -> bool:
        """Rewrite ``status.json`` in place: on a full disk the file's own block still takes a
        few hundred bytes, where a new file cannot be made (not atomic: the last resort)."""
        try:
            with open(self.path / STATUS, "r+b") as handle:
                handle.write(data)
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Run:
    """A saved run, read back: config, metrics tables and access to the stored arrays."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    minibatch: pd.DataFrame
    status: dict[str, Any]
    damage: tuple[str, ...] = ()  # what load_run found damaged (results/damage.py)

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
        return safe_torch_load(path)

    def spectrum(self) -> dict[str, Any] | None:
        import numpy as np

        path = self.path / SPECTRUM
        if not path.exists():
            return None
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}


def _read_csv(path: Path) -> tuple[pd.DataFrame, str]:
    """A CSV table of the run (empty if missing) and the last row if it was cut short by a
    crash (dropped from the table; ``""``: none).

    Raises:
        RunStoreError: the file is not a readable CSV table.
    """
    if not path.exists():
        return pd.DataFrame(), ""
    try:
        text = path.read_text(encoding="utf-8")
        cut = ""
        if text and not text.endswith("\n"):  # drop a row cut short by a crash
            cut, text = text[text.rfind("\n") + 1:], text[: text.rfind("\n") + 1]
        table = pd.read_csv(io.StringIO(text), on_bad_lines="skip") if text.strip() else \
            pd.DataFrame()
        return table, cut
    except (UnicodeDecodeError, pd.errors.ParserError) as error:
        raise RunStoreError(f"{path} is not a readable CSV table ({error})") from None


def _read_status(path: Path) -> dict[str, Any]:
    """``status.json`` (``{}`` if missing; a damaged one reads as state ``unknown``)."""
    file = path / STATUS
    if not file.exists():
        return {}
    try:
        status = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {"state": "unknown", "message": f"{STATUS} is damaged ({error})"}
    return status if isinstance(status, dict) else {"state": "unknown"}


def load_run(path: str | Path) -> Run:
    """Read a run folder written by :class:`RunStore` (see docs/run-store.md).

    Raises:
        RunStoreError: ``path`` holds no run, or a damaged ``config.json`` or table.

    Warns:
        RunDamageWarning: damage that reading would hide (a finished run's cut-short last row,
            duplicated rows, missing eigenvector files), also listed in ``Run.damage``.
    """
    path = Path(path)
    config = read_config(path)
    status = _read_status(path)
    (metrics, cut), (minibatch, _) = _read_csv(path / METRICS), _read_csv(path / MINIBATCH)
    metrics, repeated = drop_duplicate_rows(metrics, path / METRICS)
    minibatch, repeated_minibatch = drop_duplicate_rows(minibatch, path / MINIBATCH)
    run = Run(path, config, metrics, minibatch, status)
    damage = tuple(note for note in (
        cut_row_note(path / METRICS, cut, metrics, status), repeated, repeated_minibatch,
        missing_vectors_note(path, config, metrics, run.eigenvector_steps)) if note)
    for note in damage:
        warnings.warn(note, RunDamageWarning, stacklevel=2)
    return dataclasses.replace(run, damage=damage)


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
