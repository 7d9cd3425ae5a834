"""``tinysubspace run [EXPERIMENT] [--set KEY=VALUE ...] [--data-root DIR] [--out DIR]
[--resume] [--threads N]``: train an experiment while tracking the Hessian, then print a summary.

Under ``torchrun --nproc-per-node N -m tinysubspace run ...`` every process runs this command:
it joins the process group (:func:`tinysubspace.runtime.distributed.init_from_env`), all ranks
train and
measure together, and only rank 0 writes the run folder and prints (docs/distributed.md).

Exit status: 0 finished; 1 diverged or a write failed (the disk is full, say); 2 a user's error
found before training (an unknown experiment or key, a value out of range, an unusable
``--out``, missing or refused data, a run that cannot be resumed); 130 Ctrl-C. Each failure is
one line on stderr, and ``status.json`` says what happened (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from datetime import datetime
from pathlib import Path

from tinysubspace.cli.checks import check_tracker_k
from tinysubspace.cli.messages import command_line_message
from tinysubspace.experiments.catalog import DEFAULT_EXPERIMENT, load_experiment
from tinysubspace.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    parse_assignment,
)
from tinysubspace.experiments.progress import Progress
from tinysubspace.experiments.training import RunOutcome, run_experiment
from tinysubspace.results.store import RunStoreError, check_out_folder, load_run, read_config
from tinysubspace.results.summary import summary_table
from tinysubspace.runtime import distributed as tsdist
from tinysubspace.runtime.threads import ENV_VAR, ThreadsError, apply_threads, choose_threads

EPILOG = ("Every key and its default: `tinysubspace config EXPERIMENT` (add --set options to "
          "see their effect). Continue a stopped run with `tinysubspace run --resume --out "
          f"DIR`. Threads: --threads N or ${ENV_VAR} (default: the free physical cores at "
          "launch, recorded in config.json meta.threads; the count changes the last digits of "
          "the numbers, so give --threads N to runs you will compare).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("experiment", nargs="?", default=None,
                        help=f"experiment (default {DEFAULT_EXPERIMENT}; see `tinysubspace "
                             "list`); with --resume, the run folder's own by default")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.01 "
                                                  "(all keys: `tinysubspace config`)")
    parser.add_argument("--data-root", help="folder holding the data files (MNIST IDX, CIFAR)")
    parser.add_argument("--out", help="run folder (default runs/EXPERIMENT-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"torch threads (default: ${ENV_VAR}, else the free physical cores)")
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


def _config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment asked for; ``--resume --out DIR`` alone: the config the run was made with.

    Raises:
        ConfigError, RunStoreError: a bad experiment, key or value, or an unreadable run.
    """
    overrides = dict(parse_assignment(text) for text in args.overrides)
    if args.resume and args.out and args.experiment is None:
        saved = tsdist.run_on_main(lambda: read_config(args.out))  # rank 0 owns the folder
        try:
            return apply_overrides(config_from_dict(saved), overrides)
        except ConfigError as error:
            raise ConfigError(f"the config in {args.out} does not fit this version of "
                              f"tinysubspace: {error}") from None
    return load_experiment(args.experiment or DEFAULT_EXPERIMENT, overrides)


def _threads(args: argparse.Namespace, out: Path) -> str:
    """Set the run's thread count; returns how it was chosen."""
    saved = None
    if args.resume:
        saved = (tsdist.run_on_main(lambda: read_config(out)).get("meta") or {}).get("threads")
    if tsdist.is_distributed() and args.threads is None and not os.environ.get(ENV_VAR):
        saved = saved or max(1, (os.cpu_count() or 1) // tsdist.world_size())
    threads, source = choose_threads(args.threads, saved)
    apply_threads(threads)
    return f"{threads} thread{'s' if threads > 1 else ''} ({source})"


def _prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, str]:
    """Config, run folder and thread count, all checked before any data is loaded."""
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    config = _config(args)
    check_tracker_k(config)  # before any folder exists
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = tsdist.broadcast_object(  # rank 0's clock names the folder
        Path(args.out) if args.out else Path("runs") / f"{config.name}-{stamp}")
    tsdist.run_on_main(lambda: check_out_folder(out, resume=args.resume))  # all ranks raise
    return config, out, _threads(args, out)


def _run(args: argparse.Namespace) -> int:
    try:
        config, out, threads = _prepare(args)
    except (ConfigError, RunStoreError, ThreadsError) as error:
        _say(f"tinysubspace run: {error}")
        return 2
    world = f" on {tsdist.world_size()} processes" if tsdist.is_distributed() else ""
    _say(f"tinysubspace: {config.name} -> {out}{world}, {threads}")
    try:
        outcome = run_experiment(config, out, resume=args.resume, data_root=args.data_root,
                                 progress=None if args.quiet else Progress())
    except KeyboardInterrupt:  # before training began (Ctrl-C while the data loads)
        _say("tinysubspace run: stopped by Ctrl-C before training began")
        return 130
    except (RunStoreError, ConfigError, FileNotFoundError, ValueError, pickle.UnpicklingError,
            OSError) as error:
        _say(f"tinysubspace run: {command_line_message(error)}")
        return 2
    return _report(outcome, out)


def _report(outcome: RunOutcome, out: Path) -> int:
    """Print the summary (or why the run stopped); the exit status."""
    if outcome.state in ("interrupted", "failed"):
        _say(f"\ntinysubspace run: {outcome.message}")
        return 130 if outcome.state == "interrupted" else 1
    _say(summary_table(load_run(out)) if tsdist.is_main() else "", out=True)
    if outcome.state == "diverged":
        _say(f"\nstopped: {outcome.message}")
        return 1
    _say(f"\nrun folder: {out}  (plots: tinysubspace plot {out})", out=True)
    return 0
