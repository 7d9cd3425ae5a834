"""Figures of per-block curvature (issue 14), drawn from run folders only: the blocks' spectral
densities side by side, block sharpness over steps, and the block-heterogeneity score of runs
next to each other.

They read what ``tinysubspace blocks RUN`` stored (``RUN/blocks/step_*.npz`` and
``RUN/blocks.csv``, :mod:`tinysubspace.experiments.block_runs`) and, for sharpness over steps,
the tracker's ``block/NAME/eig_1`` columns of ``metrics.csv`` when the run has them. Each
function returns a pyplot-free figure with the plotted arrays attached (:func:`plotted_data`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from tinysubspace.linalg.blocks import block_heterogeneity, top_scales
from tinysubspace.linalg.density import SpectralDensity, broadened_density, density_grid
from tinysubspace.plots.common import (
    MissingDataError,
    RunLike,
    as_run,
    finish,
    new_figure,
    plotted_data,
    run_label,
)

__all__ = [
    "block_steps",
    "figure_block_densities",
    "figure_block_heterogeneity",
    "figure_block_sharpness",
    "load_blocks",
    "plotted_data",
    "stored_heterogeneity",
]

BLOCKS_DIR, BLOCKS_CSV = "blocks", "blocks.csv"  # as experiments.block_runs writes them


def block_steps(run: RunLike) -> list[int]:
    """Steps with stored block spectra (``blocks/step_*.npz``)."""
    folder = Path(as_run(run).path) / BLOCKS_DIR
    return sorted(int(f.stem.split("_")[1]) for f in folder.glob("step_*.npz"))


def load_blocks(run: RunLike, step: int) -> dict[str, Any]:
    """The stored block spectra at ``step``: the ``.npz`` arrays plus ``densities``, a list of
    ``(nodes, weights)`` per block.

    Raises:
        MissingDataError: nothing stored at ``step``.
    """
    run = as_run(run)
    path = Path(run.path) / BLOCKS_DIR / f"step_{step:08d}.npz"
    if not path.exists():
        raise MissingDataError(f"no block spectra at step {step} in {run.path} (stored: "
                               f"{block_steps(run)}); measure them with `tinysubspace blocks "
                               f"{run.path}`")
    with np.load(path) as arrays:
        data = {key: arrays[key] for key in arrays.files}
    off = data["offsets"]
    data["densities"] = [(data["nodes"][a:b], data["weights"][a:b])
                         for a, b in itertools.pairwise(off)]
    return data


def stored_heterogeneity(blocks: dict[str, Any], normalized: bool = False) -> float:
    """The raw or normalised heterogeneity score of stored block spectra (:func:`load_blocks`):
    as stored, or recomputed from the stored densities and top eigenvalues (files written
    before the normalised score existed)."""
    key = "heterogeneity_normalized" if normalized else "heterogeneity"
    if key in blocks:
        return float(blocks[key])
    densities = [SpectralDensity(torch.from_numpy(n)[None], torch.from_numpy(w)[None], int(p),
                                 str(kind), None)
                 for (n, w), p, kind in zip(blocks["densities"], blocks["sizes"],
                                            blocks["probes"], strict=True)]
    scales = top_scales(blocks["eigenvalues"][:, 0].tolist()) if normalized else None
    return block_heterogeneity(densities, scales=scales)


def _density(nodes: np.ndarray, weights: np.ndarray, points: int) -> tuple[np.ndarray, ...]:
    """The density broadened by 2% of its own span, on its own grid."""
    x, w = torch.from_numpy(nodes), torch.from_numpy(weights)
    span = float(x.max() - x.min())
    sigma = 0.02 * span if span > 0 else max(1e-3, 0.02 * abs(float(x.max())))
    grid = density_grid(x, sigma, points)
    return grid.numpy(), broadened_density(x, w, grid, sigma).numpy()


def figure_block_densities(run: RunLike, steps: Sequence[int] | None = None,
                           points: int = 400, columns: int = 4) -> Figure:
    """The spectral density of every block side by side (one panel per block, log scale), at
    each stored step (default: all; solid the first, dashed the later ones).

    Plotted data: ``{(block, step): (grid, density)}``.

    Raises:
        MissingDataError: no block spectra stored.
    """
    run = as_run(run)
    steps = list(steps) if steps is not None else block_steps(run)
    if not steps:
        raise MissingDataError(f"{run.path} has no block spectra; run `tinysubspace blocks "
                               f"{run.path}` first")
    stored = [load_blocks(run, s) for s in steps]
    names = [str(n) for n in stored[0]["names"]]
    rows = -(-len(names) // columns)
    figure, axes = new_figure(len(names), width=3.0, height=2.3, rows=rows)
    data: dict[Any, Any] = {}
    for i, (name, ax) in enumerate(zip(names, axes, strict=True)):
        for j, (step, blocks) in enumerate(zip(steps, stored, strict=True)):
            grid, values = _density(*blocks["densities"][i], points)
            data[(name, step)] = (grid, values)
            ax.semilogy(grid, np.maximum(values, 1e-12), "-" if j == 0 else "--", lw=1,
                        label=f"step {step}")
        ax.set_title(f"{name} (p={int(stored[0]['sizes'][i])})", fontsize=8)
        ax.set_xlabel(r"eigenvalue $\lambda$ of the block's Hessian", fontsize=7)
        ax.set_ylabel("spectral density (log)" if i % columns == 0 else "", fontsize=7)
        ax.set_ylim(bottom=1e-6)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    h = ", ".join(f"step {s}: {float(b['heterogeneity']):.3f}" for s, b in
                  zip(steps, stored, strict=True))
    figure.suptitle(f"{run_label(run)} — block Hessian densities; heterogeneity {h}",
                    fontsize=9)
    return finish(figure, data)


def _sharpness_table(run) -> pd.DataFrame:
    """``step`` and ``block/NAME/eig_1`` columns: the tracker's, else ``blocks.csv``."""
    columns = [c for c in run.metrics.columns if str(c).startswith("block/")
               and str(c).endswith("/eig_1")]
    if columns and not run.metrics[columns].dropna(how="all").empty:
        return run.metrics[["step", *columns]].dropna(how="all", subset=columns)
    path = Path(run.path) / BLOCKS_CSV
    if not path.exists():
        raise MissingDataError(f"{run.path} has no block sharpness: neither block/NAME/eig_1 "
                               f"columns in metrics.csv nor {BLOCKS_CSV}")
    table = pd.read_csv(path)
    return table[["step", *[c for c in table.columns if c.endswith("/eig_1")]]]


def figure_block_sharpness(run: RunLike) -> Figure:
    """``λ_1`` of every block's Hessian over training steps (log scale).

    Plotted data: ``{block: (steps, values)}``.

    Raises:
        MissingDataError: the run has no block measurements.
    """
    run = as_run(run)
    table = _sharpness_table(run)
    figure, (ax,) = new_figure(1, width=6.0, height=4.0)
    data = {}
    for column in table.columns[1:]:
        name = column[len("block/"):-len("/eig_1")]
        rows = table[["step", column]].dropna()
        steps, values = rows["step"].to_numpy(float), rows[column].to_numpy(float)
        data[name] = (steps, values)
        ax.semilogy(steps, np.abs(values), "o-", ms=3, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("block sharpness |λ₁(H_bb)|")
    ax.set_title(f"{run_label(run)} — block sharpness", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return finish(figure, data)


def figure_block_heterogeneity(runs: Sequence[RunLike],
                               labels: Sequence[str] | None = None) -> Figure:
    """The block-heterogeneity score of each run, raw (left) and normalised (right), at its
    first and last stored step (bars), e.g. the GPT next to the FC net and the ConvNet.

    Plotted data: ``{"raw" | "normalized": {label: {step: score}}}``.

    Raises:
        MissingDataError: a run without block spectra.
    """
    runs = [as_run(r) for r in runs]
    labels = list(labels) if labels is not None else [run_label(r) for r in runs]
    data: dict[str, dict[str, dict[int, float]]] = {"raw": {}, "normalized": {}}
    for run, label in zip(runs, labels, strict=True):
        steps = block_steps(run)
        if not steps:
            raise MissingDataError(f"{run.path} has no block spectra")
        stored = {s: load_blocks(run, s) for s in steps}
        for kind in data:
            data[kind][label] = {s: stored_heterogeneity(b, kind == "normalized")
                                 for s, b in stored.items()}
    figure, axes = new_figure(2, width=1.6 + 1.4 * len(runs), height=3.6)
    x = np.arange(len(runs))
    for ax, (kind, scores) in zip(axes, data.items(), strict=True):
        first = [scores[label][min(scores[label])] for label in labels]
        last = [scores[label][max(scores[label])] for label in labels]
        ax.bar(x - 0.2, first, 0.4, label="first stored step (init)")
        ax.bar(x + 0.2, last, 0.4, label="last stored step (trained)")
        ax.set_xticks(x, labels, rotation=20, fontsize=7, ha="right")
        ax.set_title(f"{kind} spectra", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("mean JS distance between block densities")
    axes[0].legend(fontsize=7)
    return finish(figure, data)
