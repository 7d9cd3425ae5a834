"""Issue 24 item 5 and issue 22's product error: low-precision operators never hang, and stop
honestly at their precision floor.

References: the float64 Hessian of the same (rounded) parameters and data by
``torch.autograd.functional.hessian`` (tests/reference.py) and dense ``eigh`` in float64. The
half-precision reproducer runs in a subprocess with a timeout: a hang fails the test instead of
stalling the suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

import tinysubspace as ts
from reference import FlatLoss, reference_hessian
from tinysubspace.linalg import basis as basis_module
from tinysubspace.linalg.basis import KrylovBasis, drop_tolerance, orthonormalize_against
from tinysubspace.linalg.tolerance import ConvergenceCriterion

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
HALF = [torch.float16, torch.bfloat16]
SRC = Path(__file__).resolve().parents[1] / "src"

REPRODUCER = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    import tinysubspace as ts
    out = {}
    for name in ("float16", "bfloat16"):
        dtype = getattr(torch, name)
        gen = torch.Generator().manual_seed(0)
        model = torch.nn.Linear(64, 10)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model = model.to(dtype)
        X = torch.randn(100, 64, generator=gen).to(dtype)
        Y = torch.randint(0, 10, (100,), generator=gen)
        op = ts.HessianOperator(model, F.cross_entropy, (X, Y))
        eig = ts.top_eigenpairs(op, k=3, tol=1e-2)
        torch.save((model.state_dict(), X, Y), f"{sys.argv[1]}/{name}.pt")
        out[name] = {"values": eig.values.double().tolist(), "dtype": str(eig.values.dtype),
                     "converged": eig.converged, "matvecs": eig.matvecs}
    print(json.dumps(out))
""")


def test_half_precision_hessian_returns_within_its_precision(tmp_path):
    """The issue's reproducer (float16, and bfloat16) used to spin forever: every random start
    column was dropped by a dependence bar ``100 ε √p ≥ 1``. It returns within seconds, in the
    operator's dtype, converged at tol 1e-2, with eigenvalues within ``tol·λ1 + 2 ε λ1`` of the
    float64 Hessian of the same rounded parameters and data."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", REPRODUCER, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, got in results.items():
        dtype = getattr(torch, name)
        assert got["dtype"] == str(dtype) and got["converged"] and got["matvecs"] < 200
        state, X, Y = torch.load(tmp_path / f"{name}.pt")
        model = torch.nn.utils.skip_init(torch.nn.Linear, 64, 10, dtype=dtype)  # no global RNG
        model.load_state_dict(state)
        H = reference_hessian(FlatLoss(model, F.cross_entropy, X, Y))
        exact = torch.linalg.eigvalsh(H).flip(0)[:3]
        error = float((torch.tensor(got["values"], dtype=F64) - exact).abs().max())
        assert error <= (1e-2 + 2 * torch.finfo(dtype).eps) * float(exact[0])


def spectrum_matrix(p: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(10, 8, 6, 5, 4, bulk in [0, 3]) Qᵀ`` (float64) and its top five eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0], dtype=F64),
                        3 * torch.rand(p - 5, generator=gen, dtype=F64)])
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    return (A + A.T) / 2, values[:5]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_dense_operator_converges_or_stops_at_its_floor(dtype):
    """A float16 / bfloat16 dense operator: tol 1e-2 converges (eigenvalues within the dtype's
    reach of the float64 ones, exact residuals of the returned half vectors checked); tol 1e-6
    is below the floor and stops after a few hundred products with a warning naming the dtype,
    where it used to hang."""
    A, top = spectrum_matrix()
    op = ts.DenseOperator(A.to(dtype))
    eig = ts.top_eigenpairs(op, k=5, tol=1e-2)
    eps = torch.finfo(dtype).eps
    assert eig.converged and eig.multiplicity_checked and eig.values.dtype == dtype
    assert float((eig.values.double() - top).abs().max()) <= (1e-2 + 2 * eps) * 10
    V = eig.vectors.double()
    assert float((V.T @ V - torch.eye(5, dtype=F64)).abs().max()) < 4 * eps
    residuals = (A @ V - V * eig.values.double()).norm(dim=0)
    assert float(residuals.max()) <= (1e-2 + 20 * eps) * 10  # half vectors, float64 operator
    with pytest.warns(RuntimeWarning, match=f"below what this {str(dtype)[6:]} operator can "):
        low = ts.top_eigenpairs(ts.DenseOperator(A.to(dtype)), k=5, tol=1e-6)
    assert not low.converged and low.matvecs < 1000  # the budget is 50 p = 10,000
    assert float((low.values.double() - top).abs().max()) <= 4 * eps * 10


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_tracking_and_density(dtype):
    """A warm start of a half operator (vectors kept in float32 between the solves) and an SLQ
    density of it: both return; the density's first moment is the trace to the dtype's
    precision (the Gauss rule is exact for ``f(t) = t``)."""
    A, top = spectrum_matrix()
    op = ts.DenseOperator(A.to(dtype))
    first = ts.top_eigenpairs(op, k=5, tol=1e-2)
    again = ts.track_eigenpairs(op, k=5, previous=first, tol=1e-2)
    assert again.converged and again.values.dtype == dtype
    reach = (1e-2 + 2 * torch.finfo(dtype).eps) * 10
    assert float((again.values.double() - top).abs().max()) <= reach
    density = ts.spectral_density(op, steps=20, probes=4, seed=0)
    assert density.nodes.shape == (4, 20) and bool(torch.isfinite(density.nodes).all())
    assert float(density.nodes.max()) <= 10.0 * (1 + 4 * torch.finfo(dtype).eps)


def test_drop_tolerance_is_below_one_and_redraws_are_bounded(monkeypatch):
    """The dependence bar is the working precision's (float32 for half operators), so it stays
    far below 1 for any p; and a bar that drops everything raises after a bounded number of
    draws instead of looping forever."""
    for dtype in (*HALF, torch.float32, F64):
        assert drop_tolerance(dtype, 10**8) <= 0.25
    assert drop_tolerance(torch.bfloat16, 650) < 1e-3
    block = torch.randn(650, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kept = orthonormalize_against(block, None)
    assert kept.shape == (650, 4) and kept.dtype == torch.bfloat16
    full = KrylovBasis(3, F64, torch.device("cpu"), 3, images=False)
    full.fill_random(3, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"leave 0 of p = 3 dimensions"):
        full.random_direction(torch.Generator().manual_seed(1))
    monkeypatch.setattr(basis_module, "drop_tolerance", lambda dtype, p: 2.0)
    space = KrylovBasis(30, torch.float32, torch.device("cpu"), 2, images=False)
    with pytest.raises(RuntimeError, match=r"8 random blocks in p = 30 dimensions left 2 of 2 "):
        space.fill_random(2, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the operator's product error
class NoisyOperator(ts.DenseOperator):
    """``A v + δ ‖A‖ ‖v‖ z`` with ``z`` a seeded random unit vector per column: products of
    relative error exactly ``δ`` (as a finite-difference ``H·v`` has), declared as
    ``product_error``."""

    def __init__(self, matrix: torch.Tensor, delta: float, seed: int = 0) -> None:
        super().__init__(matrix)
        self.product_error = delta
        self._norm = float(torch.linalg.matrix_norm(matrix, ord=2))
        self._gen = torch.Generator().manual_seed(seed)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        z = torch.randn(block.shape, generator=self._gen, dtype=block.dtype)
        z = z / z.norm(dim=0)
        return self.matrix @ block + self.product_error * self._norm * block.norm(dim=0) * z


def test_tolerance_below_the_product_error_stops_honestly():
    """float64 products with relative error 1e-6: tol 1e-9 was never watched (float64) and ran
    to its 50·p budget; the criterion's floor now includes ``op.product_error``, so it stops
    after a few hundred products, warns with the product error, and its eigenvalues are right to
    about that error. tol 1e-4 (above it) converges as before."""
    A, top = spectrum_matrix()
    delta = 1e-6
    criterion = ConvergenceCriterion.for_operator(NoisyOperator(A, delta), 1e-9)
    assert criterion.floor == delta and criterion.armed
    assert not ConvergenceCriterion.for_operator(ts.DenseOperator(A), 1e-9).armed
    with pytest.warns(RuntimeWarning, match=r"float64 operator \(products accurate to 1\.0e-06 "
                                            r"relative\) can reach"):
        low = ts.top_eigenpairs(NoisyOperator(A, delta), k=5, tol=1e-9)
    assert not low.converged and low.matvecs < 1000
    assert float((low.values - top).abs().max()) <= 10 * delta * 10
    fine = ts.top_eigenpairs(NoisyOperator(A, delta), k=5, tol=1e-4)
    assert fine.converged and float((fine.values - top).abs().max()) <= 1e-4 * 10
    V = fine.vectors
    assert float((A @ V - V * fine.values).norm(dim=0).max()) <= 1e-4 * 10 + 10 * delta * 10


@pytest.mark.parametrize("error", [-1e-3, 1.0, math.nan, "1e-6"])
def test_a_bad_product_error_is_named(error):
    A, _ = spectrum_matrix(20)
    op = ts.DenseOperator(A)
    op.product_error = error
    with pytest.raises(ValueError, match=r"op\.product_error must be a relative error in "
                                         r"\[0, 1\), got"):
        ts.top_eigenpairs(op, k=2)
