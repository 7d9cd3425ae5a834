"""Issue 23: the fixed-budget mode along an SGD trajectory, against cold scipy eigsh.

sklearn digits, FC 64-100-100-10, float64 Hessian over all 1,797 examples; minibatch SGD (batch
64, η = 0.1) from step ``start``, a measurement every ``every`` steps, ``count`` measurements.
At each measurement, interleaved (the order rotates), one torch and one BLAS thread:

* ``eigsh``: ``scipy.sparse.linalg.eigsh(op.to_scipy(), k, which="LA", tol)``, cold — the
  baseline of every ratio, and the "converged value" of ``f_top`` (eq. 2, with the full-data
  gradient);
* ``track``: :func:`track_eigenpairs` with its defaults (krylov start + multiplicity check),
  warm from its own previous answer;
* ``subspace`` and ``folded`` (``--blocks``): the block solvers, the multiplicity check after
  the solve or folded into its passes;
* ``budget P``: ``track_eigenpairs(solver="budget", matvecs=P)`` (the Krylov space of the
  previous vectors' sum, ``method="krylov"``), warm from its own previous answer (the first
  measurement is a cold solve to ``tol`` for every warm variant and is left out);
* ``block P`` (``--block-products``): ``refine_eigenpairs(method="block")``, the residual-block
  passes (the budget mode before issue 23's second round).

Printed: per variant the median (and range) over measurements 1.. of time / eigsh's time at the
same measurement, products and passes, the largest ``|f_top − f_top(eigsh)|``, the smallest
overlap (eq. 5) with eigsh's subspace, the range of the estimated ``f_top_error``, and the
``f_top`` error over the first and the last ten measurements (drift). Also ``(c0, c1)`` of a
pass measured at the first measurement and what ``warm="auto"`` would choose from them; the load
(``uptime``).

Run: ``python benchmarks/tracking_budget.py [--count 13] [--products 14 15]
[--block-products 20] [--problem fashion]`` (digits: about 3 minutes at load 4 on two cores;
``--count 50`` for the drift check, about 10; ``--problem fashion``: FC 784-100-100-10 on the
first 10,000 Fashion-MNIST images, about 1 minute a measurement).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from threadpoolctl import threadpool_limits

from common import digits_problem, fashion_problem, machine_line, print_table
from tinysubspace import HessianOperator, subspace_overlap, top_fraction
from tinysubspace.linalg.budget import refine_eigenpairs
from tinysubspace.linalg.pass_cost import choose_warm_start, measure_pass_cost
from tinysubspace.linalg.warm_start import track_eigenpairs
from tracking import PassCounter, trajectory


def eigsh_top(op, k: int, tol: float, seed: int):
    """ARPACK's top ``k``, descending, as an object with ``values`` and ``vectors``."""
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    vals, vecs = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1].copy()
    return argparse.Namespace(values=torch.as_tensor(vals[order]),
                              vectors=torch.as_tensor(vecs[:, order]).to(op.dtype))


def timed(op, solve):
    counter = PassCounter(op)
    start = time.perf_counter()
    result = solve(counter)
    return result, time.perf_counter() - start, counter.matvecs, counter.passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--count", type=int, default=13)
    parser.add_argument("--products", type=int, nargs="*", default=[14, 15])
    parser.add_argument("--block-products", type=int, nargs="*", default=[20])
    parser.add_argument("--problem", choices=["digits", "fashion"], default="digits")
    parser.add_argument("--no-track", action="store_true", help="leave out the default solve")
    parser.add_argument("--blocks", action="store_true",
                        help="also warm='subspace' (check after) and solver='folded'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line(), "| uptime:", os.popen("uptime").read().strip(), flush=True)
    problem = digits_problem() if args.problem == "digits" else fashion_problem(10_000)
    states = trajectory(problem, args.start, args.every, args.count)
    X, Y = problem.X, problem.Y
    names = [*([] if args.no_track else ["track"]), *(f"budget {p}" for p in args.products),
             *(f"block {p}" for p in args.block_products),
             *(["subspace", "folded"] if args.blocks else [])]
    previous = dict.fromkeys(names)
    stats = {name: {"ratio": [], "mv": [], "passes": [], "err": [], "ov": [], "est": []}
             for name in ["eigsh", *names]}
    k, tol = args.k, args.tol

    def solver(name, index):
        if name == "track":
            return lambda op: track_eigenpairs(op, k, previous[name], tol=tol, seed=index)
        if name in ("subspace", "folded"):  # the block solvers: separate check / folded check
            return lambda op: track_eigenpairs(op, k, previous[name], tol=tol, seed=index,
                                               warm="subspace", solver=_solver(name))
        products = int(name.split()[1])
        if name.startswith("block") and previous[name] is not None:
            return lambda op: refine_eigenpairs(op, k, previous[name], products, tol=tol,
                                                seed=index, method="block")
        return lambda op: track_eigenpairs(op, k, previous[name], tol=tol, seed=index,
                                           solver="budget", matvecs=products)

    with threadpool_limits(1, user_api="blas"):
        for index, state in enumerate(states):
            problem.model.load_state_dict(state)
            op = HessianOperator(problem.model, problem.loss_fn, (X, Y), dtype=torch.float64)
            _, g = op.loss_and_gradient()
            if index == 0:
                cost = measure_pass_cost(op, torch.randn(op.shape[0], 2 * k, dtype=op.dtype,
                                                         generator=torch.Generator().manual_seed(0)))
                print(f"pass cost at the first measurement: c0 = {1e3 * cost.c0:.2f} ms, c1 = "
                      f"{1e3 * cost.c1:.2f} ms (c1/(c0+c1) = {cost.c1 / (cost.c0 + cost.c1):.2f}); "
                      f"warm='auto' chooses {choose_warm_start(cost, k)!r}", flush=True)
            order = ["eigsh", *names]
            shift = index % len(order)
            results, seconds = {}, {}
            for name in order[shift:] + order[:shift]:
                solve = (lambda op, i=index: eigsh_top(op, k, tol, i)) if name == "eigsh" \
                    else solver(name, index)
                results[name], seconds[name], mv, passes = timed(op, solve)
                if name != "eigsh":
                    previous[name] = results[name]
                if index > 0:
                    stats[name]["mv"].append(mv)
                    stats[name]["passes"].append(passes)
            if index == 0:
                continue
            reference = top_fraction(g, results["eigsh"].vectors)
            for name in names:
                r = results[name]
                stats[name]["ratio"].append(seconds[name] / seconds["eigsh"])
                stats[name]["err"].append(abs(top_fraction(g, r.vectors) - reference))
                stats[name]["ov"].append(subspace_overlap(r.vectors, results["eigsh"].vectors))
                stats[name]["est"].append(r.f_top_error if r.f_top_error is not None else
                                          float("nan"))
    rows = [["eigsh (cold)", "1.00", f"{statistics.median(stats['eigsh']['mv']):.0f}",
             f"{statistics.median(stats['eigsh']['passes']):.0f}", "—", "—", "—", "—"]]
    for name in names:
        s = stats[name]
        ten = min(10, len(s["err"]))
        rows.append([name, f"{statistics.median(s['ratio']):.2f} ({min(s['ratio']):.2f}–"
                     f"{max(s['ratio']):.2f})", f"{statistics.median(s['mv']):.0f}",
                     f"{statistics.median(s['passes']):.0f}", f"{max(s['err']):.1e}",
                     f"{min(s['ov']):.4f}", _estimate(s["est"]),
                     f"{max(s['err'][:ten]):.1e} / {max(s['err'][-ten:]):.1e}"])
    print_table(f"{problem.name} float64, k = {k}, tol {tol:g}, every {args.every} SGD steps from "
                f"{args.start}, {len(states) - 1} warm measurements; uptime: "
                f"{os.popen('uptime').read().strip()}",
                ["variant", "time / eigsh: median (range)", "products", "passes",
                 "max |Δ f_top|", "min overlap", "max est. f_top_error",
                 "max |Δ f_top| first / last 10"], rows)


def _solver(name: str) -> str:
    return "folded" if name == "folded" else "lanczos"


def _estimate(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    return f"{min(finite):.2g}–{max(finite):.2g}" if finite else "—"


if __name__ == "__main__":
    main()
