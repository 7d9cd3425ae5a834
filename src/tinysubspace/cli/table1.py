"""``tinysubspace table1 [RUNS ...]``: the paper's Table 1 (mean overlap(g, Hg) over the last
steps) from saved runs, next to the published values, as markdown or CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinysubspace.results.store import RunStoreError, load_run
from tinysubspace.results.summary import thread_counts_note
from tinysubspace.results.table1 import (
    table1,
    table1_csv,
    table1_markdown,
    table1_row_id,
    table1_warnings,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tinysubspace table1``."""
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs")], metavar="RUN",
                        help="run folders, or folders holding run folders (default: runs/)")
    parser.add_argument("--last", type=int, default=1000, metavar="N",
                        help="average over the last N steps of each run (paper: 1000)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among ``paths`` and their immediate subfolders (those with config.json)."""
    found = []
    for path in paths:
        if (path / "config.json").exists():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if (p / "config.json").exists()))
    return found


def main(args: argparse.Namespace) -> int:
    """Print Table 1; 0: done, 2: no run folder found, or a run that cannot be placed."""
    folders = find_runs(args.runs)
    if not folders:
        print(f"error: no run folders in {', '.join(map(str, args.runs))} (a run folder holds "
              "config.json)", file=sys.stderr)
        return 2
    try:
        runs = [load_run(folder) for folder in folders]
    except RunStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = [run for run in runs if table1_row_id(run)]
    if len(rows) < len(runs):
        print(f"note: {len(runs) - len(rows)} of {len(runs)} runs have no table1_row and are "
              "left out", file=sys.stderr)
    try:
        table = table1(rows, last_n=args.last)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (note := thread_counts_note(rows)) is not None:
        print(f"note: {note}", file=sys.stderr)
    for warning in table1_warnings(table, args.last):
        print(f"warning: {warning}", file=sys.stderr)
    for row in table.itertuples(index=False):
        if "," in str(row.data):
            print(f"note: row {row.row} averages runs on different data sets ({row.data}); "
                  "pass one data set's runs at a time", file=sys.stderr)
    print(table1_markdown(table, args.last) if args.format == "markdown" else table1_csv(table),
          end="\n" if args.format == "markdown" else "")
    return 0
