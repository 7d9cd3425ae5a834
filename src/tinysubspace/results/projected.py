"""Several runs side by side: loss and accuracy curves in one figure, and a summary table (final
loss, steps to a target loss, HVP cost). Made for the ``projected-*`` experiments (SGD, Dom-SGD,
Bulk-SGD, low-rank Newton) but takes any runs. Reads runs only; never trains (STYLE.md point 14).

The optimizer's Hessian-vector products (its basis refreshes,
:mod:`tinysubspace.optim.subspace_sgd`) come
from the ``optim/matvecs`` column of ``metrics.csv`` when the run has one, else from the
optimizer state in the run's final ``checkpoint.pt``; plain SGD and Adam cost none. The
tracker's own products (``cost/matvecs``, the measurements) are reported apart: they are the
same for every optimizer and are not part of training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tinysubspace.results.store import (
    CHECKPOINT,
    MissingDataError,
    Run,
    RunLike,
    as_run,
    run_label,
    safe_torch_load,
)

__all__ = [
    "RunSummary",
    "compare_csv",
    "compare_markdown",
    "compare_table",
    "default_target_loss",
    "optimizer_cost",
    "short_labels",
    "steps_to_target",
]


@dataclass(frozen=True)
class RunSummary:
    """One row of the comparison table."""

    label: str
    optimizer: str
    state: str
    steps: int  # last measured step
    final_loss: float
    final_accuracy: float
    best_loss: float
    steps_to_target: int | None  # first measured step with train/loss <= target (None: never)
    hvp_optimizer: float  # Hessian-vector products of the optimizer (NaN: unknown)
    hvp_tracker: int  # Hessian-vector products of the measurements
    refreshes: float  # basis refreshes (NaN: unknown or none)
    switched_at: int | None  # step at which a switch-* optimizer switched (None: never / n.a.)


def short_labels(names: Sequence[str]) -> list[str]:
    """Drop the ``-``-separated words every name shares at the start and at the end.

    >>> short_labels(["projected-sgd-digits", "projected-dom-sgd-digits"])
    ['sgd', 'dom-sgd']
    """
    words = [name.split("-") for name in names]
    if len(words) < 2:
        return list(names)
    shortest = min(len(w) for w in words)
    head = 0
    while head < shortest - 1 and len({tuple(w[: head + 1]) for w in words}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head - 1 and len({tuple(w[len(w) - tail - 1:]) for w in words}) == 1:
        tail += 1
    labels = ["-".join(w[head: len(w) - tail]) for w in words]
    return labels if len(set(labels)) == len(labels) else list(names)


def optimizer_cost(run: Run) -> dict[str, Any]:
    """``{"matvecs", "refreshes", "switched_at"}`` of the run's optimizer.

    From the ``optim/matvecs`` column if present, else from ``checkpoint.pt``'s optimizer state
    (:class:`~tinysubspace.optim.subspace_sgd.SubspaceSGD`). Plain ``sgd`` / ``adam`` cost 0
    products.
    Unknown values are NaN / ``None``.
    """
    name = run.config.get("optim", {}).get("name", "")
    cost: dict[str, Any] = {"matvecs": math.nan, "refreshes": math.nan, "switched_at": None}
    if name in ("sgd", "adam"):
        cost.update(matvecs=0, refreshes=0)
    state = _subspace_state(run)
    if state is not None:
        cost.update(matvecs=int(state["subspace"]["matvecs"]),
                    refreshes=int(state["subspace"]["refreshes"]))
        direction = state.get("direction") or {}
        cost["switched_at"] = direction.get("switched_at")
    if "optim/matvecs" in run.metrics.columns and run.metrics["optim/matvecs"].notna().any():
        cost["matvecs"] = int(run.metrics["optim/matvecs"].dropna().iloc[-1])
    return cost


def _subspace_state(run: Run) -> dict[str, Any] | None:
    path = Path(run.path) / CHECKPOINT
    if not path.exists():
        return None
    checkpoint = safe_torch_load(path)  # tensors and plain containers only: RunStoreError else
    optimizer = checkpoint.get("optimizer") if isinstance(checkpoint, dict) else None
    return optimizer.get("subspace_sgd") if isinstance(optimizer, dict) else None


def steps_to_target(metrics: pd.DataFrame, target: float) -> int | None:
    """The first measured step at which the full-data ``train/loss`` is at most ``target``.

    >>> steps_to_target(pd.DataFrame({"step": [0, 10, 20], "train/loss": [2.0, 0.5, 0.1]}), 0.5)
    10
    """
    hit = metrics[metrics["train/loss"] <= target]
    return None if hit.empty else int(hit["step"].iloc[0])


def default_target_loss(runs: Sequence[Run]) -> float:
    """Twice the lowest final training loss among ``runs`` (the best run always reaches it)."""
    finals = [float(r.metrics["train/loss"].dropna().iloc[-1]) for r in runs
              if "train/loss" in r.metrics and r.metrics["train/loss"].notna().any()]
    if not finals:
        raise MissingDataError("no run has a measured train/loss; nothing to compare")
    return 2.0 * min(finals)


def compare_table(runs: Sequence[RunLike], target_loss: float | None = None,
                  labels: Sequence[str] | None = None) -> tuple[pd.DataFrame, float]:
    """One :class:`RunSummary` row per run, and the target loss used.

    Raises:
        MissingDataError: a run has no ``train/loss`` measurements.
    """
    loaded = [as_run(r) for r in runs]
    for run in loaded:
        if "train/loss" not in run.metrics or run.metrics["train/loss"].dropna().empty:
            raise MissingDataError(f"{run.path} has no train/loss measurements (metrics.csv)")
    target = default_target_loss(loaded) if target_loss is None else float(target_loss)
    labels = list(labels) if labels is not None else short_labels([run_label(r) for r in loaded])
    rows = [_summary(run, label, target) for run, label in zip(loaded, labels, strict=True)]
    return pd.DataFrame([asdict(row) for row in rows]), target


def _summary(run: Run, label: str, target: float) -> RunSummary:
    table = run.metrics.dropna(subset=["train/loss"])
    last = table.iloc[-1]
    cost = optimizer_cost(run)
    accuracy = float(last["train/accuracy"]) if "train/accuracy" in table else math.nan
    tracker = int(run.metrics["cost/matvecs"].fillna(0).sum()) if "cost/matvecs" in \
        run.metrics else 0
    return RunSummary(label, str(run.config.get("optim", {}).get("name", "?")),
                      str(run.status.get("state", "?")), int(last["step"]),
                      float(last["train/loss"]), accuracy, float(table["train/loss"].min()),
                      steps_to_target(table, target), cost["matvecs"], tracker,
                      cost["refreshes"], cost["switched_at"])


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


MARKDOWN_COLUMNS = [("label", "run", "{}"), ("optimizer", "optimizer", "{}"),
                    ("final_loss", "final loss", "{:.4g}"), ("best_loss", "best loss", "{:.4g}"),
                    ("final_accuracy", "final acc.", "{:.3f}"),
                    ("steps_to_target", "steps to target", "{:.0f}"),
                    ("switched_at", "switched at", "{:.0f}"),
                    ("hvp_optimizer", "HVPs (optimizer)", "{:.0f}"),
                    ("refreshes", "refreshes", "{:.0f}"),
                    ("hvp_tracker", "HVPs (tracker)", "{:.0f}"), ("state", "state", "{}")]


def compare_markdown(table: pd.DataFrame, target: float) -> str:
    """The table as markdown, with the target loss stated above it."""
    head = "| " + " | ".join(title for _, title, _ in MARKDOWN_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|"
    lines = [f"target training loss: {target:.4g} (steps to target: first measurement at or "
             "below it; — = never)", "", head, rule]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(_plain(row[key]), fmt)
                                       for key, _, fmt in MARKDOWN_COLUMNS) + " |")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """pandas' NaN-filled ints and numpy scalars back to ``None`` / Python numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def compare_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)
