"""Figures of the toy model (Section 3) from simulation results; no computation of Hessians.

Every function takes :class:`~tinysubspace.problems.toy.simulation.ToySimulation` results (and
optionally a fitted
:class:`~tinysubspace.problems.toy.simulation.LateTimeSolution`) and returns a
``matplotlib.figure.Figure`` built
without pyplot, so no global state is touched; save it with ``fig.savefig(path)`` (Agg).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from tinysubspace.metrics import subspace_overlap
from tinysubspace.problems.toy import LateTimeSolution, ToySimulation, sigma_sweep

__all__ = ["alignment_figure", "eigenvalue_figure", "f_top_figure", "sigma_sweep_figure"]


def _late(sim: ToySimulation) -> torch.Tensor:
    return sim.steps >= 1


def eigenvalue_figure(sim: ToySimulation, fit: LateTimeSolution | None = None,
                      limit: torch.Tensor | None = None) -> Figure:
    """Top (and first bulk) eigenvalues against ``1/(ηt)``, log–log, with eq. 9's ``λ = 1/(ηt)``
    and, if given, the fitted ``1/(ηt + c_i)`` of eq. 18 and late-time lines ``λ = a/(ηt)``
    for each distinct value ``a`` of ``limit`` (e.g. ``equal_margin_spectrum``)."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    late = _late(sim)
    x = (1.0 / sim.times[late]).numpy()
    m = sim.config.num_top
    for i in range(m):
        ax.plot(x, sim.eigenvalues[late, i].numpy(), "o^sDv<>ph*"[i % 10], ms=4, mfc="none",
                label=f"λ_{i + 1} simulated")
    if sim.eigenvalues.shape[1] > m:  # a run with bulk = 0 recorded no bulk eigenvalue
        bulk = sim.eigenvalues[late, m].abs().clamp_min(1e-300).numpy()
        ax.plot(x, bulk, "x", ms=4, color="gray", label=f"|λ_{m + 1}| (bulk)")
    ax.plot(x, x, "k-", lw=1, label="1/(ηt)  (eq. 9)")
    if limit is not None:
        for a in sorted({round(float(v), 4) for v in limit if v > 1e-12} - {1.0}):
            ax.plot(x, a * x, ":", lw=1, color="gray")
        ax.plot([], [], ":", lw=1, color="gray", label="equal-margin limit a/(ηt)")
    if fit is not None:
        t = sim.steps[late].to(torch.float64)
        for i in range(2):
            curve = torch.stack([fit.eigenvalues(float(s))[i] for s in t])
            valid = curve > 0  # the late-time form needs ηt + c_i > 0
            ax.plot(x[valid.numpy()], curve[valid].numpy(), "--", lw=1,
                    label=f"1/(ηt + c_{i + 1}),  c_{i + 1} = {float(fit.c[i]):.3g}")
    ax.set(xscale="log", yscale="log", xlabel="1/(ηt)", ylabel="Hessian eigenvalue",
           title=_title(sim))
    ax.legend(fontsize=7)
    return fig


def f_top_figure(sim: ToySimulation) -> Figure:
    """``f_top`` (eq. 2) over time, its defect ``1 − f_top`` on a log scale, and the subspace
    overlap (eq. 5) of the top subspace with the first and the last measured one."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    late = _late(sim)
    t = sim.steps[late].numpy()
    left.plot(t, sim.f_top[late].numpy(), "o-", ms=3)
    left.set(xscale="log", ylim=(0, 1.02), xlabel="step t", ylabel="f_top",
             title="gradient in top subspace")
    defect = (1 - sim.f_top[late]).abs().clamp_min(torch.finfo(torch.float64).eps)
    middle.plot(t, defect.numpy(), "o-", ms=3)
    middle.set(xscale="log", yscale="log", xlabel="step t", ylabel="|1 − f_top| (floor: eps)")
    V = sim.eigenvectors
    for anchor, name in ((0, "first"), (-1, "last")):
        overlaps = [subspace_overlap(V[i], V[anchor]) for i in range(V.shape[0])]
        right.plot(sim.steps.clamp_min(1).numpy(), overlaps, "o-", ms=3,
                   label=f"with the {name} step")
    right.set(xscale="log", ylim=(0, 1.02), xlabel="step t", ylabel="overlap (eq. 5)",
              title="top subspace")
    right.legend(fontsize=7)
    fig.suptitle(_title(sim))
    return fig


def alignment_figure(sim: ToySimulation) -> Figure:
    """``c_i²`` (eq. 12): the gradient's squared overlap with each top eigenvector over time."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    late = _late(sim)
    for i in range(sim.alignment.shape[1]):
        ax.plot(sim.steps[late].numpy(), sim.alignment[late, i].numpy(), "o-", ms=3,
                label=f"v_{i + 1}")
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="step t",
           ylabel="c_i² = (v_i·g)²/|g|²", title=_title(sim))
    ax.legend(fontsize=7, ncol=2)
    return fig


def sigma_sweep_figure(sims: Sequence[ToySimulation]) -> Figure:
    """At the last step of runs that differ in ``σ``: the bulk ratio ``λ_{m+1}/λ_1`` with a
    ``σ²`` guide, and ``1 − f_top``, log–log (values below ``eps`` drawn at ``eps``)."""
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    m = sims[0].config.num_top
    sigma, bulk, defect = sigma_sweep(sims)
    floor = torch.finfo(torch.float64).eps
    bulk = bulk.abs().clamp_min(floor)  # exactly-zero bulks sit at the floor
    left.plot(sigma.numpy(), bulk.numpy(), "o-", label=f"λ_{m + 1}/λ_1")
    left.plot(sigma.numpy(), (bulk[0] * (sigma / sigma[0]) ** 2).numpy(), "k--", lw=1,
              label="∝ σ²")
    left.set(xscale="log", yscale="log", xlabel="σ", ylabel="bulk / top eigenvalue")
    left.legend(fontsize=7)
    right.plot(sigma.numpy(), defect.clamp_min(floor).numpy(), "o-")
    right.set(xscale="log", yscale="log", xlabel="σ", ylabel="1 − f_top (last step)")
    fig.suptitle(f"σ sweep at step {int(sims[0].steps[-1])}")
    return fig


def _title(sim: ToySimulation) -> str:
    c = sim.config
    return (f"k={c.k} d={c.d} n={c.n} σ={c.sigma:g} η={c.eta:g}"
            f"{' biases' if c.biases else ''}{'' if c.orthogonal else ' random means'}")
