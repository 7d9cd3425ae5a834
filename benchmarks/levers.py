"""Issue 18: the tracker's levers, measured along an SGD trajectory against a cold eigsh.

At each of ``count`` measurements ``every`` SGD steps apart (batch 64, η = 0.1) one
:class:`~tinysubspace.HessianOperator` (kept gradient graphs) is built; its graph is built by
``loss_and_gradient()`` (the tracker's first call: timed as ``g``), then ``H·g`` is timed, then
every solver runs on the same operator, in the same order, interleaved:

* ``eigsh``: ARPACK (``which="LA"``) on ``op.to_scipy()``, cold, at ``tol`` (its criterion is
  per pair, ``‖r_i‖ ≤ tol·|θ_i|``);
* each warm variant: :func:`~tinysubspace.linalg.warm_start.track_eigenpairs` from its *own*
  previous answer (the first measurement is cold for all and left out of the medians):

  ``krylov`` (the CPU default), ``subspace`` (Rayleigh–Ritz on the previous basis, then blocks of
  ⌈n/4⌉ residual directions), ``krylov pair`` (``tol_scale="pair"``: ARPACK's criterion),
  ``krylov tol×F`` (every pair at a tolerance ``F`` times looser: the upper bound of what a
  looser tolerance for the next-k pairs alone can save), ``krylov basis B`` (a larger basis,
  fewer restarts); and, not a candidate, ``check off`` (``check_steps=0``: what the
  multiplicity check, the repeated-eigenvalue guarantee, costs).

Reported per variant: the median over measurements 1.. of time / eigsh's time, products, the
overlap (eq. 5) with eigsh's top ``n`` and its top ``n/2``, and the share of the solve's time
spent outside the products (the solver's own work). Also: ``floor`` = one block product of
``n`` columns over eigsh's time (what certifying ``n`` pairs costs at least), and the tracker's
other work (``g``, ``H·g``) over the default warm solve (the ceiling of "H·g from the Krylov basis"
and "one data pass for g and the first block").

``--set amortised`` (issue 23) compares the multiplicity checks instead, each warm ``krylov``:
``check="full"``, ``check="amortised"`` (``M = 4``) with ``guard_steps`` 2 (the default) and 0,
and no check; the products column adds the mean products and the mean time ratio (the median
hides the full-check rows, one in ``M``). Numbers: docs/performance.md, section 4.

Run: ``OMP_NUM_THREADS=1 python benchmarks/levers.py [--problem digits|fashion] [--set amortised]
[--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from threadpoolctl import threadpool_limits

from common import Problem, digits_problem, fashion_problem, machine_line, print_table
from tinysubspace import HessianOperator, SymmetricOperator, subspace_overlap
from tinysubspace.linalg.warm_start import track_eigenpairs
from tracking import trajectory


def eigsh_top(op: HessianOperator, n: int, tol: float, seed: int) -> torch.Tensor:
    """eigsh's top ``n`` eigenvectors (columns, descending eigenvalues)."""
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    with threadpool_limits(1, user_api="blas"):
        vals, vecs = eigsh(op.to_scipy(), k=n, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1].copy()
    return torch.as_tensor(vecs[:, order]).to(op.dtype)


def amortised_variants(tol: float) -> dict[str, Callable]:
    """Issue 23: the multiplicity check at every solve against the amortised one
    (:mod:`tinysubspace.linalg.amortised`), each warm ``krylov``; ``name -> solve``."""
    def track(**options: object) -> Callable:
        return lambda op, n, prev, seed: track_eigenpairs(op, n, prev, tol=tol, seed=seed,
                                                          warm="krylov", **options)
    return {
        "krylov, full check": track(check="full"),
        "krylov, amortised M=4 s=2": track(check="amortised", check_every=4, guard_steps=2),
        "krylov, amortised M=4 s=0": track(check="amortised", check_every=4, guard_steps=0),
        "krylov, check off (no guarantee)": track(check="full", check_steps=0),
    }


def variants(tol: float, loose: float, basis: int) -> dict[str, Callable]:
    """``name -> solve(op, n, previous, seed)``: the warm solvers compared."""
    return {
        "krylov (default)": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol, seed=seed, warm="krylov"),
        "subspace (RR + blocks)": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol, seed=seed, warm="subspace"),
        "krylov pair": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol, seed=seed, warm="krylov", tol_scale="pair"),
        f"krylov tol×{loose:g}": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol * loose, seed=seed, warm="krylov"),
        f"krylov basis {basis}": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol, seed=seed, warm="krylov", basis_size=basis),
        # not a candidate: what the repeated-eigenvalue guarantee (the multiplicity check) costs
        "krylov, check off (no guarantee)": lambda op, n, prev, seed: track_eigenpairs(
            op, n, prev, tol=tol, seed=seed, warm="krylov", check_steps=0),
    }


class TimedOperator(SymmetricOperator):
    """Delegates to ``op``; adds up the wall time spent in its products."""

    def __init__(self, op: SymmetricOperator) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.product_seconds = op, 0.0

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.op @ block
        self.product_seconds += time.perf_counter() - start
        return out


def seconds(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    """``(wall seconds, fn(*args))``."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(problem: Problem, n: int, tol: float, states: list, solvers: dict[str, Callable],
            dtype: torch.dtype) -> list[dict]:
    """Per measurement: times, products and overlaps of eigsh and every variant."""
    previous: dict[str, object] = dict.fromkeys(solvers)
    records = []
    for index, state in enumerate(states):
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y), dtype=dtype)
        t_g, (_, g) = seconds(op.loss_and_gradient)
        t_hg, _ = seconds(op.__matmul__, g)
        before = op.matvecs
        timed = TimedOperator(op)
        t_a, A = seconds(eigsh_top, timed, n, tol, index)
        record = {"index": index, "eigsh s": t_a, "eigsh mv": op.matvecs - before, "g s": t_g,
                  "Hg s": t_hg, "load": os.getloadavg()[0],
                  "eigsh own": 1 - timed.product_seconds / t_a}
        record["floor"] = seconds(op.__matmul__, A)[0] / t_a
        for name, solve in solvers.items():
            timed = TimedOperator(op)
            t, result = seconds(solve, timed, n, previous[name], index)
            previous[name] = result
            record[name] = {"ratio": t / t_a, "s": t, "mv": result.matvecs,
                            "own": 1 - timed.product_seconds / t,
                            "ov": subspace_overlap(result.vectors, A),
                            "ov top": subspace_overlap(result.vectors[:, : n // 2],
                                                       A[:, : n // 2])}
        print("  measured", index, {k: (round(v["ratio"], 2), v["mv"], round(v["ov"], 5))
                                    if isinstance(v, dict) else round(v, 3)
                                    for k, v in record.items()}, flush=True)
        records.append(record)
    return records


def summary_rows(problem: Problem, n: int, tol: float, records: list[dict],
                 solvers: dict[str, Callable]) -> list[list]:
    """Medians over measurements 1.. (measurement 0 is cold for every solver)."""
    warm = records[1:]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    loads = [r["load"] for r in records]
    rows = [[problem.name, n, f"{tol:g}", "eigsh (cold)", 1.0,
             f"{med([r['eigsh s'] for r in warm]):.2f}", f"{med([r['eigsh mv'] for r in warm]):g}",
             "", "", f"{med([r['eigsh own'] for r in warm]):.2f}",
             f"floor {med([r['floor'] for r in warm]):.2f}",
             f"{min(loads):.1f}–{max(loads):.1f}"]]
    for name in solvers:
        ratios = [r[name]["ratio"] for r in warm]
        rows.append([problem.name, n, f"{tol:g}", name,
                     f"{med(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
                     f"{med([r[name]['s'] for r in warm]):.2f}",
                     f"{med([r[name]['mv'] for r in warm]):g} "
                     f"(mean {statistics.fmean([r[name]['mv'] for r in warm]):.1f}, "
                     f"time {statistics.fmean(ratios):.2f})",
                     f"{min(r[name]['ov'] for r in warm):.4f}",
                     f"{min(r[name]['ov top'] for r in warm):.4f}",
                     f"{med([r[name]['own'] for r in warm]):.2f}", "", ""])
    default = next(iter(solvers))
    extra = [(r["g s"] + r["Hg s"]) / r[default]["s"] for r in warm]
    hg = [r["Hg s"] / r[default]["s"] for r in warm]
    rows.append([problem.name, n, f"{tol:g}", "tracker's g + H·g / default warm solve",
                 f"{med(extra):.2f} (H·g alone {med(hg):.2f})", "", "", "", "", "", "", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    parser.add_argument("--n-examples", type=int, default=10_000, help="Fashion-MNIST images")
    parser.add_argument("--n", type=int, nargs="*", default=[10, 20], help="pairs (top + next)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--loose", type=float, default=10.0)
    parser.add_argument("--basis", type=int, default=60)
    parser.add_argument("--set", default="levers", choices=["levers", "amortised"],
                        help="the variants: issue 18's levers or issue 23's checks")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.count, args.n_examples, args.n = 3, 500, [6]
    dtype = getattr(torch, args.dtype)
    print(machine_line(), flush=True)
    rows = []
    for n in args.n:  # a fresh model each: training mutates it
        problem = (digits_problem() if args.problem == "digits"
                   else fashion_problem(args.n_examples))
        states = trajectory(problem, args.start, args.every, args.count)
        solvers = (amortised_variants(args.tol) if args.set == "amortised"
                   else variants(args.tol, args.loose, max(args.basis, 2 * n + 2)))
        records = measure(problem, n, args.tol, states, solvers, dtype)
        rows += summary_rows(problem, n, args.tol, records, solvers)
        print_table(f"levers so far ({machine_line()})", HEADER, rows)
    print_table(f"tracking levers, {args.dtype}, {args.count} measurements {args.every} SGD "
                f"steps apart from step {args.start}, medians over measurements 1.. "
                f"({machine_line()})", HEADER, rows)


HEADER = ["problem", "n", "tol", "solver", "time / eigsh, median (range)", "s (median)",
          "products median (mean; mean time ratio)", "min ov(n) with eigsh", "min ov(n/2)",
          "solver's own share of its time", "", "load 1-min"]


if __name__ == "__main__":
    main()
