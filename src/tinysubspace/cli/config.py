"""``tinysubspace config [EXPERIMENT | RUN] [--set KEY=VALUE ...] [--json]``: the resolved
config, every key with its value (each can be changed with ``--set KEY=VALUE``); keys whose
value differs from the default are marked. A run folder prints the config it was made with."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tinysubspace.experiments.catalog import DEFAULT_EXPERIMENT, load_experiment
from tinysubspace.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_assignment,
)
from tinysubspace.results.folder import flatten_config
from tinysubspace.results.store import RunStoreError, read_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT,
                        metavar="EXPERIMENT|RUN",
                        help=f"an experiment (default {DEFAULT_EXPERIMENT}; see `tinysubspace "
                             "list`) or a run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a value, as for `tinysubspace run`")
    parser.add_argument("--json", action="store_true", help="print JSON instead of KEY = VALUE")


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "[]"
    return str(value)


def _resolve(args: argparse.Namespace) -> ExperimentConfig:
    overrides = dict(parse_assignment(text) for text in args.overrides)
    if (Path(args.experiment) / "config.json").exists():  # a run folder
        saved = read_config(args.experiment)
        return apply_overrides(config_from_dict(saved), overrides)
    return load_experiment(args.experiment, overrides)


def main(args: argparse.Namespace) -> int:
    """Print the config; 2: an unknown experiment, a bad key or value, a damaged run folder."""
    try:
        config = _resolve(args)
    except (ConfigError, RunStoreError) as error:
        print(f"tinysubspace config: {error}", file=sys.stderr)
        return 2
    resolved = config_to_dict(config)
    if args.json:
        print(json.dumps(resolved, indent=2))
        return 0
    defaults = flatten_config(config_to_dict(ExperimentConfig()))
    print(f"# {config.name}: every key, settable with --set KEY=VALUE "
          "(# default: ... marks a value the experiment or --set changed)")
    for key, value in flatten_config(resolved).items():
        if key in ("name", "description"):
            continue
        mark = f"  # default: {_text(defaults[key])}" if defaults.get(key, value) != value else ""
        print(f"{key} = {_text(value)}{mark}")
    return 0
