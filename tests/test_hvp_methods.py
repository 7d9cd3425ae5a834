"""The H·V strategies seen through the operators: ``auto``'s choice and its fallback, and
finite differences of gradients.

``auto`` picks ``jvp`` on a CUDA device in eval mode; torch 2.13's ``jvp(grad ℓ)`` raises
"ZeroTensors are immutable" for mean-squared error, so ``auto`` must fall back to ``loop``. The
device choice is simulated (``auto_choice`` told the device is CUDA, the tensors on the CPU).
``finite_difference`` (2 points) and ``finite_difference4`` against the dense float64 reference
(LayerNorm, uneven batches, a ReLU CNN with batch norm), through a kernel marked
``@once_differentiable`` (where the exact methods must fail), their error estimates, and the
Gauss–Newton residual's Hessian part, and two gloo ranks. Every product is checked against the
dense float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import tinysubspace as ts
from cases import Case
from distributed_workers import launch
from reference import FlatLoss, reference_hessian, relative_error
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


# ------------------------------------------------------------------ finite differences
FD_CASES = [Case("mlp_layernorm", "ce", "batches"), Case("mlp_layernorm", "mse", "loader"),
            Case("cnn_batchnorm", "ce", "batches")]


@pytest.mark.parametrize("case", FD_CASES, ids=str)
def test_finite_differences_match_the_reference(case, reference_of):
    H, _, _ = reference_of(case)
    V = _randn(H.shape[0], 3, seed=4)
    errors = {}
    for method in ("finite_difference", "finite_difference4"):
        op = case.build().operator(dtype=F64, hvp_method=method)
        block = op @ V
        errors[method] = relative_error(block, H @ V)
        assert relative_error(op @ V[:, 1], H @ V[:, 1]) < 1e-6  # a vector alone
        assert op.retained_graph_chunks == 0  # no graph is built at all
    assert errors["finite_difference"] < 1e-6
    assert errors["finite_difference4"] < 1e-9
    # the calibrated step puts the 2-point form at float64's rounding floor (1e-10 to 2e-10
    # here), where Richardson has nothing left to remove; 10x better above that floor
    assert errors["finite_difference4"] < errors["finite_difference"] / 10 or (
        errors["finite_difference"] < 1e-9)


def test_product_error_estimates(reference_of):
    case = Case("mlp_layernorm", "ce", "batches")
    H, _, _ = reference_of(case)
    V = _randn(H.shape[0], 4, seed=5)
    exact = case.build().operator(dtype=F64)
    exact @ V
    assert exact.product_error == 0.0 and exact.last_product_error == 0.0
    two = case.build().operator(dtype=F64, hvp_method="finite_difference")
    four = case.build().operator(dtype=F64, hvp_method="finite_difference4")
    floor = torch.finfo(F64).eps ** (2 / 3)
    assert two.product_error == pytest.approx(floor)  # before any product: the a-priori floor
    two_block, four_block = two @ V, four @ V
    truth = H @ V
    for op, block in ((two, two_block), (four, four_block)):
        actual = float(((block - truth).norm(dim=0) / truth.norm(dim=0)).max())
        assert 0 < op.last_product_error <= op.product_error < 1e-6
        assert op.product_error >= floor
        if op is four:  # the 4-point estimate (the 2-point form's measured error) bounds it
            assert actual <= op.last_product_error
            two_actual = float(((two_block - truth).norm(dim=0) / truth.norm(dim=0)).max())
            assert op.last_product_error == pytest.approx(two_actual, rel=0.5)


def test_float32_finite_differences_stop_at_their_floor(reference_of):
    case = Case("mlp_layernorm", "ce", "tuple")
    H, _, _ = reference_of(case)
    op = case.build().operator(dtype=torch.float32, hvp_method="finite_difference4")
    V = _randn(H.shape[0], 2, seed=6)
    floor = torch.finfo(torch.float32).eps ** (2 / 3)
    assert op.product_error == pytest.approx(floor)
    assert relative_error(op @ V.float(), H @ V) < 100 * floor
    assert op.product_error >= floor


class _OnceTanhFunction(torch.autograd.Function):
    """``tanh`` with a backward that cannot itself be differentiated (a stand-in for a fused
    kernel)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _OnceTanh(nn.Module):
    def forward(self, x):
        return _OnceTanhFunction.apply(x)


def _twin_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same network twice: with the once-differentiable tanh, and with ``nn.Tanh``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        plain = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        once = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), _OnceTanh(), nn.Linear(6, 3))
    once.load_state_dict(plain.state_dict())
    return once.double(), plain.double()


def test_finite_differences_run_through_a_once_differentiable_kernel():
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.randn(19, 4, generator=gen, dtype=F64), torch.randint(3, (19,), generator=gen)
    once, plain = _twin_models()
    loss_fn = nn.functional.cross_entropy
    H = reference_hessian(FlatLoss(plain, loss_fn, X, Y))
    V = _randn(H.shape[0], 2, seed=8)
    for method in ("loop", "batched"):
        op = ts.HessianOperator(once, loss_fn, (X, Y), batch_size=8, hvp_method=method)
        with pytest.raises(RuntimeError, match=rf"{method}.*differentiable only once.*"
                                               r"hvp_method='finite_difference'"):
            op @ V
    with pytest.raises(RuntimeError):  # torch.func cannot run the custom Function either
        ts.HessianOperator(once, loss_fn, (X, Y), batch_size=8, hvp_method="jvp") @ V
    errors = {}
    for method in ("finite_difference", "finite_difference4"):
        op = ts.HessianOperator(once, loss_fn, (X, Y), batch_size=8, hvp_method=method)
        errors[method] = relative_error(op @ V, H @ V)
        op.check_deterministic()  # two products of the same vector agree
    assert errors["finite_difference"] < 1e-6
    assert errors["finite_difference4"] < 1e-9  # both at the rounding floor (calibrated steps)
    assert errors["finite_difference4"] < errors["finite_difference"] or (
        errors["finite_difference"] < 1e-9)


def test_residual_with_finite_differences(reference_of):
    case = Case("mlp_layernorm", "mse", "batches")
    H, _, _ = reference_of(case)
    problem = case.build()
    kwargs = {"dtype": F64, **problem.data_kwargs}
    ggn = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, **kwargs)
    residual = ts.GaussNewtonResidual(problem.model, problem.loss_fn, problem.data,
                                      hvp_method="finite_difference4", **kwargs)
    exact = ts.GaussNewtonResidual(problem.model, problem.loss_fn, problem.data, **kwargs)
    V = _randn(H.shape[0], 3, seed=9)
    RV = residual @ V
    assert relative_error(RV + ggn @ V, H @ V) < 1e-9
    assert relative_error(RV, exact @ V) < 1e-6
    assert residual.product_error > 0 and ggn.product_error == 0 and exact.product_error == 0


def test_bad_finite_difference_options():
    with pytest.raises(ValueError, match="2 or 4 points, got 3"):
        hvp.FiniteDifference(points=3)
    problem = Case("mlp_relu", "ce", "tuple").build()
    with pytest.raises(ValueError, match=r"hvp_method must be one of .*'finite_difference'"):
        problem.operator(hvp_method="finite_differences")


DIST_CASE = Case("mlp_layernorm", "ce", "tuple")
BOUNDS = (0, 7, 23)


def _distributed_worker(rank: int, world: int, folder) -> dict:
    problem = DIST_CASE.build()
    part = slice(BOUNDS[rank], BOUNDS[rank + 1])
    op = ts.HessianOperator(problem.model, problem.loss_fn,
                            (problem.inputs[part], problem.targets[part]), dtype=F64,
                            batch_size=4, hvp_method="finite_difference4")
    block = op @ _randn(op.shape[0], 2, seed=10)
    return {"block": block, "error": op.last_product_error, "distributed": op.distributed}


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_distributed_finite_differences(tmp_path, reference_of):
    H, _, _ = reference_of(DIST_CASE)
    results = [result["ok"] for result in launch(_distributed_worker, tmp_path, timeout_s=10)]
    V = _randn(H.shape[0], 2, seed=10)
    for got in results:
        assert got["distributed"] and relative_error(got["block"], H @ V) < 1e-9
        assert 0 < got["error"] < 1e-6
    assert torch.equal(results[0]["block"], results[1]["block"])
    assert results[0]["error"] == results[1]["error"]
