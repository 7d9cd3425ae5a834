"""``tinysubspace run [EXPERIMENT] [--set KEY=VALUE ...] [--data-root DIR] [--out DIR]
[--resume]``: train an experiment while tracking the Hessian, then print a summary."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from ..config import ConfigError, parse_assignment
from ..experiments import DEFAULT_EXPERIMENT, load_experiment
from ..progress import Progress
from ..store import RunStoreError, load_run
from ..summary import summary_table
from ..training import run_experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT,
                        help=f"experiment (default {DEFAULT_EXPERIMENT}; see `tinysubspace list`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.01")
    parser.add_argument("--data-root", help="folder holding the data files (MNIST IDX, CIFAR)")
    parser.add_argument("--out", help="run folder (default runs/EXPERIMENT-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        overrides = dict(parse_assignment(text) for text in args.overrides)
        config = load_experiment(args.experiment, overrides)
    except ConfigError as error:
        print(f"tinysubspace run: {error}", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("tinysubspace run: --resume needs --out DIR (the run to continue)", file=sys.stderr)
        return 2
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{stamp}"
    print(f"tinysubspace: {config.name} -> {out}", file=sys.stderr)
    try:
        outcome = run_experiment(config, out, resume=args.resume, data_root=args.data_root,
                                 progress=None if args.quiet else Progress())
    except (RunStoreError, FileNotFoundError, ValueError) as error:
        print(f"tinysubspace run: {error}", file=sys.stderr)
        return 2
    print(summary_table(load_run(out)))
    if outcome.state == "diverged":
        print(f"\nstopped: {outcome.message}", file=sys.stderr)
        return 1
    print(f"\nrun folder: {out}  (plots: tinysubspace plot {out})")
    return 0
