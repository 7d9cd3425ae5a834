"""Issue 12: what the multiplicity check of ``top_eigenpairs`` costs, and what it buys.

Along an SGD trajectory (steps ``start, start + every, …``; batch 64, lr 0.1) the full-data
Hessian's top ``k`` pairs (float64 operator, as the tracker measures) are computed

* cold, single start vector, ``check_steps=0`` (the solver before issue 12) and with the default
  check (:data:`tinysubspace.linalg.deflation.CHECK_STEPS`);
* cold with a start block of 2 (``block_size=2``, no check): the other way to see a double
  eigenvalue;
* warm (``track_eigenpairs(warm="krylov")``, the CPU default of the tracker), without and with
  the check, each tracking its own previous answer (the first measurement is cold and left out
  of the sums).

Then a case where the check matters: ``H ⊕ H`` (the same Hessian twice, block-diagonal: every
eigenvalue exactly double), top ``k`` against the top ``k/2`` of ``H`` each repeated twice.

Run: ``python benchmarks/multiplicity.py [--problem digits|fashion] [--count 5]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (
    digits_problem,
    fashion_problem,
    machine_line,
    print_table,
    synthetic_mnist_problem,
)
from tinysubspace import HessianOperator, SymmetricOperator, top_eigenpairs, track_eigenpairs
from tinysubspace.linalg.deflation import CHECK_STEPS
from tracking import trajectory


class DirectSum(SymmetricOperator):
    """``H ⊕ H``: ``[[H, 0], [0, H]]`` (each eigenvalue of ``H`` twice)."""

    def __init__(self, op: SymmetricOperator) -> None:
        super().__init__(2 * op.shape[0], op.dtype, op.device)
        self.op = op

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        p = self.op.shape[0]
        return torch.cat([self.op @ block[:p], self.op @ block[p:]])


def timed(solve):
    start = time.perf_counter()
    result = solve()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", default="digits", choices=["digits", "fashion", "synthetic"])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=4096)
    args = parser.parse_args()
    problem = {"digits": digits_problem, "fashion": fashion_problem,
               "synthetic": synthetic_mnist_problem}[args.problem]()
    states = trajectory(problem, args.start, args.every, args.count)
    k, tol = args.k, args.tol
    variants = {
        "cold, no check": lambda op, prev, s: top_eigenpairs(op, k, tol=tol, seed=s,
                                                             check_steps=0),
        f"cold, check {CHECK_STEPS}": lambda op, prev, s: top_eigenpairs(op, k, tol=tol, seed=s),
        "cold, block 2": lambda op, prev, s: top_eigenpairs(op, k, tol=tol, seed=s,
                                                            block_size=2, check_steps=0),
        "krylov warm, no check": lambda op, prev, s: track_eigenpairs(
            op, k, prev, tol=tol, seed=s, warm="krylov", check_steps=0),
        f"krylov warm, check {CHECK_STEPS}": lambda op, prev, s: track_eigenpairs(
            op, k, prev, tol=tol, seed=s, warm="krylov"),
    }
    sums = {name: [0, 0.0] for name in variants}
    previous = dict.fromkeys(variants)
    rows = []
    for index, state in enumerate(states):
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                             chunk_size=args.chunk, dtype=torch.float64)
        row = [index]
        reference = None
        for name, solve in variants.items():
            result, seconds = timed(lambda: solve(op, previous[name], index))  # noqa: B023
            previous[name] = result if "warm" in name else None
            reference = reference if reference is not None else result.values
            error = float((result.values - reference).abs().max() / reference[0])
            row += [result.matvecs, f"{seconds:.1f}", f"{error:.0e}",
                    "yes" if result.multiplicity_checked else "no"]
            if index > 0 or "warm" not in name:
                sums[name][0] += result.matvecs
                sums[name][1] += seconds
        rows.append(row)
        print("  measured", row, flush=True)
    header = ["#"]
    for name in variants:
        header += [f"{name} mv", "s", "Δλ/λ1", "checked"]
    print_table(f"{problem.name}, p = {op.shape[0]}, k = {k}, tol = {tol:g}, float64, "
                f"steps {args.start}+{args.every}j, {machine_line()}", header, rows)
    print_table("totals (warm: measurements 1..)", ["variant", "products", "seconds"],
                [[name, mv, f"{s:.1f}"] for name, (mv, s) in sums.items()])

    # H ⊕ H: every eigenvalue twice
    exact = top_eigenpairs(op, k // 2, tol=1e-10).values
    doubled = exact.repeat_interleave(2)
    rows = []
    for name, kwargs in [("no check", {"check_steps": 0}), (f"check {CHECK_STEPS}", {}),
                         ("block 2, no check", {"block_size": 2, "check_steps": 0})]:
        result, seconds = timed(lambda: top_eigenpairs(DirectSum(op), k, tol=tol,
                                                       **kwargs))  # noqa: B023
        error = float((result.values - doubled).abs().max() / doubled[0])
        rows.append([name, result.matvecs, f"{seconds:.1f}", f"{error:.1e}",
                     result.converged, result.multiplicity_checked])
    print_table(f"H ⊕ H of the last state (p = {2 * op.shape[0]}), top {k} against the top "
                f"{k // 2} of H twice", ["solve", "products", "s", "max |Δλ| / λ1", "converged",
                                          "checked"], rows)


if __name__ == "__main__":
    main()
