"""``tinysubspace blocks RUN [RUN ...] [--at init --at final] [--blocks auto]``: per-block
Hessian spectra of saved runs at initialisation and after training (top eigenvalues, Hutchinson
traces, SLQ densities, the block-heterogeneity score), stored in ``RUN/blocks/`` and
``RUN/blocks.csv`` (:mod:`tinysubspace.experiments.block_runs`); then prints a summary."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tinysubspace.cli.messages import command_line_message
from tinysubspace.experiments.block_runs import measure_run_blocks
from tinysubspace.results.store import RunStoreError, read_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tinysubspace blocks``."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    parser.add_argument("--at", action="append", type=_point, metavar="init|final|STEP",
                        help="which model: init, final or a step number (retrained); "
                             "repeatable (default init and final)")
    parser.add_argument("--blocks", default="auto", choices=["auto", "layers", "types"],
                        help="how parameters form blocks (default auto: one per module)")
    parser.add_argument("--k", type=int, default=5, help="top eigenvalues per block")
    parser.add_argument("--steps", type=int, default=40, help="SLQ Lanczos steps per probe")
    parser.add_argument("--probes", type=int, default=4, help="SLQ / Hutchinson probes")
    parser.add_argument("--exact-size", type=int, default=64,
                        help="blocks up to this many parameters are formed and diagonalised")
    parser.add_argument("--examples", type=int, default=None,
                        help="measure on a seeded subset of this many training examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", help="folder holding the data files (MNIST IDX, CIFAR)")


def _point(text: str) -> str | int:
    if text in ("init", "final"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected init, final or a step number, got "
                                         f"{text!r}") from None


def check_experiment_run(path: str) -> None:
    """Refuse a run this command cannot rebuild: one measured by ``ts.SubspaceTracker`` (or a
    training-loop callback) in the user's own loop has no experiment config (its
    ``config.json`` names a ``source`` instead), so its model and data cannot be made again.

    Raises:
        RunStoreError: not a run folder, or a run made outside ``tinysubspace run``.
    """
    source = read_config(path).get("source")
    if source is not None:
        raise RunStoreError(
            f"{path} was measured by {source} in your own training loop, not made by "
            "`tinysubspace run`: `tinysubspace blocks` rebuilds the model and data from a run's "
            "experiment config, which this run does not have. Measure blocks where the model "
            "lives: SubspaceTracker(..., blocks='auto') writes block/NAME/eig_1 columns (drawn "
            "by `tinysubspace plot RUN --figure block-sharpness`), or call "
            "tinysubspace.problems.block_curvature.block_spectra(model, loss_fn, data)")


def main(args: argparse.Namespace) -> int:
    """Measure every run; 0: done, 2: not a run (or no checkpoint for ``final``)."""
    at = tuple(dict.fromkeys(args.at or ["init", "final"]))
    for run in args.runs:
        try:
            check_experiment_run(run)
            files = measure_run_blocks(run, at, args.blocks, data_root=args.data_root,
                                       examples=args.examples, k=args.k,
                                       steps=args.steps, probes=args.probes,
                                       exact_size=args.exact_size, seed=args.seed)
        except (RunStoreError, FileNotFoundError, ValueError) as error:
            print(f"tinysubspace blocks: {command_line_message(error)}", file=sys.stderr)
            return 2
        for file in files:
            with np.load(file) as data:
                top = ", ".join(f"{n}: {e[0]:.3g}" for n, e in zip(data["names"],
                                                                   data["eigenvalues"],
                                                                   strict=True))
                print(f"{file}: step {int(data['step'])}, heterogeneity "
                      f"{float(data['heterogeneity']):.3f} (normalised "
                      f"{float(data['heterogeneity_normalized']):.3f}); λ1 per block: {top}")
    return 0
