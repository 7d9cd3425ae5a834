"""``tinysubspace compare RUN [RUN ...]``: loss and accuracy curves of several runs in one figure
(PNG) and a summary table (final loss, steps to a target loss, HVP cost). Reads runs only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinysubspace.plots.projected import figure_compare
from tinysubspace.results.projected import (
    compare_csv,
    compare_markdown,
    compare_table,
)
from tinysubspace.results.store import MissingDataError, RunStoreError, load_run
from tinysubspace.results.summary import thread_counts_note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="run folders (e.g. of the projected-* experiments)")
    parser.add_argument("--target-loss", type=float, default=None, metavar="L",
                        help="training loss for 'steps to target' (default: twice the lowest "
                             "final loss among the runs)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one legend label per run (default: the experiment names, less "
                             "the words they share)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG file of the figure (default: compare.png beside the first run; "
                             "compare-2.png … if that exists)")
    parser.add_argument("--smooth", type=int, default=25, metavar="N",
                        help="steps in the moving average of the mini-batch loss (default 25)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--dpi", type=int, default=150)


def free_name(path: Path) -> Path:
    """``path``, or ``stem-2.png``, ``stem-3.png`` … : the first that does not exist, so that a
    second ``compare`` keeps the first one's figure."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def main(args: argparse.Namespace) -> int:
    if args.labels is not None and len(args.labels) != len(args.runs):
        print(f"error: {len(args.labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        runs = [load_run(path) for path in args.runs]
        table, target = compare_table(runs, args.target_loss, args.labels)
        figure = figure_compare(runs, args.labels, smooth=args.smooth)
    except (RunStoreError, MissingDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (note := thread_counts_note(runs)) is not None:
        print(f"note: {note}", file=sys.stderr)
    out = args.out or free_name(Path(args.runs[0]).resolve().parent / "compare.png")
    if args.out is not None and out.exists():
        print(f"note: replacing {out} (--out names an existing file)", file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=args.dpi)
    except OSError as error:
        print(f"error: cannot write {out} ({error.strerror or error}); use --out FILE",
              file=sys.stderr)
        return 2
    print(compare_markdown(table, target) if args.format == "markdown" else compare_csv(table),
          end="\n" if args.format == "markdown" else "", flush=True)
    print(f"figure: {out}", file=sys.stderr)
    return 0
