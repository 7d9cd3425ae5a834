"""A run's health: when training has diverged, and how a run that stops early is recorded.

Divergence (:class:`RunHealth.observe`): a run has diverged when the full-data training loss
``L_t`` of a measurement is not finite, or when

    L_t > factor · L_0   at ``patience`` measurements in a row,

``L_0`` being the first measurement (the initialisation; ``train.divergence_factor``, default
10, and ``train.divergence_patience``, default 3; factor 0 turns the check off). SGD at
``optim.lr=100`` on digits takes the loss from 2.3 to ≈57 with accuracy at chance and is
caught at its third measurement; a spike that comes back down (edge of stability) is not.

A run stopped by Ctrl-C or by a write that failed (a full disk, a folder made read-only) is
recorded as ``interrupted`` / ``failed`` with the step at which it stopped and how to continue
(:func:`guarded`); what was written before stays (docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tinysubspace.experiments.config import TrainConfig

__all__ = ["RunHealth", "guarded"]

T = TypeVar("T")


class RunHealth:
    """Watches the measurements of one run for divergence; knows the step the loop is at.

    Args:
        config: the run's ``train`` section (``divergence_factor``, ``divergence_patience``).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.factor, self.patience = config.divergence_factor, config.divergence_patience
        self.step = 0  # the step the training loop is at (set by the loop)
        self.initial: float | None = None  # L_0
        self.above = 0  # measurements in a row with L_t > factor · L_0

    def observe(self, row: dict[str, Any]) -> str | None:
        """Take one measurement row; returns why the run diverged (``None``: it has not)."""
        loss = row.get("train/loss")
        if loss is None:
            return None
        loss, step = float(loss), int(row.get("step", self.step))
        if not math.isfinite(loss):
            return (f"diverged: the full-data training loss is {loss} at step {step}; lower "
                    "optim.lr. Measurements so far are kept.")
        if self.initial is None:
            self.initial = loss
            return None
        limit = self.factor * self.initial
        self.above = self.above + 1 if self.factor > 0 and loss > limit else 0
        if self.above < self.patience:
            return None
        return (f"diverged: the full-data training loss was above {self.factor:g} × its initial "
                f"{self.initial:.4g} at {self.above} measurements in a row ({loss:.4g} at step "
                f"{step}); lower optim.lr (or raise train.divergence_factor). Measurements so "
                "far are kept.")

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers for the checkpoint (a resumed run decides as the uninterrupted one)."""
        return {"initial": self.initial, "above": self.above}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial, self.above = state.get("initial"), int(state.get("above", 0))


def _checkpoint_step(path: Path) -> int:
    """The step of the last checkpoint (``status.json`` is current at each one); 0: none."""
    if not (path / "checkpoint.pt").exists():
        return 0
    try:
        return int(json.loads((path / "status.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _continue_hint(path: Path) -> str:
    return (f"continue from the last checkpoint (step {_checkpoint_step(path)}) with: "
            f"tinysubspace run --resume --out {path}")


def guarded(train: Callable[[], T], health: RunHealth, path: Path | None,
            outcome: Callable[[str, int, str], T]) -> T:
    """``train()``, or ``outcome(state, step, message)`` if Ctrl-C or a failed write stops it.

    Ctrl-C gives ``interrupted``; an ``OSError`` while the run folder ``path`` is written (the
    disk is full, the folder became read-only) gives ``failed``. Both messages say at which
    step the run stopped and how to continue. Without a run folder both propagate.
    """
    try:
        return train()
    except KeyboardInterrupt:
        if path is None:
            raise
        return outcome("interrupted", health.step, f"stopped by Ctrl-C at step {health.step}; "
                       + _continue_hint(path))
    except OSError as error:
        if path is None:
            raise
        what = ("the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT)
                else error.strerror or str(error))
        where = f" ({error.filename})" if error.filename else ""
        return outcome("failed", health.step, f"could not write the run folder at step "
                       f"{health.step}: {what}{where}. Everything written before is kept; "
                       "make room, then " + _continue_hint(path))
