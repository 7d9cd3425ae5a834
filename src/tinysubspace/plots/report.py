"""One self-contained HTML page per run: every figure it has data for (base64 PNG), a summary
of its metrics, its Table 1 value where it belongs to a row, and its resolved config. The page
loads nothing from outside (no scripts, fonts or links), so it reads offline."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tinysubspace.plots.common import RunLike, as_run, run_label
from tinysubspace.plots.figures import (
    DEFAULT_FIGURES,
    FIGURES,
    OVER_TIME,
    MissingDataError,
    too_few_measurements,
)
from tinysubspace.results.folder import flatten_config
from tinysubspace.results.key_numbers import key_numbers
from tinysubspace.results.store import Run
from tinysubspace.results.table1 import TABLE1_ROWS, run_overlap, table1_row_id
from tinysubspace.results.window import short_run_warning, window_text

__all__ = ["flatten_config", "metrics_summary", "render_report", "write_report"]

SUMMARY_COLUMNS = ("train/loss", "train/accuracy", "hessian/f_top", "hessian/f_next",
                   "hessian/overlap_g_Hg", "hessian/eig_1", "hessian/residual_max",
                   "test/loss", "test/accuracy", "test/f_top", "test/overlap_g_Hg",
                   "cost/matvecs", "cost/seconds")
MISSING = "—"  # one mark for a value not measured (a NaN reads the same)

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}
td.n{text-align:right;font-family:monospace}figure{margin:2em 0}img{max-width:100%}
figcaption{color:#555;font-size:90%}.skip{color:#888}.warn{color:#a40}"""


def metrics_summary(run: Run) -> list[dict[str, Any]]:
    """First, last, minimum and maximum of the main ``metrics.csv`` columns the run has."""
    rows = []
    for column in SUMMARY_COLUMNS:
        if column in run.metrics and run.metrics[column].notna().any():
            values = run.metrics[["step", column]].dropna()
            rows.append({"quantity": column, "first": values[column].iloc[0],
                         "last": values[column].iloc[-1], "min": values[column].min(),
                         "max": values[column].max(),
                         "steps": f"{int(values['step'].iloc[0])}–{int(values['step'].iloc[-1])}"})
    return rows


def _png(figure: Figure, dpi: int) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class=skip>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(
        f"<td class=n>{_value(v)}</td>" if isinstance(v, (int, float)) else f"<td>{_value(v)}</td>"
        for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table1_section(run: Run, last_n: int = 1000) -> str:
    """Table 1's means of this run, beside the paper's value if it is a row, and the run's key
    numbers beside the paper's (:func:`~tinysubspace.results.key_numbers.key_numbers`)."""
    row_id = table1_row_id(run)
    row = next((r for r in TABLE1_ROWS if r.row_id == row_id), None)
    try:
        ours = run_overlap(run, last_n)
    except ValueError as error:
        title = f"<h2>Table 1: mean overlap(g, Hg), last {last_n} steps</h2>"
        return f"{title}<p class=skip>{html.escape(str(error))}</p>"
    window = ours.full or ours.minibatch
    title = f"<h2>Table 1: mean overlap(g, Hg), {html.escape(window_text(window, last_n))}</h2>"
    warning = short_run_warning(window, last_n, "the mean")
    if warning is not None:
        title += f"<p class=warn>Warning: {html.escape(warning)}.</p>"

    def cell(mean: Any) -> Any:
        return mean.value if mean is not None else MISSING

    def window(mean: Any) -> str:
        return MISSING if mean is None else (f"{mean.source}, steps {mean.first_step}–"
                                         f"{mean.last_step} ({mean.count} values)")

    cells = {"row": row.row_id if row else "(none: no table1_row)",
             "setting": f"{row.dataset} {row.model} {row.comment}".strip() if row else "",
             "paper": row.paper if row else MISSING, "ours: full data": cell(ours.full),
             "ours: mini-batch": cell(ours.minibatch), "ours: test set": cell(ours.test)}
    sources = [{"column": name, "averaged": window(mean), "function": function}
               for name, mean, function in (
                   ("full data (the paper's)", ours.full, ours.functions["full"]),
                   ("mini-batch", ours.minibatch, ours.functions["minibatch"]),
                   ("test set", ours.test, ours.functions["full"]))]
    same = ("the same function in both modes (no dropout or batch norm)"
            if ours.functions["same"] == "yes" else
            f"different functions: the model has {ours.functions['random_parts']}")
    numbers = [{"quantity": n.quantity, "ours": n.ours, "paper": n.paper, "where": n.where}
               for n in key_numbers(run, last_n)]
    return (f"<div id=table1>{title}{_table([cells])}</div>{_table(sources)}"
            f"<p>Mini-batch and full data measure {html.escape(same)}.</p>"
            "<div id=key-numbers><h2>Key numbers beside the paper's</h2>"
            f"{_table(numbers)}</div>")


def render_report(run: RunLike, figures: Sequence[str] = DEFAULT_FIGURES, dpi: int = 90) -> str:
    """The HTML page of ``run`` as a string (figures without data are listed as skipped)."""
    run = as_run(run)
    parts = ["<h2>Figures</h2>"]
    few = too_few_measurements(run)
    if few is not None:  # a message, not empty panels
        parts.append(f"<p class=skip>Figures over training are not drawn: {html.escape(few)}"
                     "</p>")
        figures = [key for key in figures if key not in OVER_TIME]
    for key in figures:
        spec = FIGURES[key]
        try:
            figure = spec.draw(run)
        except MissingDataError as error:
            parts.append(f"<p class=skip>{html.escape(spec.caption)} — not drawn: "
                         f"{html.escape(str(error))}</p>")
            continue
        parts.append(f'<figure><img alt="{html.escape(spec.name)}" '
                     f'src="data:image/png;base64,{_png(figure, dpi)}">'
                     f"<figcaption>{html.escape(spec.caption)}</figcaption></figure>")
    title = html.escape(run_label(run))
    status = run.status or {}
    header = (f"<h1>{title}</h1><p>{html.escape(str(run.config.get('description', '')))}</p>"
              f"<p>Run folder: <code>{html.escape(str(run.path))}</code>; status: "
              f"{html.escape(str(status.get('state', 'unknown')))} at step "
              f"{html.escape(str(status.get('step', '?')))}; {len(run.metrics)} measurements, "
              f"{len(run.minibatch)} mini-batch rows.</p>")
    config_rows = [{"key": k, "value": v} for k, v in flatten_config(run.config).items()]
    return ("<!DOCTYPE html><html><head><meta charset=utf-8>"
            f"<title>{title} — tinysubspace</title><style>{_STYLE}</style></head><body>"
            + header + "<h2>Metrics</h2>" + _table(metrics_summary(run)) + _table1_section(run)
            + "".join(parts) + "<h2>Config</h2>" + _table(config_rows) + "</body></html>")


def write_report(run: RunLike, path: str | Path | None = None, dpi: int = 90) -> Path:
    """Write :func:`render_report` to ``path`` (default ``RUN/report.html``); returns the path."""
    run = as_run(run)
    target = Path(path) if path is not None else Path(run.path) / "report.html"
    target.write_text(render_report(run, dpi=dpi), encoding="utf-8")
    return target
