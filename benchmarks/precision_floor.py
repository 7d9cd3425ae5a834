"""Issue 12 item 2: a tolerance below what a float32 Hessian can reach stops, warns and says so.

The issue's case: ``top_eigenpairs(op, 20, tol=1e-6, init=previous)`` on the float32 digits
Hessian (FC 64-100-100-10, all 1,797 examples) ran over 9 minutes before the stagnation stop
(``linalg/stagnation.py``). Here: SGD to step 100 (batch 64, lr 0.1), a top-20 solve at
tol 1e-4 there, two steps on, the same solve warm-started from those vectors at tol 1e-6 and
1e-9; products, seconds, ``converged`` and the warning are printed.

Run: ``OMP_NUM_THREADS=1 python benchmarks/precision_floor.py``.
"""

from __future__ import annotations

import time
import warnings

from common import digits_problem, machine_line
from tinysubspace import HessianOperator, top_eigenpairs
from tracking import trajectory


def main() -> None:
    problem = digits_problem()
    states = trajectory(problem, 100, 2, 2)
    problem.model.load_state_dict(states[0])
    op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y))
    first = top_eigenpairs(op, 20, tol=1e-4)
    problem.model.load_state_dict(states[1])
    op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y))
    print(f"{problem.name}, p = {op.shape[0]}, {op.dtype}, {machine_line()}")
    for tol in (1e-6, 1e-9):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = top_eigenpairs(op, 20, tol=tol, init=first.vectors)
        reached = float(result.residuals.max() / result.values.abs().max())
        print(f"tol {tol:g}: {result.matvecs} products, {time.perf_counter() - start:.1f} s, "
              f"converged={result.converged}, largest residual {reached:.1e} |λ1|")
        for warning in caught:
            print(f"  {warning.category.__name__}: {warning.message}")


if __name__ == "__main__":
    main()
