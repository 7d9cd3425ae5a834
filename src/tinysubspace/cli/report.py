"""``tinysubspace report RUN``: one offline HTML page with every figure of the run, its metrics
summary, its Table 1 value and its config (default ``RUN/report.html``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinysubspace.plots.figures import too_few_measurements
from tinysubspace.plots.report import write_report
from tinysubspace.results.store import RunStoreError, load_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tinysubspace report``."""
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="HTML file to write (default: RUN/report.html)")
    parser.add_argument("--dpi", type=int, default=90)


def main(args: argparse.Namespace) -> int:
    """Write the page and print its path; 2: not a run folder."""
    try:
        run = load_run(args.run)
    except RunStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (few := too_few_measurements(run)) is not None:
        print(f"note: {few}; the page says so instead of drawing figures over training",
              file=sys.stderr)
    try:
        print(write_report(run, args.out, dpi=args.dpi))
    except OSError as error:
        print(f"error: cannot write the report: {error}; use --out FILE to write it "
              "elsewhere", file=sys.stderr)
        return 2
    return 0
