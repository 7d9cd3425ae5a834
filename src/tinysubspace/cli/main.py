"""The ``tinysubspace`` command: one sub-command per module, imported only when used.

Each sub-command module defines ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tinysubspace.cli.run", "train a paper experiment while tracking the Hessian"),
    "list": ("tinysubspace.cli.list_experiments", "list the experiments with descriptions"),
    "config": ("tinysubspace.cli.config", "print the resolved config of an experiment: every key "
               "and its value"),
    "plot": ("tinysubspace.cli.plot", "draw the paper's figures from a saved run"),
    "table1": ("tinysubspace.cli.table1", "print Table 1 from saved runs"),
    "report": ("tinysubspace.cli.report", "write one offline HTML page for a run"),
    "toy": ("tinysubspace.cli.toy", "the solvable toy model of Section 3 vs. its closed form"),
    "compare": ("tinysubspace.cli.compare",
                "compare runs (e.g. SGD vs. projected SGD): curves and a summary table"),
    "blocks": ("tinysubspace.cli.blocks",
               "per-block Hessian spectra of saved runs (init and final) and their heterogeneity"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; the options of ``command`` only (its module alone imported), or
    of every sub-command when ``command`` is None."""
    from tinysubspace import __version__

    parser = argparse.ArgumentParser(
        prog="tinysubspace",
        description="Gradient descent happens in a tiny subspace: measure it on your own run.",
        epilog="Start with `tinysubspace run` (the paper's Fig. 1 on digits, ~2 min); "
               "`tinysubspace list` shows every experiment, `tinysubspace COMMAND --help` "
               "the options of a command.")
    parser.add_argument("--version", action="version", version=f"tinysubspace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_main=module.main)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names (its first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if args.command is None:  # `tinysubspace` alone: what it can do (`tinysubspace run` trains)
        parser.print_help()
        return 0
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_damage(warnings.showwarning)
        return int(args._main(args) or 0)


def _one_line_damage(show):
    """``warnings.showwarning`` that prints a damaged run folder's warning
    (``RunDamageWarning``) as one ``warning: …`` line and passes others to ``show``."""
    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__name__ == "RunDamageWarning":
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


if __name__ == "__main__":
    sys.exit(main())
