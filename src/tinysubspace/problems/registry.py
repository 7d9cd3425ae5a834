"""Look-ups in the name → builder registries of :mod:`tinysubspace.problems.models.networks` and
:mod:`tinysubspace.problems.datasets.catalog`, with the errors that list what is known (STYLE.md
points 9, 12)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

__all__ = ["check_options", "keyword_options", "lookup", "renamed_keyword"]

T = TypeVar("T")


def renamed_keyword(new_name: str, new: T | None, old_name: str, old: T | None) -> T | None:
    """The value of a keyword given by its name ``new_name`` or by its old name ``old_name``.

    Raises:
        TypeError: both names given.

    >>> renamed_keyword("context_length", None, "block_size", 32)
    32
    """
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"give {new_name} once: {new_name}={new!r} and its old name "
                        f"{old_name}={old!r} both arrived; use {new_name}")
    return old


def lookup(registry: Mapping[str, T], name: str, what: str) -> tuple[str, T]:
    """``(key, entry)`` of ``name`` in ``registry``; case, spaces around and ``_``/``-`` do not
    matter.

    Raises:
        ValueError: an unknown name (the message lists the known ones).

    >>> lookup({"fashion-mnist": 1}, " Fashion_MNIST", "data set")
    ('fashion-mnist', 1)
    """
    key = name.strip().lower().replace("_", "-")
    if key not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return key, registry[key]


def keyword_options(function: Callable[..., object]) -> list[str]:
    """The keyword-only parameters of ``function``, in order: its options."""
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_options(options: Mapping[str, object], function: Callable[..., object], what: str,
                  also_known: Sequence[str] = ()) -> None:
    """Refuse options that are not keyword-only parameters of ``function``.

    Args:
        options: the options given.
        function: the builder or loader that takes them.
        what: how the message names it, e.g. ``"model 'fc'"``.
        also_known: options taken elsewhere, listed first among the known ones.

    Raises:
        ValueError: an unknown option (the message lists the known ones).
    """
    known = keyword_options(function)
    unknown = sorted(set(options) - set(known) - set(also_known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what}; known: "
                         f"{', '.join([*also_known, *known]) or '(none)'}")
