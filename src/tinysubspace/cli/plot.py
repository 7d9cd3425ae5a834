"""``tinysubspace plot RUN [RUN ...] [--figure N]``: the paper's figures of saved runs, as PNG
(and PDF with ``--pdf``) in ``RUN/figures/`` (or ``--out``); the block figures (issue 14) of runs
with block spectra (``tinysubspace blocks``) or ``block/NAME/eig_1`` columns, and with
``--heterogeneity`` the block-heterogeneity scores of all RUNs side by side. Reads runs only;
never trains."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from tinysubspace.plots.blocks import (
    block_steps,
    figure_block_densities,
    figure_block_heterogeneity,
    figure_block_sharpness,
)
from tinysubspace.plots.common import as_run
from tinysubspace.plots.eos import figure_sharpness
from tinysubspace.plots.figures import (
    DEFAULT_FIGURES,
    FIGURES,
    OVER_TIME,
    MissingDataError,
    figure_f_top,
    figure_filename,
    too_few_measurements,
)
from tinysubspace.plots.ggn import figure_outliers
from tinysubspace.results.store import Run, RunStoreError

# Issue 14's figures of one run: key -> (file stem, function); drawn by default when the run has
# block data.
BLOCK_FIGURES = {"blocks": ("block_densities", figure_block_densities),
                 "block-sharpness": ("block_sharpness", figure_block_sharpness),
                 # issue 15: runs with the tracker's optimizer= / ggn= columns (or the drivers')
                 "sharpness": ("sharpness", lambda run: figure_sharpness(run)),
                 "outliers": ("outliers", lambda run: figure_outliers(run))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tinysubspace plot``."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    parser.add_argument("--figure", "-f", action="append",
                        choices=[*FIGURES, *BLOCK_FIGURES], metavar="N",
                        help="figure of the paper to draw: 1-12, or 'overlap' (Table 1's "
                             "overlap(g, Hg) over training), 'blocks' (block densities), "
                             "'block-sharpness', 'sharpness' (lambda_max against the "
                             "optimizer's threshold), 'outliers' (H against the GGN and the "
                             "class means); repeatable (default: every figure the run "
                             "has data for)")
    parser.add_argument("--heterogeneity", action="store_true",
                        help="draw the block-heterogeneity scores of every RUN side by side")
    parser.add_argument("--overlay", action="store_true",
                        help="draw Fig. 1/12 once with every RUN overlaid (variants)")
    parser.add_argument("--pdf", action="store_true", help="also write PDF files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN/figures)")
    parser.add_argument("--dpi", type=int, default=150)


class FigureWriteError(OSError):
    """The figures' folder cannot be written (the message says to choose one with ``--out``)."""


def _save(figure: Figure, stem: Path, pdf: bool, dpi: int) -> list[Path]:
    """Write ``stem.png`` (and ``stem.pdf``); returns the paths written.

    Raises:
        FigureWriteError: the folder cannot be made or written (a read-only run folder, say).
    """
    paths = [stem.with_suffix(".png")] + ([stem.with_suffix(".pdf")] if pdf else [])
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        for path in paths:
            figure.savefig(path, dpi=dpi)
    except OSError as error:
        raise FigureWriteError(
            f"cannot write the figures in {stem.parent} ({error.strerror or error}); use --out "
            "DIR to write them in another folder") from None
    return paths


def main(args: argparse.Namespace) -> int:
    """Draw and save the figures; 0: done, 1: an asked-for figure had no data, 2: not a run,
    or a folder the figures cannot be written in."""
    try:
        runs = [as_run(path) for path in args.runs]
        return _draw(runs, args)
    except (RunStoreError, FigureWriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _draw(runs: list[Run], args: argparse.Namespace) -> int:
    """Draw and save the figures of loaded ``runs``; the exit status of :func:`main`."""
    if args.heterogeneity:
        return _many_runs(figure_block_heterogeneity, "block heterogeneity",
                          "blocks_heterogeneity", runs, args)
    if args.overlay:
        return _many_runs(_overlay, "Fig. 12 (overlay)", "fig12_f_top_overlay", runs, args)
    explicit = bool(args.figure)
    status = 0
    for run in runs:
        out = args.out or Path(run.path) / "figures"
        few = too_few_measurements(run)
        if few is not None:
            print(f"note: {few}; figures over training are not drawn", file=sys.stderr)
        for key in dict.fromkeys(args.figure or _defaults(run)):
            if few is not None and key in OVER_TIME:
                print(f"{'error' if explicit else 'skipped'}: Fig. {key}: too few measurements "
                      "(see the note above)", file=sys.stderr)
                status = 1 if explicit else status
                continue
            try:
                figure = BLOCK_FIGURES[key][1](run) if key in BLOCK_FIGURES else \
                    FIGURES[key].draw(run)
            except MissingDataError as error:
                print(f"{'error' if explicit else 'skipped'}: Fig. {key}: {error}",
                      file=sys.stderr)
                status = 1 if explicit else status
                continue
            stem = BLOCK_FIGURES[key][0] if key in BLOCK_FIGURES else figure_filename(key)
            for path in _save(figure, out / stem, args.pdf, args.dpi):
                print(path)
    return status


def _defaults(run: Run) -> tuple[str, ...]:
    """The paper's figures, and the block, sharpness and outlier figures where the run has
    their data."""
    columns = run.metrics.columns
    tracked = any(str(c).startswith("block/") for c in columns)
    stored = bool(block_steps(run))
    return (*DEFAULT_FIGURES, *(["blocks"] if stored else []),
            *(["block-sharpness"] if stored or tracked else []),
            *(["sharpness"] if "sharpness/threshold" in columns else []),
            *(["outliers"] if "overlap/hessian_ggn" in columns else []))


def _overlay(runs: list[Run]) -> Figure:
    """Fig. 12: every run's f_top in one panel; each run needs two measurements or more."""
    figure = figure_f_top(runs)
    for run in runs:
        if (why := too_few_measurements(run)) is not None:
            raise MissingDataError(why)
    return figure


def _many_runs(draw: Callable[[list[Run]], Figure], what: str, stem: str, runs: list[Run],
               args: argparse.Namespace) -> int:
    """One figure of all ``runs`` (``draw(runs)``), saved as ``stem`` in ``--out`` (default:
    the first run's ``figures/``); a run without the data is an error naming ``what``."""
    try:
        figure = draw(runs)
    except MissingDataError as error:
        print(f"error: {what}: {error}", file=sys.stderr)
        return 1
    out = args.out or Path(runs[0].path) / "figures"
    for path in _save(figure, out / stem, args.pdf, args.dpi):
        print(path)
    return 0
