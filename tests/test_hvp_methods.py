"""The H·V strategies seen through the operators: ``auto``'s choice and its fallback.

``auto`` picks ``jvp`` on a CUDA device in eval mode; torch 2.13's ``jvp(grad ℓ)`` raises
"ZeroTensors are immutable" for mean-squared error, so ``auto`` must fall back to ``loop``. The
device choice is simulated (``auto_choice`` told the device is CUDA, the tensors on the CPU), and
every product is checked against the dense float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinysubspace as ts
from cases import Case
from reference import relative_error
from tinysubspace.curvature import hvp

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture
def cuda_choice(monkeypatch):
    """``auto`` resolved as on a CUDA device (the seam: :func:`hvp.auto_choice`)."""
    real = hvp.auto_choice
    monkeypatch.setattr(hvp, "auto_choice", lambda device, mode: real(torch.device("cuda"), mode))
    assert hvp.resolve_hvp_method("auto", torch.device("cpu"), "eval") == "jvp"


# ------------------------------------------------------------------ auto
@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.functional.mse_loss],
                         ids=["MSELoss", "mse_loss"])
def test_auto_on_cuda_falls_back_to_loop_for_mse(loss, cuda_choice, reference_of):
    case = Case("mlp_layernorm", "mse", "batches")
    H, _, _ = reference_of(case)
    problem = case.build()
    op = ts.HessianOperator(problem.model, loss, problem.data, dtype=F64)  # hvp_method="auto"
    strategy = op.hvp_strategy()
    assert isinstance(strategy, hvp.FallbackOnError) and strategy.current is strategy.primary
    V = _randn(op.shape[0], 3, seed=1)
    assert relative_error(op @ V, H @ V) < 1e-10
    assert strategy.current is strategy.fallback and "ZeroTensors" in strategy.failure
    assert relative_error(op @ V[:, 0], H @ V[:, 0]) < 1e-10  # loop from now on
    assert op.retained_graph_chunks == 3  # and loop keeps its graphs
    explicit = ts.HessianOperator(problem.model, loss, problem.data, dtype=F64, hvp_method="jvp")
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        explicit @ V


def test_auto_on_cuda_keeps_jvp_where_it_works(cuda_choice, reference_of):
    case = Case("mlp_softplus", "ce", "tuple")
    H, _, _ = reference_of(case)
    op = case.build().operator(dtype=F64)
    V = _randn(op.shape[0], 2, seed=2)
    assert relative_error(op @ V, H @ V) < 1e-10
    strategy = op.hvp_strategy()
    assert strategy.current is strategy.primary and strategy.failure is None
    assert op.retained_graph_chunks == 0  # jvp keeps no graph


def test_auto_residual_on_cuda_falls_back_too(cuda_choice, reference_of):
    case = Case("mlp_softplus", "mse", "tuple")
    H, _, _ = reference_of(case)
    problem = case.build()
    residual = ts.GaussNewtonResidual(problem.model, problem.loss_fn, problem.data, dtype=F64,
                                      **problem.data_kwargs)
    ggn = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                         **problem.data_kwargs)
    V = _randn(residual.shape[0], 2, seed=3)
    assert relative_error(residual @ V + ggn @ V, H @ V) < 1e-10
    assert residual.hvp_strategy().current is residual.hvp_strategy().fallback


def test_fallback_lets_other_errors_through():
    def failing(op, batch, index, block):
        raise RuntimeError("out of memory")

    strategy = hvp.FallbackOnError(failing, lambda *args: torch.zeros(1))
    with pytest.raises(RuntimeError, match="out of memory"):
        strategy(None, None, 0, torch.zeros(1, 1))
    assert strategy.current is failing and strategy.failure is None


def test_auto_is_loop_on_cpu_and_in_train_mode():
    assert hvp.resolve_hvp_method("auto", torch.device("cpu"), "eval") == "loop"
    assert hvp.auto_choice(torch.device("cuda"), "train") == "loop"
    assert hvp.auto_choice(torch.device("cuda"), "eval") == "jvp"
