"""Profile exact Hessian-vector products: which way of computing H·V is fastest.

Variants (all exact, all through :class:`tinysubspace.HessianOperator`):

* ``loop``: per batch, build the gradient graph once (``create_graph=True``) and run one
  backward pass per column with ``retain_graph`` (double backprop).
* ``batched``: the same graph, one vmapped backward for the whole block
  (``torch.autograd.grad(..., is_grads_batched=True)``).
* ``jvp``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(loss))``, vmapped over the
  block's columns.

Also: data chunk size (``chunk_size=`` of the operator) and torch threads.

Run: ``python benchmarks/hvp_profile.py [--quick]``.
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
from tinysubspace import HessianOperator


def make_op(problem: Problem, method: str, chunk: int | None, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> HessianOperator:
    op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                         chunk_size=chunk, device=device, dtype=dtype)
    op.hvp_method = method
    return op


def check_exact(problem: Problem) -> float:
    """Largest relative difference between the methods on a block (float64)."""
    ops = {m: make_op(problem, m, None, dtype=torch.float64) for m in EXACT_HVP_METHODS}
    V = torch.randn(ops["loop"].shape[0], 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    ref = ops["loop"] @ V
    return max(float((ops[m] @ V - ref).norm() / ref.norm()) for m in ("batched", "jvp"))


def profile(problem: Problem, chunks: list[int | None], block: int, repeat: int,
            methods: tuple[str, ...] = EXACT_HVP_METHODS) -> None:
    p = make_op(problem, "loop", None).shape[0]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(p, generator=gen)
    V = torch.randn(p, block, generator=gen)
    fns = {}
    for chunk in chunks:
        fns[(chunk, "grad")] = make_op(problem, "loop", chunk).loss_and_gradient
        for method in methods:
            op = make_op(problem, method, chunk)
            fns[(chunk, method, 1)] = lambda op=op: op @ v
            fns[(chunk, method, block)] = lambda op=op: op @ V
    best = timeit_interleaved(fns, repeat=repeat)
    rows = []
    for chunk in chunks:
        t_grad = best[(chunk, "grad")]
        for method in methods:
            t_one, t_blk = best[(chunk, method, 1)], best[(chunk, method, block)] / block
            rows.append([str(chunk or problem.X.shape[0]), method, 1e3 * t_grad, 1e3 * t_one,
                         t_one / t_grad, 1e3 * t_blk, t_blk / t_grad, t_blk / t_one])
    print_table(f"{problem.name}, p = {p}, N = {problem.X.shape[0]}, block of {block} "
                f"({machine_line()})",
                ["chunk", "method", "grad ms", "H·v ms", "H·v / grad", "block ms/vec",
                 "block/vec / grad", "block/vec / H·v"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--threads", type=int, nargs="*", default=None)
    args = parser.parse_args()
    n = 1000 if args.quick else 10_000
    repeat = 1 if args.quick else 5
    print(machine_line())
    print(f"max relative difference between methods (float64, digits): "
          f"{check_exact(digits_problem()):.1e}")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        profile(digits_problem(), [None, 512], 20, repeat)
        profile(synthetic_mnist_problem(n), [None, 2500, 1000], 20, repeat)


if __name__ == "__main__":
    main()
