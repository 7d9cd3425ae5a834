"""``tinysubspace run [EXPERIMENT] [--set KEY=VALUE ...] [--data-root DIR] [--out DIR]
[--resume]``: train an experiment while tracking the Hessian, then print a summary.

Under ``torchrun --nproc-per-node N -m tinysubspace run ...`` every process runs this command:
it joins the process group (:func:`tinysubspace.runtime.distributed.init_from_env`), all ranks
train and
measure together, and only rank 0 writes the run folder and prints (docs/distributed.md)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from tinysubspace.experiments.catalog import DEFAULT_EXPERIMENT, load_experiment
from tinysubspace.experiments.config import ConfigError, parse_assignment
from tinysubspace.experiments.progress import Progress
from tinysubspace.experiments.training import run_experiment
from tinysubspace.results.store import RunStoreError, load_run
from tinysubspace.results.summary import summary_table
from tinysubspace.runtime import distributed as tsdist


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
    distributed = tsdist.init_from_env()  # under torchrun: join the other ranks
    try:
        return _run(args)
    finally:
        if distributed:
            tsdist.shutdown()


def _say(text: str, out: bool = False) -> None:
    """Print on rank 0 only (stdout if ``out``, else stderr)."""
    if tsdist.is_main():
        print(text, file=sys.stdout if out else sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        overrides = dict(parse_assignment(text) for text in args.overrides)
        config = load_experiment(args.experiment, overrides)
    except ConfigError as error:
        _say(f"tinysubspace run: {error}")
        return 2
    if args.resume and not args.out:
        _say("tinysubspace run: --resume needs --out DIR (the run to continue)")
        return 2
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = tsdist.broadcast_object(  # rank 0's clock names the folder
        Path(args.out) if args.out else Path("runs") / f"{config.name}-{stamp}")
    world = f" on {tsdist.world_size()} processes" if tsdist.is_distributed() else ""
    _say(f"tinysubspace: {config.name} -> {out}{world}")
    try:
        outcome = run_experiment(config, out, resume=args.resume, data_root=args.data_root,
                                 progress=None if args.quiet else Progress())
    except (RunStoreError, FileNotFoundError, ValueError) as error:
        _say(f"tinysubspace run: {error}")
        return 2
    _say(summary_table(load_run(out)) if tsdist.is_main() else "", out=True)
    if outcome.state == "diverged":
        _say(f"\nstopped: {outcome.message}")
        return 1
    _say(f"\nrun folder: {out}  (plots: tinysubspace plot {out})", out=True)
    return 0
