"""When to measure: the CLI's step list, schedules for one's own loop, and a time budget.

A schedule is a predicate ``due(step) -> bool`` over training steps ``0, 1, 2, ...`` (the step
about to be taken; step 0 is the initialisation). :func:`as_schedule` turns what a user writes
into one: ``"paper"`` (dense early, sparse later, as the CLI's defaults), an int ``n`` (every
``n`` steps), a list of steps, or a callable. A :class:`Budget` then thins the due steps so that
measuring takes at most a fraction ``b`` of the wall time: with ``s`` seconds spent measuring,
``t`` seconds elapsed and ``c`` the cost of the last measurement, a due step is measured iff

.. math::  s + c \\le b\\,(t + c),

i.e. iff the overhead would still be at most ``b`` right after measuring now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Integral
from typing import Any

__all__ = ["PAPER", "Budget", "PaperSchedule", "Schedule", "as_schedule", "measurement_steps"]

Schedule = Callable[[int], bool]


def measurement_steps(config: Any, total_steps: int) -> list[int]:
    """Steps at which the CLI measures (a :class:`~tinysubspace.experiments.config.
    TrackerConfig`): every ``dense_every`` up to ``dense_until``, then every ``sparse_every``,
    plus ``extra_steps``, anchors, ``save_vectors_at`` and the last step.

    >>> from tinysubspace.experiments.config import TrackerConfig
    >>> measurement_steps(TrackerConfig(dense_until=4, dense_every=2, sparse_every=5,
    ...                                 anchors=(3,), save_vectors_at=()), 12)
    [0, 2, 3, 4, 5, 10, 12]
    """
    steps = set(range(0, min(config.dense_until, total_steps) + 1, max(config.dense_every, 1)))
    steps.update(range(0, total_steps + 1, max(config.sparse_every, 1)))
    steps.update(config.extra_steps)
    steps.update(config.anchors)
    steps.update(config.save_vectors_at)
    steps.add(total_steps)
    return sorted(s for s in steps if 0 <= s <= total_steps)


@dataclass(frozen=True)
class PaperSchedule:
    """Every ``dense_every`` steps up to ``dense_until``, then every ``sparse_every`` (the CLI's
    defaults: 10 up to 200, then 100 — measurements are dense where the subspace forms)."""

    dense_until: int = 200
    dense_every: int = 10
    sparse_every: int = 100

    def __call__(self, step: int) -> bool:
        if step <= self.dense_until and step % self.dense_every == 0:
            return True
        return step % self.sparse_every == 0


PAPER = PaperSchedule()


@dataclass(frozen=True)
class _Every:
    n: int

    def __call__(self, step: int) -> bool:
        return step % self.n == 0


@dataclass(frozen=True)
class _Steps:
    steps: frozenset[int]

    def __call__(self, step: int) -> bool:
        return step in self.steps


def _step_list(spec: Iterable[Any]) -> frozenset[int]:
    steps = list(spec)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, Integral)]
    if bad:
        raise TypeError(f"schedule: steps must be integers, got {bad[:3]!r}")
    negative = sorted(int(s) for s in steps if s < 0)
    if negative:
        raise ValueError(f"schedule: steps must be >= 0 (step 0 is the initialisation), got "
                         f"negative steps {negative[:5]}")
    return frozenset(int(s) for s in steps)


def as_schedule(spec: Any) -> Schedule:
    """A predicate ``due(step)`` from ``"paper"``, an int, a list of steps or a callable.

    Raises:
        ValueError: an int below 1, a list with negative steps, an unknown name.
        TypeError: anything else.

    >>> [s for s in range(12) if as_schedule(5)(s)]
    [0, 5, 10]
    >>> as_schedule([0, 3])(3), as_schedule("paper")(150), as_schedule("paper")(300)
    (True, True, True)
    """
    if isinstance(spec, str):
        if spec != "paper":
            raise ValueError(f"schedule must be 'paper', an int, a list of steps or a callable, "
                             f"got {spec!r}")
        return PAPER
    if isinstance(spec, Integral) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"schedule: measure every n steps needs n >= 1, got {spec}")
        return _Every(int(spec))
    if callable(spec):
        return spec
    if isinstance(spec, Iterable):
        return _Steps(_step_list(spec))
    raise TypeError(f"schedule must be 'paper', an int, a list of steps or a callable "
                    f"(step -> bool), got {type(spec).__name__}")


@dataclass
class Budget:
    """At most ``fraction`` of the wall time spent measuring (the module docstring's rule).

    Args:
        fraction: the largest share of wall time for measurements, in ``(0, 1]``.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``.
    """

    fraction: float

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not (
                0 < self.fraction <= 1):
            raise ValueError(f"budget must be a fraction of wall time in (0, 1], e.g. 0.2, "
                             f"got {self.fraction!r}")

    def allows(self, spent: float, elapsed: float, last_cost: float) -> bool:
        """Whether measuring now keeps ``spent / elapsed`` at most ``fraction``."""
        return spent + last_cost <= self.fraction * (elapsed + last_cost)
