"""Progress of a long run on a terminal: a bar with ETA, and the latest measurement.

The ETA adds what is left of both kinds of work at their measured costs,

    ETA = (steps left) · t_step + (measurements left in the schedule) · t_measure,

where ``t_step`` is the mean time of the training steps so far and ``t_measure`` the mean of
the last measurements (the first, which includes one-off set-up, is left out once there are
others). Measurements are dense early in a run (every 10 steps up to 200, then every 100 by
default), so ``elapsed / fraction done`` overestimates early on (10–16× on the default job).
"""

from __future__ import annotations

import bisect
import sys
import time
from collections.abc import Callable, Iterable
from typing import TextIO

__all__ = ["Progress"]


# metrics column, title, format: what a measurement line shows
_SHOWN = (("train/loss", "loss", "{:.4f}"), ("hessian/f_top", "f_top", "{:.3f}"),
          ("hessian/overlap_g_Hg", "overlap(g,Hg)", "{:.3f}"), ("hessian/eig_1", "λ1", "{:.4g}"))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Reports steps done, ETA and the last measurement.

    On a terminal the line is redrawn in place; elsewhere (CI logs, files) a line is printed
    at most every ``every_seconds``.
    """

    def __init__(self, stream: TextIO | None = None, every_seconds: float = 10.0,
                 width: int = 24, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.width, self.clock = every_seconds, width, clock
        self.total = self.first = self.done = 0
        self.started = self.last_print = self.last_event = 0.0
        self.latest = ""
        self.schedule: list[int] = []
        self.last_measured = -1
        self.step_times: list[float] = []
        self.measure_times: list[float] = []

    def start(self, total: int, first: int = 0, schedule: Iterable[int] = ()) -> None:
        """Begin at step ``first`` of ``total``; ``schedule``: the steps that are measured (a
        resumed run, ``first > 0``, has measured ``first`` already)."""
        self.total, self.first, self.done = total, first, first
        self.schedule = sorted(int(s) for s in schedule)
        self.last_measured = first if first > 0 else -1
        self.started = self.last_print = self.last_event = self.clock()
        self._draw(force=True)

    def _lap(self) -> float:
        now = self.clock()
        lap, self.last_event = now - self.last_event, now
        return lap

    def step(self, done: int, loss: float) -> None:
        """Training step ``done - 1`` finished (its time counts as one step's cost)."""
        self.step_times.append(self._lap())
        self.done = done
        self._draw()

    def measured(self, row: dict[str, float | None]) -> None:
        """Show the loss, ``f_top``, overlap(g, Hg) and ``λ_1`` of a metrics row (those it has)."""
        self.measure_times.append(self._lap())
        self.last_measured = int(row["step"])
        shown = "  ".join(f"{title} {fmt.format(float(row[key]))}" for key, title, fmt in _SHOWN
                          if row.get(key) is not None)
        self.latest = f"step {int(row['step'])}: {shown}"
        self._draw(force=not self.interactive)

    def eta(self) -> float:
        """Seconds left: steps and scheduled measurements left at their measured mean costs
        (NaN while a cost that is still needed has not been measured)."""
        steps_left = max(self.total - self.done, 0)
        measurements_left = len(self.schedule) - bisect.bisect_right(self.schedule,
                                                                     self.last_measured)
        eta = 0.0
        if steps_left:
            if not self.step_times:
                return float("nan")
            eta += steps_left * sum(self.step_times) / len(self.step_times)
        if measurements_left:
            recent = self.measure_times[1:][-5:] or self.measure_times
            if not recent:
                return float("nan")
            eta += measurements_left * sum(recent) / len(recent)
        return eta

    def message(self, text: str) -> None:
        self._newline()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._draw(force=True)
        self._newline()

    def _newline(self) -> None:
        if self.interactive:
            print(file=self.stream, flush=True)

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and not self.interactive and now - self.last_print < self.every:
            return
        if not force and self.interactive and now - self.last_print < 0.1:
            return
        self.last_print = now
        span = max(self.total - self.first, 1)
        fraction = min(max((self.done - self.first) / span, 0.0), 1.0)
        elapsed = now - self.started
        eta = self.eta()
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = _duration(eta) if eta == eta else "?"
        line = (f"[{bar}] {self.done}/{self.total} steps  {_duration(elapsed)} elapsed, "
                f"ETA {eta_text}  | {self.latest}")
        if self.interactive:
            print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
