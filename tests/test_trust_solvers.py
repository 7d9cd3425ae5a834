"""Issue 12: no silent wrong answer and no raw torch error from the solvers and the operator.

A tolerance below the dtype's precision floor stops early with ``converged=False`` and a warning
that names a reachable tolerance (which is then checked to be reachable); mixed dtypes are
converted or refused with a message; ``hvp_method="jvp"`` in train mode and ``params=`` naming
only unused parameters say what is wrong. References: dense ``eigh`` in float64.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tinysubspace as ts
from tinysubspace.linalg.stagnation import ProgressWatch, reachable_tolerance

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


def spectrum_matrix(p: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """``Q diag(10, 8, 6, 5, 4, bulk in [-1, 1]) Qᵀ`` with a random orthogonal ``Q``."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0], dtype=F64),
                        2 * torch.rand(p - 5, generator=gen, dtype=F64) - 1])
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    return ((A + A.T) / 2).to(dtype)


# ------------------------------------------------------------ tolerance below the precision floor
@pytest.mark.parametrize("block_size", [None, 2])
def test_float32_tolerance_below_the_floor_stops_early_and_warns(block_size):
    """float32, tol 1e-9, p = 200: the solver used to grind to its 50·p = 10,000-product
    budget. Now it stops far earlier, says ``converged=False`` with honest residuals, and the
    tolerance its warning proposes is reached by a second solve (without a warning)."""
    A = spectrum_matrix(200, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"tol=1\.0e-09 is below what this float32 operator "
                                            r"can reach.*converged=False\. Use tol >= (\S+),"):
        result = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-9, block_size=block_size)
    assert not result.converged and not result.multiplicity_checked
    assert result.matvecs < 1000  # 50·p = 10,000 before
    A64 = A.double()
    V, values = result.vectors.double(), result.values.double()
    residuals = (A64 @ V - V * values).norm(dim=0)
    assert torch.allclose(result.residuals.double(), residuals, rtol=0.05, atol=1e-5)
    exact = torch.linalg.eigvalsh(A64).flip(0)[:5]
    assert float((values - exact).abs().max()) < 1e-5 * 10  # the best float32 can do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-9, block_size=block_size)
    proposed = float(re.search(r"Use tol >= (\S+),", str(caught[0].message)).group(1))
    assert 1e-8 < proposed < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reachable tolerance: no warning
        again = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=proposed, block_size=block_size)
    assert again.converged and again.multiplicity_checked


def test_float32_hessian_below_the_floor_stops_early():
    """A float32 Hessian (an MLP on 200 examples, p = 143) at tol 1e-9, warm-started as in the
    issue's 9-minute digits case: stops with converged=False and a warning."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 8, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    model = ts.build_model("fc", (8,), 3, seed=0, widths=(10, 5))
    op = ts.HessianOperator(model, nn.functional.cross_entropy, (X, Y))
    assert op.dtype == torch.float32
    first = ts.top_eigenpairs(op, k=6, tol=1e-4)
    with pytest.warns(RuntimeWarning, match="below what this float32 operator can reach"):
        result = ts.top_eigenpairs(op, k=6, tol=1e-9, init=first.vectors)
    assert not result.converged and result.matvecs < 20 * op.shape[0]


def test_progress_watch_is_armed_only_near_the_floor():
    """float64 at ordinary tolerances is never watched (its results cannot change); float32 near
    its floor is."""
    assert not ProgressWatch(1e-10, F64, 10**6, window=100).armed
    assert not ProgressWatch(1e-6, F64, 100, window=100).armed
    assert ProgressWatch(1e-4, torch.float32, 200, window=100).armed
    assert ProgressWatch(1e-14, F64, 200, window=100).armed
    watch = ProgressWatch(1e-9, torch.float32, 200, window=10)
    for used, residual in enumerate([1.0, 0.4, 0.1, 0.04, 0.03, 0.03, 0.025, 0.03, 0.03, 0.03,
                                     0.03, 0.03, 0.03, 0.03]):
        stalled = watch.update(residual, used)
    assert stalled and watch.best == 0.025  # no halving since 0.04 at product 3
    assert reachable_tolerance(3.2e-7) == 7e-7 and reachable_tolerance(5e-7) == 1e-6


# ------------------------------------------------------------ dtypes and kinds of input
@pytest.mark.parametrize("block_size", [1, 3])
def test_float32_init_on_a_float64_operator_is_converted(block_size):
    A = spectrum_matrix(80)
    Q = torch.linalg.eigh(A)[1].flip(1)[:, :3]
    init32 = (Q + 1e-3 * torch.randn(80, 3, generator=torch.Generator().manual_seed(1),
                                     dtype=F64)).float()
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-10, init=init32,
                               block_size=block_size)
    assert result.values.dtype == F64 and result.converged
    exact = torch.linalg.eigvalsh(A).flip(0)[:3]
    assert torch.allclose(result.values, exact, rtol=0, atol=1e-9)
    tracked = ts.track_eigenpairs(ts.DenseOperator(A), 3, init32, tol=1e-10)
    assert tracked.values.dtype == F64
    assert torch.allclose(tracked.values, exact, rtol=0, atol=1e-9)


class WrongDtypeOperator:
    """Declares float64 but computes in float32 (a user's operator with a bug)."""

    shape = (30, 30)
    dtype = F64
    device = torch.device("cpu")

    def __matmul__(self, block: torch.Tensor) -> torch.Tensor:
        return torch.arange(30, dtype=torch.float32)[:, None] * block.float()


def test_bad_operators_and_inits_are_named():
    op = ts.DenseOperator(torch.diag(torch.arange(30, 0, -1, dtype=F64)))
    with pytest.raises(ValueError, match=r"op @ block must return a tensor of the block's shape "
                                         r"\(30, 1\), dtype torch.float64.*got shape \(30, 1\), "
                                         r"dtype torch.float32"):
        ts.top_eigenpairs(WrongDtypeOperator(), k=3)
    with pytest.raises(ValueError, match="op @ block must return a tensor"):
        ts.top_eigenpairs(WrongDtypeOperator(), k=3, init=torch.ones(30, 3), block_size=3)
    with pytest.raises(TypeError, match=r"init must be a torch.Tensor of shape \(30,\) or "
                                        r"\(30, m\), got ndarray"):
        ts.top_eigenpairs(op, k=3, init=np.ones((30, 3)))
    with pytest.raises(ValueError, match="init must be real"):
        ts.top_eigenpairs(op, k=3, init=torch.ones(30, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="check_steps must be a non-negative integer, got -1"):
        ts.top_eigenpairs(op, k=3, check_steps=-1)
    with pytest.raises(ValueError, match=r"real floating-point torch dtype, got torch\.int64"):
        ts.top_eigenpairs(torch.diag(torch.arange(30, 0, -1)), k=3)


# ------------------------------------------------------------ the Hessian operator's inputs
def seeded(build, seed: int = 0):
    """``build()`` with torch's global RNG seeded and restored afterwards (layer init draws
    from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(20, 4, generator=gen), torch.arange(20) % 3


def test_jvp_in_train_mode_with_batch_norm_or_dropout_is_refused():
    X, Y = data()
    loss = nn.functional.cross_entropy
    for layer, name in [(nn.BatchNorm1d(5), "BatchNorm1d"), (nn.Dropout(0.5), "Dropout")]:
        model = seeded(lambda: nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 3)))  # noqa: B023
        with pytest.raises(ValueError, match=rf"hvp_method='jvp' cannot run mode='train' with "
                                             rf"{name}.*use hvp_method='loop'"):
            ts.HessianOperator(model, loss, (X, Y), mode="train", hvp_method="jvp")
        for method in ("loop", "auto"):  # what the message proposes works
            op = ts.HessianOperator(model, loss, (X, Y), mode="train", hvp_method=method)
            if name == "BatchNorm1d":  # (dropout in train mode draws from the global RNG)
                assert bool(torch.isfinite(op @ torch.ones(op.shape[0])).all())
    plain = seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    jvp = ts.HessianOperator(plain, loss, (X, Y), mode="train", hvp_method="jvp")
    loop = ts.HessianOperator(plain, loss, (X, Y), mode="train", hvp_method="loop")
    v = torch.ones(jvp.shape[0])
    assert torch.allclose(jvp @ v, loop @ v, rtol=1e-5, atol=1e-6)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(2, 2)  # never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_params_naming_only_unused_parameters_is_named(method):
    X, Y = data()
    model = seeded(Unused)
    op = ts.HessianOperator(model, nn.functional.cross_entropy, (X, Y), params=["spare.weight"],
                            hvp_method=method)
    message = (r"the loss does not depend on any measured parameter \(spare.weight\).*pass "
               r"params= naming parameters the model's forward uses")
    with pytest.raises(ValueError, match=message):
        op @ torch.ones(op.shape[0])
    with pytest.raises(ValueError, match=message):
        op.loss_and_gradient()
    mixed = ts.HessianOperator(model, nn.functional.cross_entropy, (X, Y),
                               params=["spare.weight", "used.bias"], hvp_method=method)
    out = mixed @ torch.ones(mixed.shape[0])  # one used parameter: fine, zero rows elsewhere
    assert mixed.layout.names == ("used.bias", "spare.weight")
    assert torch.equal(out[3:], torch.zeros(4)) and bool(out[:3].abs().sum() > 0)
