"""Issue 7 on a GPU: ResNet-18 (CIFAR variant) on CIFAR-sized synthetic data, float32.

Strict float32 (TF32 off for matrix products and convolutions). Measured in one run:

1. gradient, single H·v and 20-column block per-vector time for every ``hvp_method``;
2. the tracking table of ``benchmarks/tracking.py`` (cold scipy eigsh, cold top_eigenpairs,
   warm track_eigenpairs with both warm starts) for k = 10 (tol 1e-3) and k = 20 (tol 1e-4),
   using the H·v method that was fastest in 1; first the same for a small model (FC
   784-100-100-10 on 10k synthetic MNIST-sized examples, k = 20), whose passes cost latency.

Everything stops starting new work once ``--budget`` seconds have passed (what was measured is
printed as it comes). Run through ``bash benchmarks/gpu.sh`` (which runs the GPU tests first), or
``python benchmarks/gpu.py --quick`` on a CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from common import (
    EXACT_HVP_METHODS,
    Problem,
    exact_device,
    machine_line,
    print_table,
    synthetic_mnist_problem,
    timeit_interleaved,
)
from tinysubspace import HessianOperator
from tinysubspace.problems.models.networks import build_model
from tracking import run


def cifar_problem(n: int, device: str, width: int = 64, seed: int = 0) -> Problem:
    """``n`` synthetic 3×32×32 images (10 Gaussian class templates plus noise), ResNet-18."""
    gen = torch.Generator().manual_seed(seed)
    templates = 0.5 * torch.randn(10, 3, 32, 32, generator=gen)
    Y = torch.randint(0, 10, (n,), generator=gen)
    X = templates[Y] + torch.randn(n, 3, 32, 32, generator=gen)
    model = build_model("resnet18", (3, 32, 32), 10, seed=seed, width=width)
    return Problem(f"ResNet-18 (width {width}) synthetic CIFAR {n}x3x32x32", model,
                   nn.functional.cross_entropy, X, Y).to(device)


def hvp_table(problem: Problem, chunk: int | None, block: int, repeat: int) -> tuple[str, float]:
    """Print the H·v cost table; return the method with the least ``single + per-vector``
    and its single-product time (seconds)."""
    device = torch.device(problem.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ops = {}
    for method in EXACT_HVP_METHODS:
        ops[method] = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                                      chunk_size=chunk, device=device)
        ops[method].hvp_method = method
    p = ops["loop"].shape[0]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(p, generator=gen).to(device)
    V = torch.randn(p, block, generator=gen).to(device)
    fns = {"grad": ops["loop"].loss_and_gradient}
    for method, op in ops.items():
        fns[(method, 1)] = lambda op=op: op @ v
        fns[(method, block)] = lambda op=op: op @ V
    best = timeit_interleaved(fns, repeat=repeat, sync=sync)
    rows, score = [], {}
    for method in EXACT_HVP_METHODS:
        single, per_vector = best[(method, 1)], best[(method, block)] / block
        score[method] = single + per_vector
        rows.append([method, 1e3 * best["grad"], 1e3 * single, single / best["grad"],
                     1e3 * per_vector, per_vector / best["grad"], per_vector / single])
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print_table(f"{problem.name}, p = {p}, chunk {chunk}, block of {block}, peak memory "
                f"{memory:.1f} GiB ({machine_line()})",
                ["method", "grad ms", "H·v ms", "H·v / grad", "block ms/vec", "block/vec / grad",
                 "block/vec / H·v"], rows)
    fastest = min(score, key=score.get)
    return fastest, best[(fastest, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds")
    parser.add_argument("--count", type=int, default=5, help="measurements per table")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    args = parser.parse_args()
    start = time.perf_counter()
    device = exact_device()
    width, n, chunk, repeat = (4, 32, 16, 1) if args.quick else (64, args.n, args.chunk, 2)
    print(machine_line(), flush=True)
    problem = cifar_problem(n, device, width=width)
    method, single = hvp_table(problem, chunk, 20, repeat)
    HessianOperator.hvp_method = method  # the tables below use the fastest exact method
    print(f"H·v method for the tracking tables: {method} "
          f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    # a small model first: on a GPU its passes cost latency, not arithmetic
    small = synthetic_mnist_problem(500 if args.quick else 10_000).to(device)
    run(small, 20, 1e-4, start=100, every=2, count=3 if args.quick else 6, chunk=None,
        repeat=repeat, deadline=start + 0.3 * args.budget)
    for k, tol, share in ((10, 1e-3, 0.5), (20, 1e-4, 1.0)):
        deadline = start + share * args.budget - (0 if args.quick else 30)
        estimate = 2 * 4 * (6 * k - 10) * single  # two measurements, four solves each
        if time.perf_counter() + estimate > start + args.budget and not args.quick:
            print(f"skipped k = {k}: two measurements need about {estimate:.0f} s", flush=True)
            continue
        problem = cifar_problem(n, device, width=width)  # training mutates the model
        run(problem, k, tol, start=20, every=2, count=3 if args.quick else args.count,
            chunk=chunk, repeat=repeat, deadline=deadline)
        print(f"({time.perf_counter() - start:.0f} s so far)", flush=True)

if __name__ == "__main__":
    main()
