"""lanczos_tridiagonal and orthonormalize_against against known matrices and invariants."""

from __future__ import annotations

import pytest
import torch

import tinysubspace as ts
from tinysubspace.linalg.basis import orthonormalize_against, random_block

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


def known_matrix(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    return (A + A.T) / 2


def start_vector(p: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_full_dimension_reproduces_the_spectrum():
    values = torch.cat([torch.linspace(-3.0, 5.0, 39, dtype=F64), torch.tensor([12.0], dtype=F64)])
    A = known_matrix(values)
    op = ts.DenseOperator(A)
    tri = ts.lanczos_tridiagonal(op, start_vector(40), steps=40, keep_basis=True)
    assert tri.alpha.shape == (40,) and tri.beta.shape == (39,)
    assert torch.allclose(torch.linalg.eigvalsh(tri.matrix()), values, rtol=0, atol=1e-10)
    Q = tri.basis
    assert float((Q.T @ Q - torch.eye(40, dtype=F64)).abs().max()) < 1e-12
    assert float((Q.T @ A @ Q - tri.matrix()).abs().max()) < 1e-10
    assert torch.all(tri.beta > 0)
    assert op.matvecs == 40


def test_partial_run_satisfies_the_lanczos_relation():
    A = known_matrix(torch.linspace(0.0, 1.0, 30, dtype=F64))
    start = start_vector(30)
    tri = ts.lanczos_tridiagonal(ts.DenseOperator(A), start, steps=8, keep_basis=True)
    Q = tri.basis
    assert Q.shape == (30, 8)
    assert torch.allclose(Q[:, 0], start / start.norm(), rtol=0, atol=1e-15)
    assert float((Q.T @ A @ Q - tri.matrix()).abs().max()) < 1e-12
    # the extreme Ritz values interlace: inside the spectrum
    ritz = torch.linalg.eigvalsh(tri.matrix())
    assert float(ritz.min()) >= 0.0 and float(ritz.max()) <= 1.0
    assert ts.lanczos_tridiagonal(ts.DenseOperator(A), start, steps=8).basis is None


def test_stops_early_on_an_invariant_subspace():
    """A start vector inside a 3-dim eigenspace sum: exact eigenvalues after 3 steps."""
    values = torch.arange(1.0, 21.0, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    start = Q[:, 4] + 2 * Q[:, 9] - Q[:, 17]
    tri = ts.lanczos_tridiagonal(ts.DenseOperator((A + A.T) / 2), start, steps=10)
    assert tri.alpha.shape == (3,) and tri.beta.shape == (2,)
    assert torch.allclose(torch.linalg.eigvalsh(tri.matrix()),
                          torch.tensor([5.0, 10.0, 18.0], dtype=F64), rtol=0, atol=1e-10)


def test_float32_full_dimension():
    values = torch.linspace(1.0, 2.0, 20, dtype=F64)
    A = known_matrix(values).float()
    tri = ts.lanczos_tridiagonal(ts.DenseOperator(A), start_vector(20).float(), steps=20)
    assert tri.alpha.dtype == torch.float32
    assert torch.allclose(torch.linalg.eigvalsh(tri.matrix()).double(), values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [0, 21])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match=r"steps must be between 1 and p = 20, got " + str(steps)):
        ts.lanczos_tridiagonal(ts.DenseOperator(torch.eye(20, dtype=F64)), start_vector(20), steps)


def test_zero_start_vector():
    with pytest.raises(ValueError, match="start vector of Lanczos must be non-zero"):
        ts.lanczos_tridiagonal(ts.DenseOperator(torch.eye(5, dtype=F64)),
                               torch.zeros(5, dtype=F64), 3)


def test_orthonormalize_against():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(30, 4, generator=gen, dtype=F64))
    block = torch.randn(30, 3, generator=gen, dtype=F64)
    block = torch.cat([block, basis @ torch.ones(4, 1, dtype=F64),  # already spanned
                       block[:, :1] + block[:, 1:2]], 1)  # dependent on earlier columns
    out = orthonormalize_against(block, basis)
    assert out.shape == (30, 3)
    assert float((out.T @ out - torch.eye(3, dtype=F64)).abs().max()) < 1e-14
    assert float((basis.T @ out).abs().max()) < 1e-14
    # the span is that of the projected block
    projected = block[:, :3] - basis @ (basis.T @ block[:, :3])
    assert float((projected - out @ (out.T @ projected)).norm()) < 1e-12
    assert orthonormalize_against(basis, basis).shape == (30, 0)
    assert orthonormalize_against(block, None).shape == (30, 4)


def test_random_block_is_seeded_and_leaves_global_rng_alone():
    first = random_block(5, 2, F64, torch.device("cpu"), torch.Generator().manual_seed(3))
    again = random_block(5, 2, F64, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert first.shape == (5, 2) and torch.equal(first, again)
