"""Shared fixtures for the core's tests. Test cases live in ``cases.py``, references in
``reference.py`` (both importable from every test module: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import functools

import pytest
import torch

from cases import Case
from reference import FlatLoss, reference_gradient, reference_hessian


@functools.cache
def _reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, float]:
    problem = case.build()
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    return reference_hessian(f), reference_gradient(f), float(f(f.theta0))


@pytest.fixture
def reference_of():
    """``reference_of(case) -> (H, g, loss)``: dense float64 Hessian, gradient and mean loss of a
    case over its whole data set (cached per session; treat as read-only)."""
    return _reference


@pytest.fixture
def global_rng_untouched():
    """Fail a test whose code draws from torch's global RNG (STYLE.md point 2). Opt in with
    ``pytestmark = pytest.mark.usefixtures("global_rng_untouched")``."""
    state = torch.get_rng_state()
    yield
    assert torch.equal(state, torch.get_rng_state()), "the test changed torch's global RNG"
