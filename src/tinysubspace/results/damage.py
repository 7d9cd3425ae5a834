"""Damage to a run folder that reading it would otherwise hide (docs/reliability.md).

:func:`~tinysubspace.results.store.load_run` reads what it can and says what it found, as
:class:`RunDamageWarning` s and in ``Run.damage``:

- a **cut-short last row** of ``metrics.csv`` in a run whose ``status.json`` says ``finished``
  (a crash can cut a row of a running run, and ``--resume`` drops it; a finished run's data
  should end where its status says);
- **duplicated rows**: a run writes one row per measured step (identical copies are dropped,
  rows of one step that differ are kept and named);
- **missing eigenvector files**: a step listed in ``tracker.save_vectors_at`` that was measured
  but whose ``eigenvectors/step_*.pt`` is gone (Figs. 6/7 would draw the nearest other step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["RunDamageWarning", "cut_row_note", "drop_duplicate_rows", "missing_vectors_note"]


class RunDamageWarning(UserWarning):
    """A run folder was damaged: something written is missing or was written twice."""


def cut_row_note(path: Path, cut: str, metrics: pd.DataFrame,
                 status: dict[str, Any]) -> str | None:
    """The note for a last row ``cut`` short (``None``: none cut, or the run is not finished)."""
    if not cut or status.get("state") != "finished":
        return None
    last = int(metrics["step"].max()) if "step" in metrics and len(metrics) else None
    ends = "no complete row" if last is None else f"the data ends at step {last}"
    return (f"{path}: its last row is cut short ({cut[:40]!r}…) and was left out, though "
            f"status.json says the run finished at step {status.get('step')}; {ends}")


def drop_duplicate_rows(table: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, str | None]:
    """``table`` without exact copies of a row, and a note naming the steps written more than
    once (``None``: one row per step)."""
    if "step" not in table or table.empty:
        return table, None
    repeated = table["step"].duplicated(keep=False)
    if not repeated.any():
        return table, None
    kept = table.drop_duplicates(keep="first").reset_index(drop=True)
    steps = sorted({int(s) for s in table.loc[repeated, "step"]})
    differ = sorted({int(s) for s in kept.loc[kept["step"].duplicated(keep=False), "step"]})
    shown = ", ".join(map(str, steps[:8])) + (", …" if len(steps) > 8 else "")
    note = f"{path}: steps {shown} have more than one row (a run writes one per measured step)"
    note += (f"; rows of steps {', '.join(map(str, differ[:8]))} differ and are all kept"
             if differ else "; the identical copies were left out")
    return kept, note


def missing_vectors_note(path: Path, config: dict[str, Any], metrics: pd.DataFrame,
                         saved: Sequence[int]) -> str | None:
    """The note for eigenvector files of measured ``tracker.save_vectors_at`` steps that are
    not in ``eigenvectors/`` (``None``: all there)."""
    wanted = (config.get("tracker") or {}).get("save_vectors_at") or ()
    if isinstance(wanted, (str, int)) or "step" not in metrics:
        return None
    measured = {int(s) for s in metrics["step"].dropna()}
    missing = sorted(int(s) for s in wanted if int(s) in measured and int(s) not in saved)
    if not missing:
        return None
    files = ", ".join(f"step_{s:08d}.pt" for s in missing)
    return (f"{path}/eigenvectors: {files} missing (tracker.save_vectors_at lists step"
            f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}, which "
            f"{'were' if len(missing) > 1 else 'was'} measured); figures of eigenvectors use "
            f"the saved steps {list(saved)}")
