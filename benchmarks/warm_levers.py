"""Issue 23 (round 5): where the warm solve's products go, and the levers tried on them.

Along the trajectory of :mod:`levers` (``count`` measurements ``every`` SGD steps apart, one
:class:`~tinysubspace.HessianOperator` each, eigsh cold on ``op.to_scipy()`` first, then every
variant from its own previous answer, interleaved in one process), the variants are

* ``default``: :func:`~tinysubspace.linalg.warm_start.track_eigenpairs` as the tracker calls it on
  a CPU (``warm="krylov"``, ``check="amortised"``, ``M = 4``, ``s = 2``);
* ``solve only``: the same without any check (``check="full", check_steps=0``): the solve's share;
* ``random part ρ``: the Krylov start ``Σ v_i/‖·‖ + ρ g/‖g‖`` with ``ρ`` other than ``10⁻²``;
* ``augmented``: Rayleigh–Ritz on ``[V_prev, K_m(H, r)]`` (``warm="subspace", block_size=1``:
  ``n`` products for ``H V_prev``, then one residual direction per product);
* ``basis B``: a larger Krylov basis (fewer thick restarts);
* ``M=8``, ``s=0``: the amortised check's schedule and guard.

Products are exact and load-free; time ratios are against eigsh in the same measurement.

``--refined``: the Krylov space of the default start (from the previous measurement's pairs,
solved to ``10⁻⁴ tol``) grown one product at a time, and per size
``j`` the largest residual over ``tol · θ_1`` of the Ritz vectors (what every solver here returns)
against refined Ritz vectors (the unit vector of the space minimising ``‖(H − θ_i) v‖``, with its
Rayleigh quotient): whether a better extraction from the same products would stop sooner.

``--probe``: where the solve's products go instead (no timing): at each warm measurement the
solve stopped after ``j`` products for every ``j`` from ``n``, the number of pairs meeting
``tol`` and the largest residual over ``tol · θ_1``; and the products of Krylov starts with
other weights ``Σ w_i v_i`` (equal; ``θ_1/θ_i``; ``θ_i/θ_1``; ``1/((θ_i − θ_n)/θ_1 + 0.1)``, more
weight near the bulk edge), each from its own previous answer.

Run: ``OMP_NUM_THREADS=1 python benchmarks/warm_levers.py [--problem digits|fashion] [--n 10]
[--probe | --refined]``. Numbers: docs/performance.md, section 4.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch

import tinysubspace.linalg.warm_start as warm_start
from common import digits_problem, fashion_problem, machine_line, print_table
from levers import HEADER, measure, summary_rows
from tinysubspace import HessianOperator
from tinysubspace.linalg.basis import KrylovBasis
from tinysubspace.linalg.lanczos import top_eigenpairs
from tinysubspace.linalg.warm_start import track_eigenpairs
from tinysubspace.operator import vector_space
from tracking import trajectory

WEIGHTS = {
    "equal": lambda th: torch.ones_like(th),
    "θ1/θi": lambda th: th[0] / th,
    "θi/θ1": lambda th: th / th[0],
    "edge": lambda th: 1 / ((th - th[-1]) / th[0] + 0.1),
}
"""Weights ``w_i`` of the probe's Krylov starts ``Σ w_i v_i`` (``th``: previous values)."""


@contextlib.contextmanager
def random_part(rho: float) -> Iterator[None]:
    """The Krylov start's random part set to ``rho`` for the duration (a benchmark lever only)."""
    saved = warm_start.KRYLOV_RANDOM_PART
    warm_start.KRYLOV_RANDOM_PART = rho
    try:
        yield
    finally:
        warm_start.KRYLOV_RANDOM_PART = saved


def variants(tol: float, n: int) -> dict[str, Callable]:
    """``name -> solve(op, n, previous, seed)``."""
    def track(rho: float | None = None, **options: object) -> Callable:
        def solve(op, k, prev, seed):
            with random_part(rho) if rho is not None else contextlib.nullcontext():
                return track_eigenpairs(op, k, prev, tol=tol, seed=seed, **options)
        return solve
    return {
        "default (krylov, amortised M=4 s=2)": track(warm="krylov"),
        "solve only (no check)": track(warm="krylov", check="full", check_steps=0),
        "random part 1e-3": track(1e-3, warm="krylov"),
        "random part 0": track(0.0, warm="krylov"),
        "random part 1e-1": track(1e-1, warm="krylov"),
        "augmented RR [V, K(H, r)]": track(warm="subspace", block_size=1),
        f"basis {3 * n}": track(warm="krylov", basis_size=3 * n),
        "amortised M=8 s=2": track(warm="krylov", check_every=8),
        "amortised M=4 s=0": track(warm="krylov", guard_steps=0),
        "amortised M=8 s=0": track(warm="krylov", check_every=8, guard_steps=0),
    }


def weighted_start(previous, weights: torch.Tensor, seed: int) -> torch.Tensor:
    """``Σ w_i v_i / ‖·‖ + 10⁻² g / ‖g‖`` as a ``(p, 1)`` start (``g`` Gaussian of ``seed``)."""
    v = previous.vectors @ weights.to(previous.vectors.dtype)
    g = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(seed), dtype=v.dtype)
    return (v / v.norm() + 0.01 * g / g.norm())[:, None]


def probe(problem, n: int, tol: float, states: list) -> None:
    """Print, per warm measurement, the per-product convergence of the solve and the products
    of each weighted start (module docstring)."""
    previous: dict[str, object] = dict.fromkeys(WEIGHTS)
    for index, state in enumerate(states):
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                             dtype=torch.float64)
        op.loss_and_gradient()
        if previous["equal"] is not None:
            line = []
            for j in range(n, 3 * n):
                r = track_eigenpairs(op, n, previous["equal"], tol=tol, seed=index, warm="krylov",
                                     check="full", check_steps=0, max_matvecs=j)
                relative = r.residuals / (tol * r.values[0].abs())
                line.append((j, int((relative <= 1).sum()), round(float(relative.max()), 1)))
                if r.converged:
                    break
            print(f"  {index}: (products, pairs within tol, max residual / tol·θ1): {line}")
        counts = {}
        for name, weights in WEIGHTS.items():
            prev = previous[name]
            init = None if prev is None else weighted_start(prev, weights(prev.values.abs()),
                                                            index)
            previous[name] = top_eigenpairs(op, n, tol=tol, seed=index, init=init,
                                            check_steps=0)
            counts[name] = previous[name].matvecs
        print(f"  {index}: products by start weights {counts}", flush=True)


def refined_probe(problem, n: int, tol: float, states: list) -> None:
    """Print, per warm measurement, Ritz against refined Ritz residuals (module docstring)."""
    previous = None
    for index, state in enumerate(states):
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                             dtype=torch.float64)
        if previous is not None:
            q = warm_start._krylov_start(previous.vectors, index, vector_space(op))
            q, line = q / q.norm(), []
            basis = KrylovBasis(op.shape[0], op.dtype, op.device, 3 * n)
            for j in range(1, 3 * n):
                w = (op @ q[:, None])[:, 0]
                basis.append(q, w)
                f, _ = basis.orthogonal_part(w)  # the solvers' reorthogonalisation
                q = f / f.norm()
                if j < n:
                    continue
                B, HB = basis.Q, basis.HQ
                theta, Y = torch.linalg.eigh((B.T @ HB + HB.T @ B) / 2)
                theta, Y = theta.flip(0)[:n], Y.flip(1)[:, :n]
                ritz = (HB @ Y - (B @ Y) * theta).norm(dim=0).max()
                refined = []
                for t in theta:  # smallest right singular vector of H B − θ B
                    y = torch.linalg.svd(HB - t * B, full_matrices=False)[2][-1]
                    v, hv = B @ y, HB @ y
                    refined.append((hv - (v @ hv) * v).norm())
                scale = tol * float(theta[0])
                line.append((j, round(float(ritz) / scale, 2),
                             round(float(max(refined)) / scale, 2)))
                if ritz <= scale:
                    break
            print(f"  {index}: (products, Ritz, refined Ritz: max residual / tol·θ1): {line}",
                  flush=True)
        previous = top_eigenpairs(op, n, tol=tol * 1e-4, seed=index, check_steps=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    parser.add_argument("--n-examples", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--count", type=int, default=9)
    parser.add_argument("--probe", action="store_true", help="where the products go")
    parser.add_argument("--refined", action="store_true", help="Ritz against refined Ritz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line(), flush=True)
    problem = digits_problem() if args.problem == "digits" else fashion_problem(args.n_examples)
    states = trajectory(problem, args.start, args.every, args.count)
    if args.refined:
        refined_probe(problem, args.n, args.tol, states)
        return
    if args.probe:
        probe(problem, args.n, args.tol, states)
        return
    solvers = variants(args.tol, args.n)
    records = measure(problem, args.n, args.tol, states, solvers, torch.float64)
    rows = summary_rows(problem, args.n, args.tol, records, solvers)
    print_table(f"warm levers, float64, {args.count} measurements {args.every} SGD steps apart "
                f"({machine_line()})", HEADER, rows)


if __name__ == "__main__":
    main()
