"""What a "mean over the last N steps" actually averaged, in words.

Table 1 averages ``overlap(g, Hg)`` over the window ``W = {t : t_last − N < t ≤ t_last}``. When a
run has fewer steps than ``N`` (``t_last < N``), ``W`` reaches back to step 0 and the mean takes
in the start of training, where ``overlap(g, Hg)`` is still far from its late value (a 300-step
run gave −0.32 beside the paper's 0.96). Every place that prints such a mean (the end-of-run
summary, ``table1``, the report, the overlap figure) says so with these helpers instead of
"last 1000 steps".
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["covers_start", "short_run_warning", "window_text"]


class _Window(Protocol):
    first_step: int
    last_step: int
    count: int


def covers_start(window: _Window | None, last_n: int) -> bool:
    """``True`` when the window ``t_last − N < t ≤ t_last`` reaches step 0 (``t_last < N``): the
    run is shorter than the window and its mean includes the start of training.

    >>> from types import SimpleNamespace as W
    >>> covers_start(W(first_step=0, last_step=299, count=300), 1000)
    True
    >>> covers_start(W(first_step=1001, last_step=2000, count=1000), 1000)
    False
    """
    return window is not None and window.last_step < last_n


def window_text(window: _Window | None, last_n: int) -> str:
    """``last 1000 steps``, or for a run shorter than the window ``steps 0–299 (the whole run,
    shorter than 1000 steps)``."""
    if not covers_start(window, last_n):
        return f"last {last_n} steps"
    return (f"steps {window.first_step}–{window.last_step} (the whole run, shorter than "
            f"{last_n} steps)")


def short_run_warning(window: _Window | None, last_n: int, what: str = "the mean") -> str | None:
    """One sentence for a run shorter than the window (``None`` otherwise): what was averaged,
    why it is not the paper's number, what to do."""
    if not covers_start(window, last_n):
        return None
    return (f"{what} covers steps {window.first_step}–{window.last_step}, the whole run: it is "
            f"shorter than the {last_n}-step window, so the start of training is averaged in "
            "and the value is not comparable with the paper's (the last 1000 steps of a long "
            "run); train longer, or average a later window with `tinysubspace table1 --last N`")
