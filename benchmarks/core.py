"""Issue 2: the core's speed — gradient, H·v, block H·V, and top-10 eigenpairs against scipy.

For each problem (after ``--steps`` SGD steps from the seeded initialisation, so that the
Hessian has its outliers), measured in one run:

* gradient time; single H·v time (``hvp / grad``); per-vector time of a 20-column block
  (``block / H·v``), for every ``hvp_method``;
* top-10 eigenpairs to ``tol`` 1e-3 (float32 operator) and 1e-6 (float64 operator):
  products and seconds (best of two interleaved runs each) for
  :func:`tinysubspace.top_eigenpairs` and for ``scipy.sparse.linalg.eigsh`` on
  ``op.to_scipy()`` (ARPACK, ``which="LA"``, its own criterion ``‖r_i‖ ≤ tol·|θ_i|``), with the
  largest residual ``‖Hv − θv‖ / θ_1`` each reached and the subspace overlap between the two
  answers.

Run: ``python benchmarks/core.py [--quick] [--mnist-n 10000]``.
"""

from __future__ import annotations

import argparse

import torch

from common import (
    EXACT_HVP_METHODS,
    Problem,
    digits_problem,
    machine_line,
    print_table,
    synthetic_mnist_problem,
    timeit_interleaved,
)
from tinysubspace import HessianOperator, subspace_overlap, top_eigenpairs
from tracking import scipy_top, timed, trajectory


def unit_rows(problem: Problem, block: int, repeat: int) -> list[list[object]]:
    """Gradient, single H·v and block per-vector times, every method interleaved."""
    op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y))
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen)
    V = torch.randn(op.shape[0], block, generator=gen)
    fns = {"grad": op.loss_and_gradient}
    for method in EXACT_HVP_METHODS:
        m_op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y))
        m_op.hvp_method = method
        fns[(method, 1)] = lambda m_op=m_op: m_op @ v
        fns[(method, block)] = lambda m_op=m_op: m_op @ V
    best = timeit_interleaved(fns, repeat=repeat)
    rows = []
    for method in EXACT_HVP_METHODS:
        single, per_vector = best[(method, 1)], best[(method, block)] / block
        rows.append([problem.name, method, 1e3 * best["grad"], 1e3 * single,
                     single / best["grad"], 1e3 * per_vector, per_vector / single])
    return rows


def eigen_rows(problem: Problem, k: int, tol: float, dtype: torch.dtype) -> list[list[object]]:
    op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y), dtype=dtype)
    ours, scipy = None, None
    for _ in range(2):  # best of two runs each, interleaved (the solves are deterministic)
        o, _ = timed(op, lambda o: top_eigenpairs(o, k, tol=tol))
        s, _ = timed(op, lambda o: scipy_top(o, k, tol, seed=0))
        ours = o if ours is None or o.seconds < ours.seconds else ours
        scipy = s if scipy is None or s.seconds < scipy.seconds else scipy
    overlap = subspace_overlap(ours.vectors, scipy.vectors)
    return [[problem.name, f"{tol:g}", str(dtype).replace("torch.", ""), name, s.matvecs,
             f"{s.seconds:.2f}", f"{s.residual:.1e}", f"{overlap:.4f}",
             f"{ours.matvecs / scipy.matvecs:.2f}", f"{ours.seconds / scipy.seconds:.2f}"]
            for name, s in (("top_eigenpairs", ours), ("scipy eigsh", scipy))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--mnist-n", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100, help="SGD steps before measuring")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = (500, 1) if args.quick else (args.mnist_n, args.repeat)
    print(machine_line())
    units, eigens = [], []
    for make in (digits_problem, lambda: synthetic_mnist_problem(n)):
        problem = make()
        problem.model.load_state_dict(trajectory(problem, args.steps, 1, 1)[0])
        units += unit_rows(problem, 20, repeat)
        for tol, dtype in ((1e-3, torch.float32), (1e-6, torch.float64)):
            eigens += eigen_rows(problem, 10, tol, dtype)
        print_table(f"H·v cost ({machine_line()})",
                    ["problem", "method", "grad ms", "H·v ms", "H·v / grad", "block ms/vec",
                     "block/vec / H·v"], units)
        print_table(f"top-10 eigenpairs ({machine_line()})",
                    ["problem", "tol", "dtype", "solver", "products", "s", "max res / θ1",
                     "overlap", "products / eigsh", "time / eigsh"], eigens)


if __name__ == "__main__":
    main()
