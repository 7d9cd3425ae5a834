"""``tinysubspace list``: every experiment with its one-line description."""

from __future__ import annotations

import argparse

from tinysubspace.experiments.catalog import DEFAULT_EXPERIMENT, describe_experiments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="",
                        help="show only experiments whose name contains this text")


def main(args: argparse.Namespace) -> int:
    rows = [(name, text) for name, text in describe_experiments() if args.pattern in name]
    width = max((len(name) for name, _ in rows), default=0)
    for name, text in rows:
        mark = "*" if name == DEFAULT_EXPERIMENT else " "
        print(f"{mark} {name.ljust(width)}  {text}")
    print(f"\n* the default (`tinysubspace run` with no EXPERIMENT). {len(rows)} experiments.")
    return 0
