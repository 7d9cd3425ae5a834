"""The toy model of Section 3 / Appendix E against autograd, dense eigh and its closed form.

Tolerances are stated where they are used. Two recurring ones:

* "machine precision" for quantities that are exactly zero in exact arithmetic: the Hessian's
  entries are at most ``‖x̃‖² / 4 ≤ 1/2`` and ``eigvalsh`` is backward stable, so a zero
  eigenvalue comes out below ``p · eps · ‖H‖ ≈ 1e-15`` for the ``p ≤ 24`` used here.
* the late-time solution of eqs. 15–18 neglects terms that are relatively ``O(1/(ηt))``
  (eq. 14 for eq. 13) and a drift ``−(1 − η/2) log(ηt)`` of the "constants" ``c_i`` (discrete
  steps and the exact loss, see ``discrete_drift``); with ``η = 1`` the drift moves ``1/λ`` by
  ``½ ln 100 ≈ 2.3`` between ``t = 100`` and ``t = 10⁴``, so a constant fit is good to
  ``2.5/(ηt)`` relative there.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch

import tinysubspace as ts
from tinysubspace.cli import toy as toy_command
from tinysubspace.plots import toy as toy_plots
from tinysubspace.problems import toy
from tinysubspace.problems.toy import ToyConfig

F64 = torch.float64
EPS = torch.finfo(F64).eps


def random_theta(data: toy.ToyData, biases: bool, seed: int = 0, scale: float = 1.0):
    p = data.k * (data.inputs.shape[1] + biases)
    return scale * torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def autograd_gradient(loss, theta):
    leaf = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(loss(leaf), leaf)[0]


# ------------------------------------------------------------------------------ data
def test_data_is_a_balanced_mixture_with_unit_means():
    data = toy.make_toy_data(k=3, d=7, n=9, sigma=0.0, seed=1, orthogonal=True)
    assert torch.allclose(data.means @ data.means.T, torch.eye(3, dtype=F64), atol=1e-14)
    assert data.labels.tolist() == [0, 1, 2] * 3
    assert torch.equal(data.inputs, data.means[data.labels])  # σ = 0: samples at the means
    noisy = toy.make_toy_data(k=3, d=7, n=9, sigma=0.1, seed=1)
    assert torch.allclose(noisy.means.norm(dim=1), torch.ones(3, dtype=F64), atol=1e-14)
    same = toy.make_toy_data(k=3, d=7, n=9, sigma=0.2, seed=1)  # same μ and ε, σ doubled
    assert torch.allclose(same.inputs - same.means[same.labels],
                          2 * (noisy.inputs - noisy.means[noisy.labels]), atol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 1, "d": 5, "n": 4, "sigma": 0.0}, "at least 2 classes"),
    ({"k": 2, "d": 5, "n": 5, "sigma": 0.0}, "multiple of k = 2"),
    ({"k": 3, "d": 2, "n": 3, "sigma": 0.0, "orthogonal": True}, "at least k = 3"),
    ({"k": 2, "d": 5, "n": 4, "sigma": -0.1}, "non-negative"),
])
def test_data_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.make_toy_data(**kwargs)


def test_config_and_model_reject_bad_arguments():
    with pytest.raises(ValueError, match="eta must be positive"):
        ToyConfig(eta=0.0)
    with pytest.raises(ValueError, match="fewer than the p = 4 parameters"):
        ToyConfig(d=2, bulk=2)
    data = toy.make_toy_data(k=2, d=3, n=2, sigma=0.0)
    with pytest.raises(ValueError, match=r"theta must have shape \(8,\)"):
        toy.softmax_loss(torch.zeros(6, dtype=F64), data, biases=True)


@pytest.mark.parametrize("function", [
    toy.softmax_loss, toy.softmax_gradient, toy.softmax_hessian, toy.SoftmaxHessian,
    toy.data_span_spectrum,
])
def test_every_closed_form_checks_the_shape_of_theta(function):
    data = toy.make_toy_data(k=2, d=3, n=2, sigma=0.0)
    with pytest.raises(ValueError, match=r"theta must have shape \(8,\) for k = 2, d = 3"):
        function(torch.zeros(6, dtype=F64), data, True)


def test_simulate_rejects_data_of_another_shape():
    data = toy.make_toy_data(k=3, d=6, n=3, sigma=0.0)
    with pytest.raises(ValueError, match=r"k = 3 classes .* do not fit config\.k = 2"):
        toy.simulate(ToyConfig(d=6, n=2, steps=2), data=data)
    small = toy.make_toy_data(k=2, d=1, n=2, sigma=0.0)  # p = 2: no room for 2 + 2 eigenpairs
    with pytest.raises(ValueError, match="p = 2 parameters"):
        toy.simulate(ToyConfig(d=6, n=2, steps=2), data=small)


def test_power_law_exponent_closed_form_and_bad_input():
    x = torch.tensor([0.01, 0.02, 0.05], dtype=F64)
    assert toy.power_law_exponent(x, 7 * x ** 2.5) == pytest.approx(2.5, abs=1e-12)
    with pytest.raises(ValueError, match="positive finite values"):
        toy.power_law_exponent(x, torch.tensor([1.0, 0.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="one length ≥ 2"):
        toy.power_law_exponent(x[:1], x[:1])
    with pytest.raises(ValueError, match="all x are equal"):
        toy.power_law_exponent(torch.ones(3, dtype=F64), x)


def test_the_facade_reaches_every_public_name():
    from tinysubspace.problems.toy import analytic as toy_analytic
    from tinysubspace.problems.toy import model as toy_model

    for module in (toy_model, toy_analytic):
        for name in module.__all__:
            assert getattr(toy, name) is getattr(module, name)
            assert name in toy.__all__


# ----------------------------------------------------- closed forms against autograd
CASES = [(2, False, 0.0), (2, True, 0.0), (3, False, 0.3), (4, True, 0.3)]


@pytest.mark.parametrize("k, biases, sigma", CASES)
def test_closed_form_gradient_and_hessian_match_autograd(k, biases, sigma):
    data = toy.make_toy_data(k=k, d=5, n=2 * k, sigma=sigma, seed=k)
    theta = random_theta(data, biases)
    loss = lambda th: toy.softmax_loss(th, data, biases)  # noqa: E731
    grad = autograd_gradient(loss, theta)
    assert torch.allclose(toy.softmax_gradient(theta, data, biases), grad, rtol=0, atol=1e-14)
    dense = torch.autograd.functional.hessian(loss, theta)
    H = toy.softmax_hessian(theta, data, biases)
    assert torch.allclose(H, dense, rtol=0, atol=1e-14)  # entries ≤ 1/2: 1e-14 ≈ 50 eps
    V = torch.randn(theta.numel(), 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(toy.SoftmaxHessian(theta, data, biases) @ V, dense @ V, atol=1e-13)


def test_autograd_reference_matches_finite_differences_of_the_gradient():
    data = toy.make_toy_data(k=3, d=4, n=6, sigma=0.3, seed=0)
    theta = random_theta(data, True)
    dense = torch.autograd.functional.hessian(lambda th: toy.softmax_loss(th, data, True), theta)
    h = 1e-5  # central differences: error h² ‖∇³L‖ ≈ 1e-10, rounding eps/h ≈ 1e-11
    columns = [(toy.softmax_gradient(theta + h * e, data, True)
                - toy.softmax_gradient(theta - h * e, data, True)) / (2 * h)
               for e in torch.eye(theta.numel(), dtype=F64)]
    assert torch.allclose(torch.stack(columns, 1), dense, atol=1e-8)


@pytest.mark.parametrize("biases", [False, True])
def test_parameter_layout_is_that_of_nn_linear(biases):
    """The flat θ = (θ_1 … θ_k, b) is nn.Linear's (weight rows, then bias): HessianOperator on
    an nn.Linear gives the same loss, gradient and products."""
    data = toy.make_toy_data(k=3, d=4, n=6, sigma=0.3, seed=2)
    theta = random_theta(data, biases)
    model = torch.nn.Linear(4, 3, bias=biases).double()
    with torch.no_grad():
        model.weight.copy_(theta[:12].reshape(3, 4))
        if biases:
            model.bias.copy_(theta[12:])
    op = ts.HessianOperator(model, torch.nn.functional.cross_entropy, (data.inputs, data.labels))
    loss, grad = op.loss_and_gradient()
    assert loss == pytest.approx(float(toy.softmax_loss(theta, data, biases)), abs=1e-14)
    assert torch.allclose(grad, toy.softmax_gradient(theta, data, biases), atol=1e-14)
    V = torch.randn(theta.numel(), 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.allclose(op @ V, toy.SoftmaxHessian(theta, data, biases) @ V, atol=1e-13)


# ------------------------------------------------------------------- spectrum, rank
@pytest.mark.parametrize("k, biases", [(2, False), (2, True), (3, False), (4, True)])
def test_rank_is_k_times_k_minus_one_at_zero_noise(k, biases):
    """Footnote 14 (k(k−1)); Section 3 (rank 2 for k = 2). Random means, random θ."""
    data = toy.make_toy_data(k=k, d=6, n=2 * k, sigma=0.0, seed=3)
    theta = random_theta(data, biases)
    full = torch.linalg.eigvalsh(toy.softmax_hessian(theta, data, biases)).flip(0)
    rank = k * (k - 1)
    assert float(full[rank - 1]) > 1e-4  # the non-zero ones are O(0.01 – 0.1) here
    assert float(full[rank:].abs().max()) < 1e-15  # machine precision (module docstring)
    span = toy.data_span_spectrum(theta, data, biases)
    assert span.numel() == k * k
    assert torch.allclose(span[:rank], full[:rank], rtol=1e-12, atol=0)
    assert float(span[rank:].abs().max()) < 1e-15


def test_data_span_spectrum_is_the_nonzero_spectrum_with_noise():
    data = toy.make_toy_data(k=2, d=9, n=4, sigma=0.5, seed=4)
    theta = random_theta(data, True)
    full = torch.linalg.eigvalsh(toy.softmax_hessian(theta, data, True)).flip(0)
    span = toy.data_span_spectrum(theta, data, True)  # rank X̃ = 4: 8 values
    assert span.numel() == 8
    assert torch.allclose(span, full[:8], atol=1e-15)
    assert float(full[8:].abs().max()) < 1e-15


def test_top_eigenpairs_find_the_exactly_degenerate_top_pair():
    """At θ = 0 with orthonormal means λ_1 = λ_2 = 1/4 exactly: a block of 2 finds both."""
    data = toy.make_toy_data(k=2, d=8, n=2, sigma=0.0, orthogonal=True)
    theta = torch.zeros(16, dtype=F64)
    op = toy.SoftmaxHessian(theta, data)
    eig = ts.top_eigenpairs(op, k=3, tol=1e-12, block_size=2)
    dense_values, dense_vectors = torch.linalg.eigh(toy.softmax_hessian(theta, data))
    assert torch.allclose(eig.values, dense_values.flip(0)[:3], atol=1e-14)
    assert torch.allclose(eig.values[:2], torch.full((2,), 0.25, dtype=F64), atol=1e-14)
    top = dense_vectors[:, -2:]
    assert ts.subspace_overlap(eig.vectors[:, :2], top) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d, n", [(8, 2), (20, 200)])
def test_default_solver_finds_the_degenerate_top_pair_and_f_top_is_one(d, n):
    """Issue 12 item 1 on the paper's own toy model (λ_1 = λ_2 = 1/4 at θ = 0, eqs. 9 and 19):
    the default solve (single start vector) returns both copies, ``converged`` and
    ``multiplicity_checked``, and f_top = 1 as with the dense eigenvectors. Without the
    multiplicity check (``check_steps=0``, the solver before issue 12) it returned
    ``[1/4, 0]`` with ``converged=True`` and a wrong f_top."""
    data = toy.make_toy_data(k=2, d=d, n=n, sigma=0.0, orthogonal=True)
    theta = torch.zeros(2 * d, dtype=F64)
    op = toy.SoftmaxHessian(theta, data)
    g = toy.softmax_gradient(theta, data)
    dense_values, dense_vectors = torch.linalg.eigh(toy.softmax_hessian(theta, data))
    assert ts.top_fraction(g, dense_vectors[:, -2:]) == pytest.approx(1.0, abs=1e-12)
    eig = ts.top_eigenpairs(op, k=2, tol=1e-10)
    assert eig.converged and eig.multiplicity_checked
    assert torch.allclose(eig.values, dense_values.flip(0)[:2], rtol=0, atol=1e-12)
    assert ts.subspace_overlap(eig.vectors, dense_vectors[:, -2:]) == pytest.approx(1.0, abs=1e-10)
    assert ts.top_fraction(g, eig.vectors) == pytest.approx(1.0, abs=1e-10)
    blind = ts.top_eigenpairs(op, k=2, tol=1e-10, check_steps=0)
    assert blind.converged and float(blind.values[1]) < 0.1  # the old silent miss
    assert ts.top_fraction(g, blind.vectors) < 0.9


# ------------------------------------------------------ the closed form, eqs. 14–19
@pytest.fixture(scope="module")
def solution():
    means = toy.make_toy_data(k=2, d=5, n=2, sigma=0.0, seed=5, orthogonal=True).means
    offsets = torch.randn(2, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    w = offsets[0] - offsets[1]  # (θ̃_1 − θ̃_2) ⊥ μ: the rest is in the c_i
    w_perp = w - means.T @ (means @ w)
    offsets = torch.stack([(offsets.sum(0) + w_perp) / 2, (offsets.sum(0) - w_perp) / 2])
    return toy.LateTimeSolution(means, torch.tensor([0.7, 2.5], dtype=F64), 0.3, offsets)


@pytest.mark.parametrize("t", [3.0, 50.0, 4000.0])
def test_eqs_17_and_18_are_autograd_of_eq_14_along_eqs_15_16(solution, t):
    theta = solution.parameters(t)
    approx = lambda th: toy.approximate_loss(th, solution.means)  # noqa: E731
    grad = autograd_gradient(approx, theta)
    hess = torch.autograd.functional.hessian(approx, theta)
    scale = 1 / (solution.eta * t)
    assert torch.allclose(solution.gradient(t), grad, rtol=0, atol=1e-14 * scale)
    assert torch.allclose(solution.hessian(t), hess, rtol=0, atol=1e-14 * scale)


@pytest.mark.parametrize("t", [3.0, 50.0, 4000.0])
def test_eqs_15_16_solve_gradient_flow(solution, t):
    """dθ/dt = −η ∇L_14(θ): central difference in t (error h² θ''' ≈ 1e-12 relative)."""
    h = 1e-4 * t
    velocity = (solution.parameters(t + h) - solution.parameters(t - h)) / (2 * h)
    assert torch.allclose(velocity, -solution.eta * solution.gradient(t), rtol=0,
                          atol=1e-8 / (solution.eta * t))


def test_eq_19_eigenpairs_and_the_eigenvalue_convention(solution):
    """λ_i = 1/(ηt + c_i), not the 1/(2(ηt + c_i)) of the bracket in eq. 18."""
    t = 20.0
    H, V = solution.hessian(t), solution.eigenvectors()
    lam = 1.0 / (solution.eta * t + solution.c)
    assert torch.allclose(H @ V, V * lam, atol=1e-15)
    dense = torch.linalg.eigvalsh(H).flip(0)
    assert torch.allclose(dense[:2], lam, atol=1e-15)
    assert float(dense[2:].abs().max()) < 1e-15
    assert torch.allclose(solution.eigenvalues(t), lam)


def test_leading_forms_are_the_t_to_infinity_limit(solution):
    """‖g − g_leading‖ and ‖H − H_leading‖ are O(t^{-2}): ×100 smaller for t ×10."""
    errors = []
    for t in (1e3, 1e4):
        g_err = (solution.gradient(t) - toy.leading_gradient(solution.means, 0.3, t)).norm()
        h_err = (solution.hessian(t) - toy.leading_hessian(solution.means, 0.3, t)).norm()
        errors.append((float(g_err), float(h_err)))
    assert errors[0][0] / errors[1][0] == pytest.approx(100, rel=0.01)
    assert errors[0][1] / errors[1][1] == pytest.approx(100, rel=0.01)
    t = 1e4  # ‖g‖ = 1/(ηt): ‖∇_{θ_1}‖ = ‖μ_2 − μ_1‖/(2ηt) = √2/(2ηt), twice (θ_1 and θ_2)
    assert float(toy.leading_gradient(solution.means, 0.3, t).norm()) == pytest.approx(
        1 / (0.3 * t), rel=1e-12)


# --------------------------------------------------------- the simulated analytic case
@pytest.fixture(scope="module")
def analytic_run():
    return toy.simulate(ToyConfig(d=6, n=2, steps=10000, measurements=12, init_std=1.0,
                                  seed=0))


def test_simulation_has_rank_two_exactly(analytic_run):
    sim = analytic_run
    for i in range(0, sim.steps.numel(), 3):
        spectrum = torch.linalg.eigvalsh(toy.softmax_hessian(sim.parameters[i], sim.data))
        assert float(spectrum[:-2].abs().max()) < 1e-15  # machine precision
        assert torch.allclose(sim.eigenvalues[i, :2], spectrum.flip(0)[:2], rtol=1e-9, atol=0)
        assert float(sim.eigenvalues[i, 2:].abs().max()) < 1e-15  # Lanczos agrees
    assert float(sim.residuals.max()) < 1e-10


def test_f_top_is_one_and_the_top_subspace_never_moves(analytic_run):
    sim = analytic_run
    assert float((sim.f_top - 1).abs().max()) < 1e-12  # ‖g‖ ≥ 1e-4: eps-level
    assert float((toy.subspace_overlaps(sim) - 1).abs().max()) < 1e-12
    expected = torch.cat([sim.data.means.T, -sim.data.means.T], 0) / math.sqrt(2)  # eq. 19
    for V in sim.eigenvectors:
        assert ts.subspace_overlap(V, expected) == pytest.approx(1.0, abs=1e-12)


def test_full_model_reduces_to_two_scalar_recursions(analytic_run):
    """For orthonormal means u_i = ±(θ_1 − θ_2)·μ_i obey u ← u + η/(1 + e^u) exactly."""
    sim = analytic_run
    d = sim.data.means.shape[1]
    w = sim.parameters[:, :d] - sim.parameters[:, d:]
    u_sim = torch.stack([w @ sim.data.means[0], -(w @ sim.data.means[1])], 1)
    u = u_sim[0].clone()
    measured = {int(s): i for i, s in enumerate(sim.steps)}
    for step in range(sim.config.steps + 1):
        if step in measured:  # 10⁴ additions of O(1): rounding ≲ 1e4 eps |u| ≈ 1e-11
            assert torch.allclose(u, u_sim[measured[step]], rtol=1e-10, atol=1e-10)
        u = u + sim.config.eta * torch.sigmoid(-u)


def test_fitted_constants_reproduce_the_eigenvalues_over_time(analytic_run):
    sim = analytic_run
    fit = toy.fit_late_time(sim)  # paper's form, fitted on t ≥ 1000
    refined = toy.fit_late_time(sim, drift=toy.discrete_drift(sim.config.eta))
    assert abs(float(fit.c[0] - fit.c[1])) > 0.01  # two distinct constants to find
    lam = toy.mean_direction_eigenvalues(sim)
    for t in (100, 1000, 10000):
        i, et = sim.index(t), sim.config.eta * t
        error = float((lam[i] / fit.eigenvalues(t) - 1).abs().max())
        assert error < 2.5 / et  # module docstring: the drift over [10², 10⁴]
        refined_error = float((lam[i] / refined.eigenvalues(t) - 1).abs().max())
        assert refined_error < 3 * math.log(et) / et**2  # next order: O(log t / t) in 1/λ
        assert refined_error < error / 10
        assert float(sim.eigenvalues[i, :2].sum()) == pytest.approx(float(lam[i].sum()),
                                                                    rel=1e-9)


def test_fitted_drift_matches_the_derived_coefficient(analytic_run):
    """1/λ − ηt decreases by (1 − η/2) ln 10 per decade (to O(log t / t))."""
    sim = analytic_run
    inv = 1 / toy.mean_direction_eigenvalues(sim)
    shift = [inv[sim.index(t)] - sim.config.eta * t for t in (1000, 10000)]
    per_decade = (shift[0] - shift[1]) / math.log(10)
    assert torch.allclose(per_decade, torch.full((2,), toy.discrete_drift(1.0), dtype=F64),
                          atol=0.01)


def test_gradient_and_hessian_follow_eqs_17_18_with_the_resolved_factors(analytic_run):
    sim = analytic_run
    fit = toy.fit_late_time(sim)
    c_max = float(fit.c.abs().max())
    for t in (100, 1000, 10000):
        i, et = sim.index(t), sim.config.eta * t
        g = sim.gradients[i]
        assert float((g - fit.gradient(t)).norm() / g.norm()) < 2.5 / et
        leading = toy.leading_gradient(sim.data.means, sim.config.eta, t)
        assert float((g - leading).norm() / g.norm()) < (c_max + 2.5) / et
        # ‖g‖ ηt → 1: the paper's 2(μ_2 − μ_1)/(ηt) (eq. 17) would give 4
        assert float(g.norm()) * et == pytest.approx(1.0, abs=(c_max + 2.5) / et)
        H = toy.softmax_hessian(sim.parameters[i], sim.data)
        assert float((H - fit.hessian(t)).norm() / H.norm()) < 2.5 / et
        # eq. 9: both non-zero eigenvalues → 1/(ηt)
        assert float(sim.eigenvalues[i, 0]) * et == pytest.approx(1.0, abs=(c_max + 2.5) / et)


def test_there_is_no_one_over_n_in_the_gradient():
    """Eq. 8 writes 2(μ_2 − μ_1)/(nt); with the mean loss of eq. 6 n drops out entirely."""
    runs = [toy.simulate(ToyConfig(d=5, n=n, steps=200, measurements=4, bulk=1)) for n in (2, 8)]
    assert torch.allclose(runs[0].gradients, runs[1].gradients, rtol=0, atol=1e-15)


def test_fit_late_time_rejects_cases_without_a_closed_form():
    sim = toy.simulate(ToyConfig(d=5, n=2, steps=10, measurements=3, bulk=1, biases=True))
    with pytest.raises(ValueError, match="k = 2, sigma = 0, orthonormal"):
        toy.fit_late_time(sim)
    with pytest.raises(ValueError, match="no measured step"):
        toy.fit_late_time(dataclasses.replace(sim, config=dataclasses.replace(
            sim.config, biases=False)), t_min=11)


# --------------------------------------------------------------------- sample noise
def test_noise_gives_a_bulk_scaling_with_sigma_squared():
    sigmas = (0.005, 0.01, 0.02)
    sims = [toy.simulate(ToyConfig(d=20, n=10, sigma=s, steps=2000, measurements=8,
                                   init_std=1.0)) for s in sigmas]
    bulk = torch.tensor([float(s.eigenvalues[-1, 2] / s.eigenvalues[-1, 0]) for s in sims])
    assert float(bulk.max()) < 0.01  # small: the top pair still dominates
    # measured 2.00; σ√d ≤ 0.09 keeps the σ⁴ corrections to the trajectory below ~5%
    assert toy.power_law_exponent(torch.tensor(sigmas), bulk) == pytest.approx(2.0, abs=0.1)
    for sim in sims:
        assert float(sim.eigenvalues[-1, 2]) > 1e3 * EPS  # really non-zero now
        lost = 1 - sim.f_top
        assert float(lost[-1]) < 1e-5  # the gradient is (still) in the top subspace …
        assert float(lost[-1]) < float(lost[1]) / 2  # … and moves further into it


# --------------------------------------------------------------------------- biases
@pytest.fixture(scope="module")
def bias_run():
    return toy.simulate(ToyConfig(d=6, n=2, biases=True, steps=2000, measurements=10,
                                  init_std=1.0))


def test_biases_split_the_top_pair_three_to_one(bias_run):
    sim = bias_run
    i = sim.index(2000)
    assert float(sim.eigenvalues[i, 0] / sim.eigenvalues[i, 1]) == pytest.approx(3.0, rel=0.01)
    assert float(sim.eigenvalues[i, 1]) * 2000 == pytest.approx(1.0, rel=0.01)
    assert float(sim.eigenvalues[i, 2:].abs().max()) < 1e-15  # still rank 2


def test_the_gradient_aligns_with_the_smaller_top_eigenvector(bias_run):
    sim = bias_run
    assert float(sim.alignment[1, 1]) < 0.99  # not aligned at the start …
    late = sim.steps >= 100
    assert float(sim.alignment[late, 1].min()) > 1 - 1e-9  # … c_2² → 1
    assert float(sim.alignment[late, 0].max()) < 1e-9


@pytest.mark.parametrize("step", [10, 17, 45])
def test_eq_10_the_linear_step_shrinks_the_larger_component(bias_run, step):
    """g(θ − ηg) = (1 − ηH) g + O(η²); in H's eigenbasis the ratio of the components along
    the larger and the smaller top eigenvector shrinks by (1 − ηλ_1)/(1 − ηλ_2) per step."""
    sim = bias_run
    i = sim.index(step)
    theta, eta = sim.parameters[i], sim.config.eta
    errors = []
    for h in (eta / 2, eta / 4):
        actual, linear = toy.linearized_gradient_step(theta, sim.data, h, biases=True)
        errors.append(float((actual - linear).norm() / actual.norm()))
    assert errors[0] / errors[1] == pytest.approx(4.0, abs=0.3)  # second order in η
    V, lam = sim.eigenvectors[i], sim.eigenvalues[i, :2]
    actual, _ = toy.linearized_gradient_step(theta, sim.data, eta, biases=True)
    before, after = (V.T @ sim.gradients[i]).abs(), (V.T @ actual).abs()
    predicted = (1 - eta * lam[0]) / (1 - eta * lam[1])
    # measured within 2.2%, 0.8%, 0.1%: the O(η²) remainder is a few per cent of the
    # (already small) component along v_1 at step 10 and shrinks relative to it later
    assert float((after[0] / after[1]) / (before[0] / before[1])) == pytest.approx(
        float(predicted), rel=0.05)
    assert float(predicted) < 1


# ------------------------------------------------------------------------- k classes
@pytest.mark.parametrize("biases", [False, True])
def test_k_classes_top_k_subspace(biases):
    k = 5
    sim = toy.simulate(ToyConfig(k=k, d=12, n=10, biases=biases, steps=3000, measurements=8,
                                 init_std=1.0, bulk=2))
    i = sim.index(3000)
    scaled = sim.eigenvalues[i] * 3000  # ηt λ
    predicted = toy.equal_margin_spectrum(k, biases)
    spectrum = toy.data_span_spectrum(sim.parameters[i], sim.data, biases)
    assert int((spectrum > 1e-12 * spectrum[0]).sum()) == k * (k - 1)  # footnote 14
    assert float(1 - sim.f_top[i]) < 1e-3
    rest = spectrum[k:k * (k - 1)] * 3000  # the k(k − 2) smaller non-zero ones
    # their mean is within 1.5% of the equal-margin limit, but they spread (0.5 – 1.3 ×)
    # and converge only slowly (unequal margins relax like log t)
    assert float(rest.mean()) == pytest.approx(float(predicted[k:k * (k - 1)].mean()), rel=0.03)
    if not biases:  # k eigenvalues 1/(ηt) (measured within 1%), then a block near 1/(k ηt)
        assert torch.allclose(scaled[:k], predicted[:k], rtol=0.03)
        assert float(scaled[k - 1] / scaled[k]) > 3  # predicted k = 5, measured 3.9
    else:  # k − 1 large (cluster mean within 0.1%, split ±6%), one smaller = 1
        assert float(scaled[:k - 1].mean()) == pytest.approx(float(predicted[0]), rel=0.01)
        assert torch.allclose(scaled[:k - 1], predicted[:k - 1], rtol=0.08)
        assert float(scaled[k - 1]) == pytest.approx(1.0, rel=0.01)
        assert float(sim.alignment[i, k - 1]) > 0.999  # gradient on the smaller one


@pytest.mark.slow
def test_footnote_13_setting_ten_classes_with_biases():
    """d = 1000, k = 10, random (non-orthogonal) unit means, biases: k − 1 large eigenvalues,
    one smaller, the gradient aligned with it, rank k(k − 1) = 90 (about 3 s)."""
    sim = toy.simulate(ToyConfig(k=10, d=1000, n=20, biases=True, orthogonal=False,
                                 steps=3000, measurements=6, bulk=1))
    i = sim.index(3000)
    top = sim.eigenvalues[i, :10]
    assert float(top[8] / top[9]) > 2  # a gap between the 9 large and the 10th
    assert float(top[9] / sim.eigenvalues[i, 10]) > 2
    assert float(sim.alignment[i, 9]) > 0.999
    spectrum = toy.data_span_spectrum(sim.parameters[i], sim.data, True)
    assert int((spectrum > 1e-12 * spectrum[0]).sum()) == 90


# ------------------------------------------------------------------------ plots, CLI
def run_command(argv):
    parser = argparse.ArgumentParser()
    toy_command.add_arguments(parser)
    return toy_command.main(parser.parse_args(argv))


@pytest.mark.slow
def test_command_prints_the_tables_and_writes_the_plots(tmp_path, capsys):
    argv = ["--d", "6", "--n", "6", "--steps", "1000", "--measurements", "8",
            "--init-std", "1.0", "--sweep-sigma", "0.01,0.02", "--out", str(tmp_path)]
    assert run_command(argv) == 0
    out = capsys.readouterr().out
    sim = toy.simulate(ToyConfig(d=6, n=6, steps=1000, measurements=8, init_std=1.0))
    fit = toy.fit_late_time(sim)
    assert f"c_1 = {float(fit.c[0]):.4f}  c_2 = {float(fit.c[1]):.4f}" in out
    assert "Resolved factors" in out and "σ sweep at t = 1000" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("1000 |")]
    assert len(rows) == 3  # eigenvalue, gradient/Hessian and structure tables
    assert rows[-1].split("|")[3].strip() == "2"  # the rank column
    for name in ("eigenvalues.png", "f_top.png", "alignment.png", "sigma_sweep.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_command_skips_the_closed_form_where_there_is_none(capsys):
    assert run_command(["--k", "3", "--d", "6", "--n", "3", "--steps", "100",
                        "--measurements", "4", "--biases"]) == 0
    out = capsys.readouterr().out
    assert "Resolved factors" not in out and "rank k(k−1) = 6" in out


def test_command_rejects_a_bad_sweep():
    with pytest.raises(SystemExit, match="at least two positive values"):
        run_command(["--sweep-sigma", "0.01"])
    with pytest.raises(SystemExit, match="comma-separated numbers"):
        run_command(["--sweep-sigma", "a,b"])


def test_command_reports_bad_options(capsys):
    assert run_command(["--eta", "0"]) == 2
    assert "error: eta must be positive" in capsys.readouterr().err
    assert run_command(["--n", "3"]) == 2  # not a multiple of k = 2
    assert "multiple of k = 2" in capsys.readouterr().err
    assert run_command(["--d", "6", "--n", "2", "--steps", "10", "--fit-from", "20"]) == 2
    assert "--fit-from must lie in [1, --steps = 10]" in capsys.readouterr().err


def test_figures_without_a_bulk_eigenvalue():
    sim = toy.simulate(ToyConfig(d=6, n=2, steps=20, measurements=4, bulk=0))
    assert sim.eigenvalues.shape[1] == 2
    assert len(toy_plots.eigenvalue_figure(sim).axes) == 1
    with pytest.raises(ValueError, match="run with bulk ≥ 1"):
        toy_plots.sigma_sweep_figure([sim])


def test_sigma_sweep_at_the_last_step():
    sims = [toy.simulate(ToyConfig(d=6, n=6, sigma=s, steps=50, measurements=4, bulk=1))
            for s in (0.01, 0.02)]
    sigma, bulk, defect = toy.sigma_sweep(sims)
    assert sigma.tolist() == [0.01, 0.02]
    for j, sim in enumerate(sims):
        assert float(bulk[j]) == float(sim.eigenvalues[-1, 2] / sim.eigenvalues[-1, 0])
        assert float(defect[j]) == abs(1 - float(sim.f_top[-1]))
    with pytest.raises(ValueError, match="at least one run"):
        toy.sigma_sweep([])


def test_figures_are_built_from_results(analytic_run):
    fit = toy.fit_late_time(analytic_run)
    noisy = [toy.simulate(ToyConfig(d=6, n=6, sigma=s, steps=100, measurements=4, bulk=1))
             for s in (0.01, 0.02)]
    figures = [toy_plots.eigenvalue_figure(analytic_run, fit, toy.equal_margin_spectrum(2)),
               toy_plots.f_top_figure(analytic_run), toy_plots.alignment_figure(analytic_run),
               toy_plots.sigma_sweep_figure(noisy)]
    assert [len(f.axes) for f in figures] == [1, 3, 1, 2]
    assert all(f.canvas.manager is None for f in figures)  # not registered with pyplot
