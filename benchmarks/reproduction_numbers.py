"""The key numbers of docs/reproduction.md, read from run folders (nothing is trained here).

    python benchmarks/reproduction_numbers.py RUN_OR_FOLDER [...]

For each run: the final loss and accuracy; Fig. 1's f_top (eq. 2) at steps 0, 50, 100, 200,
400 and the last; Fig. 2's subspace overlap (eq. 5) of the top-k and next-k subspaces from
t1 = 0, 50, 100, 200, 400 to the last measurement; Fig. 3's overlap averaged over t2 - t1
(trapezoid rule, ``plots.common.interval_mean``) for t1 = 100 by subspace dimension d; Fig. 8's
lambda_1 (peak and last); Fig. 11's sums of c_i^2 at steps 0 and 50; Table 1's means
(``results.table1.run_overlap``); the stored spectrum (Figs. 4, 5): the top eigenvalues and the
index of the largest gap lambda_i / lambda_{i+1} among the top 30 (how many are "large").
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from tinysubspace.plots.arrays import top_eigenvector
from tinysubspace.plots.common import interval_mean, series
from tinysubspace.results.store import Run, load_run
from tinysubspace.results.table1 import run_overlap, table1_row_id


def _at(run: Run, column: str, step: int) -> float:
    """The value of ``column`` at the measured step nearest ``step`` (NaN: not measured)."""
    if column not in run.metrics:
        return math.nan
    steps, values = series(run, column)
    return float(values[np.argmin(np.abs(steps - step))]) if steps.size else math.nan


def _line(label: str, pairs: list[tuple[object, float]]) -> str:
    return label + ": " + ", ".join(f"{k} {v:.3f}" for k, v in pairs if np.isfinite(v))


def _fig1(run: Run, last: int) -> str:
    pairs = [(s, _at(run, "hessian/f_top", s)) for s in (0, 50, 100, 200, 400)]
    steps, f_top = series(run, "hessian/f_top")
    low = f_top[(steps >= 10) & (steps <= 100)]
    text = _line("Fig. 1 f_top at step", [*pairs, (f"{last} (last)", f_top[-1])])
    return text + (f"; min over steps 10-100 {low.min():.3f}" if low.size else "")


def _fig2(run: Run) -> list[str]:
    lines = []
    for kind in ("top", "next"):
        pairs = [(f"t1={t1}", _at(run, f"overlap/{kind}/t1={t1}", 10**9))
                 for t1 in (0, 50, 100, 200, 400)]
        lines.append(_line(f"Fig. 2 overlap of the {kind}-k subspace, t1 to the last", pairs))
    return lines


def _fig3(run: Run, t1: int = 100) -> str:
    pairs = []
    for d in range(1, 21):
        column = f"overlap/d={d}/t1={t1}"
        if column in run.metrics:
            pairs.append((f"d={d}", interval_mean(*series(run, column, since=t1), t1)))
    return _line(f"Fig. 3 overlap averaged over t2 - t1, t1 = {t1}", pairs)


def _fig8_11(run: Run) -> list[str]:
    lines = []
    steps, lam = series(run, "hessian/eig_1")
    if lam.size:
        i = int(np.argmax(lam))
        lines.append(f"Fig. 8 lambda_1: {lam[0]:.3f} at step 0, peak {lam[i]:.3f} at step "
                     f"{int(steps[i])}, {lam[-1]:.3f} at the last step")
    for step in (0, 50):
        c2 = [_at(run, f"hessian/c2_{i}", step) for i in range(1, 21)]
        if np.isfinite(c2).all():
            lines.append(f"Fig. 11 step {step}: sum c2_1..20 {sum(c2):.2f}, c2_1..10 "
                         f"{sum(c2[:10]):.2f}, c2_11..20 {sum(c2[10:]):.2f}")
    return lines


def _fig6(run: Run) -> str | None:
    """Mean |v_1| on the top layer's weights over the mean on layer 1's (paper: "only ~4x")."""
    pairs = []
    for step in run.eigenvector_steps:
        v, groups = top_eigenvector(run, step)
        mean = {g.label: float(np.abs(v[g.start:g.stop]).mean()) for g in groups}
        if "top layer weights" in mean and "layer 1 weights" in mean:
            pairs.append((f"step {step}", mean["top layer weights"] / mean["layer 1 weights"]))
    return _line("Fig. 6 mean |v_1| top-layer weights / layer-1 weights", pairs) if pairs else None


def _table1(run: Run) -> str | None:
    try:
        o = run_overlap(run, 1000)
    except ValueError:
        return None
    parts = [f"{name} {m.value:.3f} (steps {m.first_step}-{m.last_step}, {m.count} values)"
             for name, m in (("full data", o.full), ("mini-batch", o.minibatch),
                             ("test", o.test)) if m is not None]
    return f"Table 1 [{table1_row_id(run) or 'no row'}]: " + "; ".join(parts)


def _spectrum(run: Run) -> list[str]:
    spectrum = run.spectrum() if hasattr(run, "spectrum") else None
    lines = []
    for key in ("eigenvalues", "top_eigenvalues"):
        if spectrum is None or key not in spectrum:
            continue
        values = np.sort(np.asarray(spectrum[key], dtype=float))[::-1]
        top = values[:31]
        ratios = top[:-1] / np.where(top[1:] > 0, top[1:], np.nan)
        gap = int(np.nanargmax(ratios)) + 1
        lines.append(f"spectrum ({key}, {values.size} values): top 12 {np.round(top[:12], 4)}; "
                     f"largest gap among the top 30 after lambda_{gap} "
                     f"(lambda_{gap}/lambda_{gap + 1} = {ratios[gap - 1]:.2f}); "
                     f"{int((values < 0).sum())} negative, min {values.min():.3g}")
    if spectrum is not None and "nodes" in spectrum:
        nodes = np.asarray(spectrum["nodes"], dtype=float)
        lines.append(f"SLQ: {nodes.shape[0]} probes x {nodes.shape[1]} nodes, Ritz values in "
                     f"[{nodes.min():.3g}, {nodes.max():.3g}]")
    return lines


def key_numbers(path: str) -> list[str]:
    """Every line above that the run has data for."""
    run = load_run(path)
    steps, loss = series(run, "train/loss")
    lines = [f"== {path}: {int(steps[-1])} steps, final train loss {loss[-1]:.4f}, accuracy "
             f"{_at(run, 'train/accuracy', int(steps[-1])):.3f}"]
    if "hessian/f_top" in run.metrics:
        lines += [_fig1(run, int(steps[-1])), *_fig2(run), _fig3(run), *_fig8_11(run)]
    lines += [line for line in (_fig6(run), _table1(run)) if line] + _spectrum(run)
    return [line for line in lines if not line.endswith(": ")]


def run_folders(paths: list[str]) -> list[str]:
    """The run folders among ``paths`` and their immediate subfolders (those with config.json)."""
    found = []
    for path in map(Path, paths):
        if (path / "config.json").exists():
            found.append(str(path))
        elif path.is_dir():
            found += sorted(str(p) for p in path.iterdir() if (p / "config.json").exists())
    return found


if __name__ == "__main__":
    for folder in run_folders(sys.argv[1:]):
        print("\n".join(key_numbers(folder)))
