"""Errors of the library, said in the command line's words: its options (``--data-root DIR``,
``--set data.fallback_to_test=true``) instead of the Python API's (``root=DIR``,
``fallback_to_test=True``), on one line instead of one line per path looked at."""

from __future__ import annotations

from pathlib import Path

__all__ = ["command_line_message"]

# The API's words -> the command line's.
_API_TO_CLI = (("pass root=DIR", "pass --data-root DIR"),
               ("pass fallback_to_test=True", "add --set data.fallback_to_test=true"))


def _data_not_found(text: str) -> str:
    """One line of a :class:`~tinysubspace.problems.datasets.files.DatasetNotFoundError`:
    ``could not find WHAT; looked at:`` + one indented path a line + how to get the data."""
    lines = text.splitlines()
    what = lines[0].removesuffix("; looked at:")
    paths = [Path(line.strip()) for line in lines[1:] if line.startswith("  ")]
    how = " ".join(line.strip() for line in lines[1:] if line.strip() and
                   not line.startswith("  "))
    for api, cli in _API_TO_CLI:
        how = how.replace(api, cli)
    folders = list(dict.fromkeys(str(p.parent) for p in paths))
    names = list(dict.fromkeys(p.name.removesuffix(".gz") for p in paths))
    gz = " (each plain or .gz)" if any(p.suffix == ".gz" for p in paths) else ""
    looked = "" if all(n in what for n in names) else f" (looked for {', '.join(names)}{gz})"
    where = f" in {', '.join(folders)}{looked}" if paths else ""
    return f"{what}{where}. {how}".strip()


def command_line_message(error: BaseException) -> str:
    """The error's message for ``tinysubspace``'s stderr: a missing data set on one line, in
    the command line's words; any other error as it is."""
    from tinysubspace.problems.datasets.files import DatasetNotFoundError

    text = str(error)
    if isinstance(error, DatasetNotFoundError) and text.startswith("could not find"):
        return _data_not_found(text)
    for api, cli in _API_TO_CLI:
        text = text.replace(api, cli)
    return text
