"""``tinysubspace toy``: the solvable model of Section 3 / Appendix E, simulated and compared
with its closed form (see docs/toy-model.md for the derivation and the resolved factors)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from tinysubspace.problems import toy

RESOLVED = """\
Resolved factors (docs/toy-model.md):
  eigenvalues  λ_i = 1/(ηt + c_i): eq. 18's bracket μ_iμ_iᵀ/(2(ηt + c_i)) times the eigenvalue 2
               of (1 −1; −1 1); both → 1/(ηt) (eq. 9), eigenvectors (μ_i, −μ_i)/√2 (eq. 19)
  gradient     ∇_θ1 L = −∇_θ2 L = −μ_1/(2(ηt + c_1)) + μ_2/(2(ηt + c_2))
               = (μ_2 − μ_1)/(2ηt) + O(t⁻²), so ‖g‖ → 1/(ηt); eq. 17's 2(μ_2 − μ_1)/(ηt)
               is 4× too large, eq. 8's 2(μ_2 − μ_1)/(nt) also has n for η (the mean loss
               of eq. 6 leaves no 1/n)
  next order   1/λ_i = ηt + c_i − (1 − η/2) log(ηt) + O(log t / t): the exact loss (eq. 13, not 14)
               and discrete steps make the 'constants' c_i drift"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tinysubspace toy`` (defaults: the analytic case at footnote 13's d)."""
    c = toy.ToyConfig()
    parser.add_argument("--k", type=int, default=c.k, help="classes (default %(default)s)")
    parser.add_argument("--d", type=int, default=c.d, help="dimension (default %(default)s)")
    parser.add_argument("--n", type=int, default=c.n, help="samples, a multiple of k "
                        "(default %(default)s)")
    parser.add_argument("--sigma", type=float, default=c.sigma, help="noise σ (default 0)")
    parser.add_argument("--eta", type=float, default=c.eta, help="learning rate (default 1)")
    parser.add_argument("--steps", type=int, default=c.steps, help="gradient-descent steps "
                        "(default %(default)s)")
    parser.add_argument("--biases", action="store_true", help="add a bias per class")
    parser.add_argument("--random-means", action="store_true", help="independent random unit "
                        "means (footnote 13) instead of orthonormal ones")
    parser.add_argument("--init-std", type=float, default=c.init_std,
                        help="std of each initial parameter (default %(default)s)")
    parser.add_argument("--seed", type=int, default=c.seed, help="seed (default 0)")
    parser.add_argument("--measurements", type=int, default=c.measurements,
                        help="log-spaced measured steps (default %(default)s)")
    parser.add_argument("--fit-from", type=int, default=None, help="fit c_i on steps ≥ this "
                        "(default steps/10)")
    parser.add_argument("--sweep-sigma", type=str, default=None, metavar="S1,S2,...",
                        help="also run these σ (same means, noise and start) and print the bulk")
    parser.add_argument("--out", type=Path, default=None, help="write PNG plots into this folder")


def main(args: argparse.Namespace) -> int:
    """Simulate, print the tables, write the plots; returns the exit status (2: bad options)."""
    sigmas = _parse_sigmas(args.sweep_sigma)
    try:
        config = toy.ToyConfig(k=args.k, d=args.d, n=args.n, sigma=args.sigma, eta=args.eta,
                               steps=args.steps, biases=args.biases,
                               orthogonal=not args.random_means, init_std=args.init_std,
                               seed=args.seed, measurements=args.measurements)
        if args.fit_from is not None and not 1 <= args.fit_from <= config.steps:
            raise ValueError(f"--fit-from must lie in [1, --steps = {config.steps}], got "
                             f"{args.fit_from}")
        sim = toy.simulate(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"tinysubspace toy: {_describe(config)}\n")
    fit = _print_analytic(sim, args.fit_from) if toy.is_analytic_case(config) else None
    _print_structure(sim)
    sweep = [toy.simulate(dataclasses.replace(config, sigma=s)) for s in sigmas]
    if sweep:
        _print_sweep(sweep)
    if args.out is not None:
        _write_plots(args.out, sim, fit, sweep)
    return 0


def _parse_sigmas(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = sorted(float(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise SystemExit(f"--sweep-sigma expects comma-separated numbers, got {text!r}") from error
    if len(values) < 2 or values[0] <= 0:
        raise SystemExit(f"--sweep-sigma needs at least two positive values, got {text!r}")
    return values


def _describe(c: toy.ToyConfig) -> str:
    means = "orthonormal" if c.orthogonal else "random unit"
    return (f"k={c.k} d={c.d} n={c.n} sigma={c.sigma:g} eta={c.eta:g} steps={c.steps} "
            f"biases={'yes' if c.biases else 'no'} means={means} init_std={c.init_std:g} "
            f"seed={c.seed}")


def _table_steps(sim: toy.ToySimulation, first: int = 1) -> list[int]:
    steps = [10**e for e in range(int(math.log10(sim.config.steps)) + 1)]
    return [t for t in sorted({*steps, sim.config.steps}) if t >= first]


def _print_analytic(sim: toy.ToySimulation, fit_from: int | None) -> toy.LateTimeSolution:
    """Fit eqs. 15–19 (with and without the drift term), print both comparison tables."""
    fit = toy.fit_late_time(sim, t_min=fit_from)
    refined = toy.fit_late_time(sim, t_min=fit_from, drift=toy.discrete_drift(sim.config.eta))
    t_min = fit_from if fit_from is not None else max(1, sim.config.steps // 10)
    print(RESOLVED)
    print(f"Fitted on t ≥ {t_min}: c_1 = {float(fit.c[0]):.4f}  c_2 = {float(fit.c[1]):.4f}"
          f"   (with the drift term: c_1 = {float(refined.c[0]):.4f}  "
          f"c_2 = {float(refined.c[1]):.4f})\n")
    _print_eigenvalue_table(sim, fit, refined)
    _print_gradient_table(sim, fit)
    return fit


def _print_eigenvalue_table(sim: toy.ToySimulation, fit: toy.LateTimeSolution,
                            refined: toy.LateTimeSolution) -> None:
    """``λ_i`` along ``(μ_i, −μ_i)/√2``: simulated, eq. 18 (fitted ``c_i``, with and without
    the drift), and ``ηt λ_i`` (eq. 9 predicts 1)."""
    eta = sim.config.eta
    lam = toy.mean_direction_eigenvalues(sim)
    print("Eigenvalues along (μ_i, −μ_i)/√2: simulated vs eq. 18 with fitted c_i (rel. error, "
          "and with the drift term) vs eq. 9")
    print(f"{'t':>6} | {'λ_1 sim':>10} {'eq. 18':>10} {'rel.err':>8} {'+drift':>8} | "
          f"{'λ_2 sim':>10} {'eq. 18':>10} {'rel.err':>8} {'+drift':>8} | {'ηt·λ_1':>7} "
          f"{'ηt·λ_2':>7}")
    for t in _table_steps(sim, first=10):  # the late-time forms mean nothing at t = 1
        i = sim.index(t)
        a, b = fit.eigenvalues(t), refined.eigenvalues(t)
        cells = []
        for j in range(2):
            sim_value = float(lam[i, j])
            cells.append(f"{sim_value:10.4e} {float(a[j]):10.4e} "
                         f"{sim_value / float(a[j]) - 1:8.1e} {sim_value / float(b[j]) - 1:8.1e}")
        print(f"{t:>6} | {cells[0]} | {cells[1]} | {float(lam[i, 0]) * eta * t:7.4f} "
              f"{float(lam[i, 1]) * eta * t:7.4f}")


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖x − reference‖ / ‖reference‖``."""
    return float((x - reference).norm() / reference.norm())


def _print_gradient_table(sim: toy.ToySimulation, fit: toy.LateTimeSolution) -> None:
    """Gradient, Hessian (on ``R² ⊗ span μ``) and parameters: simulated vs eqs. 15–18 with the
    fitted ``c_i`` and vs the leading order (eqs. 9, 17)."""
    eta, means = sim.config.eta, sim.data.means
    B = _mean_basis(sim)
    print("Gradient, Hessian and parameters: simulated vs eqs. 15–18 (fitted c_i) and the "
          "leading order (eq. 17 corrected, eq. 9)")
    print(f"{'t':>6} | {'‖g‖ sim':>10} {'‖g‖ eq.17':>10} {'Δg eq.17':>9} {'Δg lead':>9} "
          f"{'ηt‖g‖':>7} | {'ΔH eq.18':>9} {'ΔH eq.9':>9} | {'‖Δθ‖ eq.15':>10}")
    for t in _table_steps(sim, first=10):
        i = sim.index(t)
        g, theta = sim.gradients[i], sim.parameters[i]
        H = B.T @ (toy.SoftmaxHessian(theta, sim.data) @ B)
        print(f"{t:>6} | {float(g.norm()):10.4e} {float(fit.gradient(t).norm()):10.4e} "
              f"{_relative_error(fit.gradient(t), g):9.1e} "
              f"{_relative_error(toy.leading_gradient(means, eta, t), g):9.1e} "
              f"{float(g.norm()) * eta * t:7.4f} | "
              f"{_relative_error(B.T @ fit.hessian(t) @ B, H):9.1e} "
              f"{_relative_error(B.T @ toy.leading_hessian(means, eta, t) @ B, H):9.1e} | "
              f"{float((fit.parameters(t) - theta).norm()):10.1e}")
    print("(Δx = ‖x_formula − x_sim‖/‖x_sim‖; H compared on R² ⊗ span(μ), where all of it lives)\n")


def _mean_basis(sim: toy.ToySimulation) -> torch.Tensor:
    """``(2d, 4)`` orthonormal basis ``e_j ⊗ μ_i`` of the space holding the whole Hessian."""
    M = sim.data.means.T
    zero = torch.zeros_like(M)
    return torch.cat([torch.cat([M, zero], 1), torch.cat([zero, M], 1)], 0)


def _rank(sim: toy.ToySimulation, i: int) -> str:
    c = sim.config
    if c.k * min(c.n, c.d + c.biases) > 1000:
        return "-"
    spectrum = toy.data_span_spectrum(sim.parameters[i], sim.data, c.biases)
    return str(int((spectrum > 1e-10 * spectrum[0]).sum()))


def _print_structure(sim: toy.ToySimulation) -> None:
    c, m = sim.config, sim.config.num_top
    print(f"Structure over time (top subspace: the m = {m} largest eigenpairs; rank counts "
          "eigenvalues > 1e-10 λ_1; T = last step)")
    print(f"{'t':>6} | ηt·λ_1…λ_m{'':<{max(0, 7 * m - 10)}} | {'λ_m+1/λ_1':>9} | {'rank':>4} | "
          f"{'1−f_top':>8} | {'1−ov(t,T)':>9} | c_i² (gradient on v_i)")
    overlaps = toy.subspace_overlaps(sim)
    for t in _table_steps(sim):
        i = sim.index(t)
        et = c.eta * t
        top = " ".join(f"{float(v) * et:6.3f}" for v in sim.eigenvalues[i, :m])
        align = " ".join(f"{float(v):.3f}" for v in sim.alignment[i])
        bulk = float(sim.eigenvalues[i, m] / sim.eigenvalues[i, 0])
        print(f"{t:>6} | {top} | {bulk:9.1e} | {_rank(sim, i):>4} | "
              f"{float(1 - sim.f_top[i]):8.1e} | {float(1 - overlaps[i, -1]):9.1e} | {align}")
    print(f"over all {sim.steps.numel()} measured steps: max |1 − f_top| = "
          f"{float((1 - sim.f_top).abs().max()):.1e}, min overlap of top subspaces = "
          f"{float(overlaps.min()):.6f}, max relative eigen-residual = "
          f"{float(sim.residuals.max()):.1e}")
    if c.sigma == 0:
        limit = toy.equal_margin_spectrum(c.k, c.biases)
        rank = c.k * (c.k - 1)
        print(f"late-time limit for orthonormal means (equal margins): ηt·λ → "
              f"{' '.join(f'{float(v):.3f}' for v in limit[:m + 1])} …; rank k(k−1) = {rank}")
    print()


def _print_sweep(sims: list[toy.ToySimulation]) -> None:
    """The bulk ``λ_{m+1}/λ_1`` and ``1 − f_top`` at the last step against ``σ``, with the
    power-law exponents between neighbours and over the whole sweep."""
    m = sims[0].config.num_top
    T = int(sims[0].steps[-1])
    print(f"σ sweep at t = {T} (same means, noise directions and start; bulk = λ_{m + 1}/λ_1)")
    print(f"{'σ':>8} | {'ηt·λ_1':>7} {'ηt·λ_m':>7} | {'bulk':>9} {'exponent':>8} | "
          f"{'1−f_top':>8} {'exponent':>8} | c_m²")
    sigma, bulk, defect = toy.sigma_sweep(sims)
    # power laws need positive values: an exactly-zero bulk or defect sits at a tiny floor
    fitted = [v.abs().clamp_min(1e-300) for v in (bulk, defect)]
    for j, s in enumerate(sims):
        et = s.config.eta * T
        slopes = ["", ""]
        if j:
            slopes = [f"{toy.power_law_exponent(sigma[j - 1:j + 1], v[j - 1:j + 1]):8.2f}"
                      for v in fitted]
        print(f"{s.config.sigma:8.4g} | {float(s.eigenvalues[-1, 0]) * et:7.4f} "
              f"{float(s.eigenvalues[-1, m - 1]) * et:7.4f} | {float(bulk[j]):9.2e} "
              f"{slopes[0]:>8} | {float(defect[j]):8.1e} {slopes[1]:>8} | "
              f"{float(s.alignment[-1, m - 1]):.4f}")
    exponents = [toy.power_law_exponent(sigma, v) for v in fitted]
    print(f"fitted exponents over the sweep: bulk ∝ σ^{exponents[0]:.2f}, "
          f"1 − f_top ∝ σ^{exponents[1]:.2f}\n")


def _write_plots(out: Path, sim: toy.ToySimulation, fit: toy.LateTimeSolution | None,
                 sweep: list[toy.ToySimulation]) -> None:
    from tinysubspace.plots import toy as toy_plots

    out.mkdir(parents=True, exist_ok=True)
    c = sim.config
    limit = toy.equal_margin_spectrum(c.k, c.biases)[: c.num_top + 1] if c.sigma == 0 else None
    figures = {"eigenvalues.png": toy_plots.eigenvalue_figure(sim, fit, limit),
               "f_top.png": toy_plots.f_top_figure(sim),
               "alignment.png": toy_plots.alignment_figure(sim)}
    if sweep:
        figures["sigma_sweep.png"] = toy_plots.sigma_sweep_figure(sweep)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=120)
        print(f"wrote {out / name}")
