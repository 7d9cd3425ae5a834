"""A run's key numbers beside the paper's: Table 1's mean overlap and the headline claims of
sections 2.1–2.3 and Appendix B, each with where the paper states it.

Only the Table 1 row carries a number in the paper; the other claims are statements (quoted
short) or, for eq. 4, the paper's estimate ``√(3/4) ≈ 0.87``. Our side is read from the run:

- eq. 4 from the top-k eigenvalues of the last measurement,
  :math:`\\mathrm{overlap}(w, Hw) = \\sum_i \\lambda_i / \\sqrt{k \\sum_i \\lambda_i^2}`;
- the gap :math:`\\lambda_k / \\lambda_{k+1}` at the last measurement;
- the subspace overlap (eq. 5) of the top-k (and next-k) subspace at ``t1 = 100`` (or the
  anchor nearest it) with the last measured one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinysubspace.results.store import Run
from tinysubspace.results.table1 import TABLE1_ROWS, full_data_steps, run_overlap, table1_row_id
from tinysubspace.results.window import window_text

__all__ = ["KeyNumber", "eq4_overlap", "key_numbers"]


@dataclass(frozen=True)
class KeyNumber:
    """One line of the comparison: our value and the paper's number or statement."""

    quantity: str
    ours: float
    paper: str
    where: str


def eq4_overlap(eigenvalues: np.ndarray) -> float:
    """Eq. 4: the overlap of a random vertex ``w`` of the unit cube in the top subspace,
    ``Σ λ_i / √(k Σ λ_i²)`` (NaN for no eigenvalues or all zero).

    >>> round(eq4_overlap(np.arange(1.0, 10001.0)), 4)   # λ_i ∝ i, k large: √(3/4)
    0.866
    """
    values = np.asarray(eigenvalues, dtype=float)
    norm = math.sqrt(values.size * float(np.sum(values ** 2)))
    return float(values.sum()) / norm if norm > 0 else math.nan


def _last(run: Run, column: str) -> float:
    if column not in run.metrics:
        return math.nan
    values = run.metrics[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _anchor_near(run: Run, wanted: int = 100) -> int | None:
    prefix = "overlap/top/t1="
    anchors = [int(str(c)[len(prefix):]) for c in run.metrics.columns
               if str(c).startswith(prefix)]
    return min(anchors, key=lambda t: (abs(t - wanted), t)) if anchors else None


def _overlap_numbers(run: Run, last_n: int) -> list[KeyNumber]:
    row_id = table1_row_id(run)
    row = next((r for r in TABLE1_ROWS if r.row_id == row_id), None)
    try:
        ours = run_overlap(run, last_n)
    except ValueError:
        return []
    full = ours.full.value if ours.full else math.nan
    minibatch = ours.minibatch.value if ours.minibatch else math.nan
    test = ours.test.value if ours.test else math.nan
    how = full_data_steps(ours)
    window = window_text(ours.full or ours.minibatch, last_n)
    return [
        KeyNumber(f"mean overlap(g, Hg), full training set, {window} ({how})", full,
                  f"{row.paper:.2f}" if row else "— (not a Table 1 row)", "Table 1"),
        KeyNumber(f"mean overlap(g, Hg), mini-batches, {window}", minibatch,
                  "— (the paper measures on the entire training set)", "Sec. 2"),
        KeyNumber(f"mean overlap(g, Hg), test set, {window}", test,
                  "\"large … on a test set as well\" (not with random labels); no number",
                  "Sec. 2.2")]


def key_numbers(run: Run, last_n: int = 1000) -> list[KeyNumber]:
    """The comparison lines that the run has data for (Table 1's first)."""
    lines = _overlap_numbers(run, last_n)
    k = int((run.config.get("tracker") or {}).get("k") or 10)
    lines.append(KeyNumber("f_top at the last measurement", _last(run, "hessian/f_top"),
                           "\"quickly grows to a value close to 1\"", "Sec. 2.1, Fig. 1"))
    top = np.array([_last(run, f"hessian/eig_{i}") for i in range(1, k + 2)])
    if np.isfinite(top).all():
        lines.append(KeyNumber(f"λ_{k} / λ_{k + 1} at the last measurement (k = {k})",
                               top[k - 1] / top[k] if top[k] != 0 else math.nan,
                               "k large eigenvalues, k = number of classes", "App. B, Fig. 4"))
        lines.append(KeyNumber(f"eq. 4 with our top {k} eigenvalues", eq4_overlap(top[:k]),
                               "√(3/4) ≈ 0.87 for λ_i ∝ i", "Sec. 2.2, eq. 4"))
    t1 = _anchor_near(run)
    if t1 is not None:
        for kind, claim, where in (
                ("top", "\"remains significant\" after t1 ≈ 100", "Sec. 2.3, Fig. 2 (a)"),
                ("next", "\"decays quickly\"", "Sec. 2.3, Fig. 2 (b)")):
            lines.append(KeyNumber(f"overlap (eq. 5) of the {kind}-{k} subspace, t1 = {t1} to "
                                   "the last measurement",
                                   _last(run, f"overlap/{kind}/t1={t1}"), claim, where))
    return lines
