"""Issue 7: eigenpairs along a real training trajectory — cold scipy, cold Lanczos, warm tracking.

A model is trained with SGD (batch 64, η = 0.1, the paper's setting); at ``count`` measurements
``every`` steps apart the full-data Hessian's top ``k`` eigenpairs are computed three ways:

(a) ``scipy.sparse.linalg.eigsh`` (ARPACK, ``which="LA"``) on ``op.to_scipy()``, cold;
(b) :func:`tinysubspace.top_eigenpairs`, cold (single-vector thick-restart Lanczos);
(c) :func:`tinysubspace.linalg.warm_start.track_eigenpairs`, warm-started from its own answer at the
    previous measurement (the first measurement is a cold start and is left out of the ratios),
    once per ``warm`` start (``subspace`` and ``krylov``).

``floor``: the time of one block product ``H·[v_1 … v_k]`` on (a)'s vectors, over (a)'s time —
what any solver that certifies its ``k`` pairs (residuals or Rayleigh quotients of ``k``
vectors) must spend at least; summed over measurements 1.. like the other ratios.
Every solve runs on the same operator; columns give products (matvecs), data passes and seconds,
the largest residual ``max ‖Hv − θv‖ / θ_1`` and the subspace overlap (eq. 5) with (a)'s answer.
Also measured in the same run: gradient time, single H·v time, and per-vector time of a block.

Run: ``python benchmarks/tracking.py [--problem digits|fashion|resnet18] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from threadpoolctl import threadpool_limits

from common import (
    Problem,
    digits_problem,
    fashion_problem,
    machine_line,
    print_table,
    timeit,
)
from tinysubspace import HessianOperator, SymmetricOperator, subspace_overlap, top_eigenpairs
from tinysubspace.linalg.warm_start import track_eigenpairs


class PassCounter(SymmetricOperator):
    """Delegates to ``op``; counts passes (calls) as well as products."""

    def __init__(self, op: SymmetricOperator) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.passes = op, 0

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return self.op @ block


@dataclasses.dataclass(frozen=True)
class Solve:
    values: torch.Tensor
    vectors: torch.Tensor
    matvecs: int
    passes: int
    seconds: float
    residual: float  # max ‖Hv − θv‖ / |θ_1|, recomputed for every method alike


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(op: SymmetricOperator, solve) -> tuple[Solve, object]:
    """Run ``solve(counting op)`` (anything returning ``.values`` and ``.vectors``), timed."""
    counter = PassCounter(op)
    sync(op.device)
    start = time.perf_counter()
    result = solve(counter)
    sync(op.device)
    seconds = time.perf_counter() - start
    values, vectors = result.values, result.vectors
    residual = (op @ vectors - vectors * values).norm(dim=0).max() / values.abs().max()
    return Solve(values, vectors, counter.matvecs, counter.passes, seconds, float(residual)), result


def scipy_top(op: SymmetricOperator, k: int, tol: float, seed: int) -> Solve:
    """ARPACK's top ``k`` (``which="LA"``), sorted descending, as tensors on ``op``'s device."""
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    with threadpool_limits(1, user_api="blas"):  # numpy's BLAS threads fight torch's
        vals, vecs = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(vals)[::-1].copy()
    values = torch.as_tensor(vals[order]).to(op.device, op.dtype)
    vectors = torch.as_tensor(vecs[:, order]).to(op.device, op.dtype)
    return Solve(values, vectors, 0, 0, 0.0, float("nan"))


def trajectory(problem: Problem, start: int, every: int, count: int, seed: int = 0,
               lr: float = 0.1, batch: int = 64) -> list[dict[str, torch.Tensor]]:
    """Parameters (state dicts) at steps ``start, start + every, …`` of minibatch SGD."""
    model = problem.model
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    states, step = [], 0
    while len(states) < count:
        if step >= start and (step - start) % every == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        index = torch.randint(0, problem.X.shape[0], (batch,), generator=gen)
        X, Y = problem.X[index].to(problem.device), problem.Y[index].to(problem.device)
        model.train()
        loss = problem.loss_fn(model(X), Y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    return states


def unit_costs(op: HessianOperator, block: int, repeat: int) -> dict[str, float]:
    """Gradient, single H·v and per-vector block time (seconds), measured now."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen).to(op.device, op.dtype)
    V = torch.randn(op.shape[0], block, generator=gen).to(op.device, op.dtype)
    s = lambda: sync(op.device)  # noqa: E731
    grad = timeit(op.loss_and_gradient, repeat=repeat, sync=s)
    single = timeit(lambda: op @ v, repeat=repeat, sync=s)
    per_vector = timeit(lambda: op @ V, repeat=max(1, repeat // 2), sync=s) / block
    return {"grad": grad, "single": single, "per_vector": per_vector}


def run(problem: Problem, k: int, tol: float, start: int, every: int, count: int,
        chunk: int | None, repeat: int, warms: tuple[str, ...] = ("subspace", "krylov"),
        block_size: int | None = None, deadline: float | None = None) -> dict[str, float]:
    """One table: ``count`` measurements; (c) once per warm start in ``warms``, each tracking
    its own previous answer. Stops early (keeping what it has) after ``deadline`` (a
    ``time.perf_counter()`` value)."""
    states = trajectory(problem, start, every, count)
    rows, sums = [], dict.fromkeys(("a", "b", "floor", *warms), 0.0)
    previous: dict[str, object] = dict.fromkeys(warms)
    costs = None
    for index, state in enumerate(states):
        if deadline is not None and time.perf_counter() > deadline and index > 1:
            print(f"(deadline: stopped after {index} measurements)", flush=True)
            break
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                             chunk_size=chunk, device=problem.device)
        if costs is None:
            costs = unit_costs(op, 20, repeat)
        a, _ = timed(op, partial(scipy_top, k=k, tol=tol, seed=index))
        b, _ = timed(op, partial(top_eigenpairs, k=k, tol=tol, seed=index))
        certify = timeit(partial(op.__matmul__, a.vectors), repeat=2,
                         sync=partial(sync, op.device))
        moved = (subspace_overlap(previous[warms[0]].vectors, a.vectors)
                 if previous[warms[0]] is not None else 1.0)
        row = [index, f"{moved:.3f}", a.matvecs, f"{a.seconds:.2f}", f"{a.residual:.0e}",
               f"{certify / a.seconds:.2f}",
               b.matvecs, f"{b.seconds:.2f}", f"{subspace_overlap(b.vectors, a.vectors):.4f}"]
        times = {"a": a.seconds, "b": b.seconds, "floor": certify}
        for warm in warms:
            c, previous[warm] = timed(op, partial(track_eigenpairs, k=k, previous=previous[warm],
                                                  tol=tol, seed=index, warm=warm,
                                                  block_size=block_size))
            row += [f"{c.matvecs}/{c.passes}", f"{c.seconds:.2f}",
                    f"{subspace_overlap(c.vectors, a.vectors):.4f}", f"{c.seconds / a.seconds:.2f}"]
            times[warm] = c.seconds
        rows.append(row)
        print("  measured", row, flush=True)
        if index > 0:
            sums = {key: sums[key] + times[key] for key in sums}
    title = (f"{problem.name}, p = {op.shape[0]}, k = {k}, tol = {tol:g}, steps {start}+{every}j, "
             f"block={block_size or 'default'}, {op.dtype}, {machine_line()}")
    header = ["#", "ov(prev, a)", "(a) mv", "(a) s", "(a) res", "floor", "(b) mv", "(b) s",
              "ov(b, a)"]
    for warm in warms:
        header += [f"{warm} mv/passes", f"{warm} s", f"ov({warm}, a)", f"{warm}/(a)"]
    print_table(title, header, rows)
    summary = {"(b)/(a) time": sums["b"] / sums["a"],
               **{f"{warm}/(a) time": sums[warm] / sums["a"] for warm in warms},
               "floor (one block of k) / (a)": sums["floor"] / sums["a"],
               "H·v / grad": costs["single"] / costs["grad"],
               "block per-vector / H·v": costs["per_vector"] / costs["single"],
               "grad ms": 1e3 * costs["grad"]}
    print("summary over measurements 1..:", ", ".join(f"{k} {v:.2f}" for k, v in summary.items()),
          flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    parser.add_argument("--n", type=int, default=10_000, help="Fashion-MNIST subset size")
    parser.add_argument("--k", type=int, nargs="*", default=[10, 20])
    parser.add_argument("--tol", type=float, nargs="*", default=[1e-3, 1e-4],
                        help="one tolerance per k")
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--warm", nargs="*", default=["subspace", "krylov"])
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.count, args.n, args.k, args.tol = 3, 500, [4], [1e-3]
    print(machine_line())
    for k, tol in zip(args.k, args.tol, strict=True):  # a fresh model each: training mutates it
        problem = digits_problem() if args.problem == "digits" else fashion_problem(args.n)
        run(problem, k, tol, args.start, args.every, args.count, args.chunk,
            repeat=1 if args.quick else 5, warms=tuple(args.warm),
            block_size=args.block_size)


if __name__ == "__main__":
    main()
