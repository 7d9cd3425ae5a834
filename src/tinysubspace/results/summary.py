"""A plain-text table of a run's measurements over time (printed at the end of a run), and its
Table 1 means where it measured the full-data overlap at every step (``full_overlap.csv``)."""

from __future__ import annotations

import math

from tinysubspace.results.store import Run
from tinysubspace.results.table1 import (
    FULL_OVERLAP_FILE,
    TABLE1_ROWS,
    full_data_steps,
    run_overlap,
    table1_row_id,
)
from tinysubspace.results.window import short_run_warning, window_text

__all__ = ["summary_table", "table1_line", "thread_counts_note"]


def _columns(k: int) -> list[tuple[str, str, str]]:
    """``(metrics column, title, format)`` of the table: ``λ_1, λ_2, λ_k, λ_{k+1}``."""
    eigen = dict.fromkeys([1, 2, k, k + 1])
    return [("step", "step", "{:.0f}"), ("train/loss", "loss", "{:.4f}"),
            ("train/accuracy", "acc", "{:.3f}"), ("hessian/f_top", "f_top", "{:.3f}"),
            ("hessian/overlap_g_Hg", "overlap(g,Hg)", "{:+.3f}"),
            *((f"hessian/eig_{i}", f"λ{i}", "{:.4g}") for i in eigen),
            ("cost/matvecs", "matvecs", "{:.0f}"), ("cost/seconds", "seconds", "{:.2f}")]


def summary_table(run: Run, max_rows: int = 30) -> str:
    """f_top, overlap(g, Hg) and the eigenvalues ``λ_1, λ_2, λ_k, λ_{k+1}`` (``k``: the run's
    ``tracker.k``, 10 if unset) over time, as an aligned text table; columns the run lacks are
    left out.

    At most ``max_rows`` rows, evenly spread over the run (the first and last always shown);
    a line under the table says how many of how many when rows are left out.

    Raises:
        ValueError: ``max_rows < 2``.
    """
    if max_rows < 2:
        raise ValueError(f"max_rows must be at least 2 (the first and last rows), got {max_rows}")
    table = run.metrics
    if table.empty:
        return "(no measurements)"
    k = int((run.config.get("tracker") or {}).get("k") or 10)
    columns = [(key, title, fmt) for key, title, fmt in _columns(k) if key in table.columns]
    picks = list(range(len(table)))
    if len(picks) > max_rows:
        stride = (len(picks) - 1) / (max_rows - 1)
        picks = sorted({round(i * stride) for i in range(max_rows)})
    cells = [[title for _, title, _ in columns]]
    for i in picks:
        row = table.iloc[i]
        cells.append([_cell(row[key], fmt) for key, _, fmt in columns])
    widths = [max(len(line[j]) for line in cells) for j in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(picks) < len(table):
        lines.append(f"({len(picks)} of {len(table)} measurements shown, evenly spread; all "
                     f"are in {run.path / 'metrics.csv'})")
    extra = table1_line(run)
    return "\n".join(lines + ([] if extra is None else ["", extra]))


def table1_line(run: Run, last_n: int = 1000) -> str | None:
    """``Table 1 (mean over the last N steps): full data 0.960 (every step), mini-batch 0.915,
    test 0.951; paper 0.96 (softmax-mnist)`` — ``None`` for a run without ``full_overlap.csv``.
    A run shorter than ``N`` steps says which steps were averaged, with a warning line."""
    if not (run.path / FULL_OVERLAP_FILE).exists():
        return None
    ours = run_overlap(run, last_n)
    parts = [f"{name} {'-' if mean is None else f'{mean.value:.3f}'}" for name, mean in
             (("full data", ours.full), ("mini-batch", ours.minibatch), ("test", ours.test))]
    parts[0] += f" ({full_data_steps(ours)})" if ours.every_step else " (measurements only)"
    row = next((r for r in TABLE1_ROWS if r.row_id == table1_row_id(run)), None)
    paper = f"; paper {row.paper:.2f} ({row.row_id})" if row else ""
    window = ours.full or ours.minibatch
    over = window_text(window, last_n)
    over = f"the {over}" if over.startswith("last") else over
    line = f"Table 1 (mean over {over}): {', '.join(parts)}{paper}"
    warning = short_run_warning(window, last_n)
    return line if warning is None else f"{line}\nwarning: {warning}"


def _cell(value: float, fmt: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "-" if math.isnan(number) else fmt.format(number)


def thread_counts_note(runs: list[Run]) -> str | None:
    """A note when ``runs`` were made with different torch thread counts (``meta.threads`` of
    their config.json; ``None``: all the same, or not recorded).

    The default count is the free cores at launch, so one command launched twice can differ;
    the order of floating-point sums changes with it, and with it the last digits of every
    number (two launches differed by 1e-7 in f_top and 0.013 in the next-10 overlap, where
    eigenvalues are close).
    """
    counts = {str(run.path): (run.config.get("meta") or {}).get("threads") for run in runs}
    known = {path: n for path, n in counts.items() if n is not None}
    if len(set(known.values())) < 2:
        return None
    listed = ", ".join(f"{path}: {n}" for path, n in known.items())
    return (f"these runs used different torch thread counts ({listed}; meta.threads in "
            "config.json): the order of floating-point sums differs, so their numbers differ "
            "in the last digits (more where eigenvalues are close); to compare them exactly, "
            "run each with the same --threads N")
