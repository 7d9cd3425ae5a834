"""Progress of a long run on a terminal: a bar with ETA, and the latest measurement."""

from __future__ import annotations

import sys
import time
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
                 width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.width = every_seconds, width
        self.total = self.first = self.done = 0
        self.started = self.last_print = 0.0
        self.latest = ""

    def start(self, total: int, first: int = 0) -> None:
        self.total, self.first, self.done = total, first, first
        self.started = self.last_print = time.perf_counter()
        self._draw(force=True)

    def step(self, done: int, loss: float) -> None:
        self.done = done
        self._draw()

    def measured(self, row: dict[str, float | None]) -> None:
        """Show the loss, ``f_top``, overlap(g, Hg) and ``λ_1`` of a metrics row (those it has)."""
        shown = "  ".join(f"{title} {fmt.format(float(row[key]))}" for key, title, fmt in _SHOWN
                          if row.get(key) is not None)
        self.latest = f"step {int(row['step'])}: {shown}"
        self._draw(force=not self.interactive)

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
        now = time.perf_counter()
        if not force and not self.interactive and now - self.last_print < self.every:
            return
        if not force and self.interactive and now - self.last_print < 0.1:
            return
        self.last_print = now
        span = max(self.total - self.first, 1)
        fraction = min(max((self.done - self.first) / span, 0.0), 1.0)
        elapsed = now - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else float("nan")
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = _duration(eta) if eta == eta else "?"
        line = (f"[{bar}] {self.done}/{self.total} steps  {_duration(elapsed)} elapsed, "
                f"ETA {eta_text}  | {self.latest}")
        if self.interactive:
            print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
