"""The ``tinysubspace`` command: one module a sub-command (see :mod:`tinysubspace.cli.main`)."""

from tinysubspace.cli.main import main

__all__ = ["main"]
