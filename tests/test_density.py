"""SLQ and the exact spectrum against eigvalsh of dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import wasserstein_distance

import tinysubspace as ts
from tinysubspace.linalg.density import (
    SpectralDensity,
    broadened_density,
    exact_spectrum,
    spectral_density,
)
from tinysubspace.results.spectrum import density_arrays

# SLQ error bound used below: Wasserstein-1 distance between the SLQ quadrature measure and the
# exact eigenvalue measure (1/p) Σ δ(λ_i), as a fraction of the spectral range max λ − min λ.
# Measured: 0.008-0.010 (dense, 40 steps x 8 probes), 0.007-0.012 (Hessian, p = 83, 40 steps x
# 16 probes, seeds 0-3).
W1_FRACTION = 0.025


def wishart(p: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(p, n, generator=gen, dtype=torch.float64)
    return X @ X.T / n


def w1(dens: SpectralDensity, exact: torch.Tensor) -> float:
    return wasserstein_distance(dens.nodes.reshape(-1).numpy(), exact.numpy(),
                                u_weights=dens.weights.reshape(-1).numpy())


def test_full_dimension_lanczos_on_diagonal_gives_exact_quadrature():
    # For A = diag(d) and a Rademacher probe, every component of the unit probe in the
    # eigenbasis is ±1/sqrt(p): the p-step rule has nodes d (sorted) and weights exactly 1/p.
    d = torch.tensor([0.5, -1.0, 3.0, 2.0, 7.5, 0.1], dtype=torch.float64)
    dens = spectral_density(ts.DenseOperator(torch.diag(d)), steps=6, probes=1, seed=3)
    torch.testing.assert_close(dens.nodes[0], d.sort().values, rtol=0, atol=1e-12)
    torch.testing.assert_close(dens.weights[0], torch.full((6,), 1 / 6, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_quadrature_moments_match_probe_moments():
    # Gauss quadrature with m nodes integrates polynomials of degree < 2m exactly:
    # Σ τ_j θ_j^n = vᵀ A^n v for the (normalised) probe, n = 0 … 2m − 1.
    A = wishart(40, 80, seed=0)
    gen = torch.Generator().manual_seed(11)
    dens = spectral_density(ts.DenseOperator(A), steps=5, probes=1, seed=gen)
    v = (2 * torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(11)) - 1).double()
    v = v / v.norm()
    for n in range(10):
        expected = float(v @ torch.linalg.matrix_power(A, n) @ v)
        got = float((dens.weights[0] * dens.nodes[0] ** n).sum())
        assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_slq_density_integrates_to_one_and_matches_dense_matrix(probe):
    A = wishart(300, 600, seed=1)
    exact = torch.linalg.eigvalsh(A)
    dens = spectral_density(ts.DenseOperator(A), steps=40, probes=8, seed=0, probe=probe)
    assert dens.nodes.shape == dens.weights.shape == (8, 40)
    assert float(dens.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    spread = float(exact.max() - exact.min())
    assert w1(dens, exact) < W1_FRACTION * spread
    sigma = 0.02 * spread
    grid, density = dens.density(sigma=sigma)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    reference = broadened_density(exact, None, grid, sigma)
    assert float(torch.trapezoid(reference, grid)) == pytest.approx(1.0, abs=1e-6)
    l1 = float(torch.trapezoid((density - reference).abs(), grid))
    assert l1 < 0.15  # total variation of the smoothed densities (measured: about 0.06)


def test_more_probes_and_steps_reduce_the_error():
    A = wishart(200, 300, seed=2)
    exact = torch.linalg.eigvalsh(A)
    op = ts.DenseOperator(A)
    coarse = w1(spectral_density(op, steps=4, probes=1, seed=0), exact)
    fine = w1(spectral_density(op, steps=40, probes=16, seed=0), exact)
    assert fine < coarse / 3


def test_seeded_and_reproducible():
    op = ts.DenseOperator(wishart(50, 60, seed=3))
    a = spectral_density(op, steps=10, probes=2, seed=5)
    b = spectral_density(op, steps=10, probes=2, seed=5)
    c = spectral_density(op, steps=10, probes=2, seed=6)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert a.seed == 5 and a.probes == 2 and a.steps == 10 and a.dimension == 50


def test_invariant_krylov_space_is_padded_with_zero_weight():
    # Three distinct eigenvalues: Lanczos stops after 3 steps; the 5-step row is padded.
    d = torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=torch.float64)
    dens = spectral_density(ts.DenseOperator(torch.diag(d)), steps=5, probes=1, seed=0)
    torch.testing.assert_close(dens.nodes[0, :3], torch.tensor([1.0, 2.0, 5.0],
                                                               dtype=torch.float64))
    torch.testing.assert_close(dens.weights[0, :3], torch.full((3,), 1 / 3,
                                                               dtype=torch.float64))
    assert torch.all(dens.weights[0, 3:] == 0)


def test_to_arrays_has_the_run_store_keys():
    dens = spectral_density(ts.DenseOperator(wishart(20, 30, seed=4)), steps=8, probes=2)
    arrays = density_arrays(dens, sigma=0.05)
    assert set(arrays) == {"nodes", "weights", "grid", "density", "sigma", "dimension"}
    assert arrays["nodes"].shape == (2, 8) and float(arrays["sigma"]) == 0.05
    assert int(arrays["dimension"]) == 20


def test_broadened_density_of_one_point_is_a_gaussian():
    grid = torch.linspace(-3, 5, 9, dtype=torch.float64)
    got = broadened_density(torch.tensor([1.0]), torch.tensor([0.5]), grid, sigma=2.0)
    expected = 0.5 * torch.exp(-0.5 * ((grid - 1) / 2) ** 2) / (2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(got, expected)


def test_bad_arguments_raise():
    op = ts.DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps must be between 1 and p = 4"):
        spectral_density(op, steps=5)
    with pytest.raises(ValueError, match="probes must be at least 1"):
        spectral_density(op, steps=2, probes=0)
    with pytest.raises(ValueError, match="probe must be one of"):
        spectral_density(op, steps=2, probe="uniform")
    with pytest.raises(ValueError, match="sigma must be positive"):
        broadened_density(torch.zeros(2), None, torch.zeros(3), sigma=0.0)
    with pytest.raises(ValueError, match="weights have shape"):
        broadened_density(torch.zeros(2), torch.zeros(3), torch.zeros(3), sigma=1.0)
    with pytest.raises(ValueError, match="larger than max_size = 3"):
        exact_spectrum(op, max_size=3)
    with pytest.raises(ValueError, match="block must be at least 1"):
        exact_spectrum(op, block=0)


# ------------------------------------------------------------- a Hessian small enough for eigvalsh
def small_problem():
    torch.manual_seed(0)  # only for the module's default initialisation, in this test
    model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3)).double()
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (64,), generator=gen)
    return model, X, Y


def dense_reference_hessian(model, X, Y) -> torch.Tensor:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = math.prod(shape)
            params[name] = flat[start:start + size].view(shape)
            start += size
        out = torch.func.functional_call(model, params, (X,))
        return torch.nn.functional.cross_entropy(out, Y)

    H = torch.autograd.functional.hessian(loss, flat0)
    # check the reference: central differences of the gradient along one direction
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    gp = torch.autograd.functional.jacobian(loss, flat0 + h * v)
    gm = torch.autograd.functional.jacobian(loss, flat0 - h * v)
    torch.testing.assert_close(H @ v, (gp - gm) / (2 * h), rtol=1e-6, atol=1e-8)
    return H


def test_exact_spectrum_of_a_hessian_matches_eigvalsh_of_the_dense_hessian():
    model, X, Y = small_problem()
    H = dense_reference_hessian(model, X, Y)
    expected = torch.linalg.eigvalsh(H).flip(0)
    op = ts.HessianOperator(model, torch.nn.functional.cross_entropy, (X, Y))
    got = exact_spectrum(op, block=16)
    assert got.shape == (op.shape[0],) == (83,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert op.matvecs == 83


def test_slq_on_a_hessian_matches_its_exact_spectrum():
    model, X, Y = small_problem()
    op = ts.HessianOperator(model, torch.nn.functional.cross_entropy, (X, Y))
    exact = torch.linalg.eigvalsh(dense_reference_hessian(model, X, Y))
    dens = spectral_density(op, steps=40, probes=16, seed=0)
    spread = float(exact.max() - exact.min())
    assert w1(dens, exact) < W1_FRACTION * spread
    grid, density = dens.density()
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
