"""Issue 23 on a device: tracked top-20 of FC 784-100-100-10, each solver mode against cold eigsh.

The issue's device target: the warm block solver with the multiplicity check folded into its
passes, chosen by ``warm="auto"`` from the measured cost of a pass, at ≤ 0.3 of cold eigsh for
FC-784 with k = 20. Here, along one SGD trajectory (batch 64, η = 0.1, ``count`` measurements
``every`` steps apart from ``start``), float32 with TF32 off, at every measurement:

* ``eigsh``: ``scipy.sparse.linalg.eigsh`` (ARPACK) on ``op.to_scipy()``, cold: the baseline;
* ``cold``: :func:`tinysubspace.top_eigenpairs`, cold;
* every tracked mode, warm from its own previous answer: ``default`` (``track_eigenpairs`` as
  called: on a GPU without a pass cost the device rule picks ``subspace``, amortised check),
  ``auto`` (``pass_cost="measure"`` at its first warm measurement, then carried: the issue's
  configuration, the folded solver where passes cost), ``folded`` (``solver="folded"``),
  ``krylov`` (``warm="krylov"``, amortised check: the CPU default) and ``budget P``
  (``solver="budget"``, ``P`` products).

Printed: per measurement, then per mode the median (range) over the warm measurements of
time / eigsh's time, products, data passes, the smallest overlap (eq. 5) with eigsh's top k and
the largest residual ``‖Hv − θv‖/θ_1``. ``--pass-cost C0 C1`` (milliseconds) also prints what
each mode's passes and products would cost on a device with that pass cost, ``(passes · c0 +
products · c1) / (eigsh's products · (c0 + c1))``: a prediction from counts, for a run where no
device is lent (the counts do not depend on the device beyond rounding).

Run: ``python benchmarks/gpu_tracking.py`` (through ``benchmarks/gpu.sh`` on a device);
``--quick`` on a CPU as a smoke test (500 examples, k = 4, 3 measurements, seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

from common import exact_device, machine_line, print_table, synthetic_mnist_problem
from tinysubspace import HessianOperator, subspace_overlap, top_eigenpairs
from tinysubspace.linalg.warm_start import track_eigenpairs
from tracking import scipy_top, timed, trajectory


def modes(k: int, tol: float, budget: int) -> dict[str, Callable]:
    """``name -> solve(op, previous, seed)`` for every tracked mode (module docstring)."""
    def track(**options):
        def solve(op, previous, seed):
            chosen = dict(options)
            if getattr(previous, "pass_cost", None) is not None:
                chosen.pop("pass_cost", None)  # measured once, then carried in the result
            return track_eigenpairs(op, k, previous, tol=tol, seed=seed, **chosen)
        return solve
    return {"default": track(), "auto": track(warm="auto", pass_cost="measure"),
            "folded": track(solver="folded"), "krylov": track(warm="krylov"),
            f"budget {budget}": track(solver="budget", matvecs=budget)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="examples")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--budget", type=int, default=None, help="products (default 2k)")
    parser.add_argument("--seconds", type=float, default=240.0,
                        help="start no new measurement after this")
    parser.add_argument("--pass-cost", type=float, nargs=2, default=None, metavar=("C0", "C1"),
                        help="ms: also predict each mode's time on a device with this pass cost")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.count, args.start, args.every = 500, 4, 3, 5, 2
    began = time.perf_counter()
    device = exact_device()
    print(machine_line(), flush=True)
    problem = synthetic_mnist_problem(args.n).to(device)
    k, tol = args.k, args.tol
    solvers = modes(k, tol, args.budget or 2 * k)
    names = ["cold", *solvers]
    stats = {name: {key: [] for key in ("ratio", "mv", "passes", "ov", "res")}
             for name in ["eigsh", *names]}
    previous = dict.fromkeys(solvers)
    for index, state in enumerate(trajectory(problem, args.start, args.every, args.count)):
        if index > 1 and time.perf_counter() - began > args.seconds:
            print(f"(--seconds {args.seconds:g}: stopped after {index} measurements)", flush=True)
            break
        problem.model.load_state_dict(state)
        op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                             device=device)
        reference, _ = timed(op, partial(scipy_top, k=k, tol=tol, seed=index))
        runs = {"eigsh": reference,
                "cold": timed(op, partial(top_eigenpairs, k=k, tol=tol, seed=index))[0]}
        for name, solve in solvers.items():
            runs[name], previous[name] = timed(op, partial(solve, previous=previous[name],
                                                           seed=index))
        print(f"  {index}: " + ", ".join(
            f"{name} {run.matvecs}/{run.passes} {run.seconds / reference.seconds:.2f}"
            for name, run in runs.items()), flush=True)
        if index == 0:  # the tracked modes start cold
            continue
        for name, run in runs.items():
            s = stats[name]
            s["ratio"].append(run.seconds / reference.seconds)
            s["mv"].append(run.matvecs)
            s["passes"].append(run.passes)
            s["ov"].append(subspace_overlap(run.vectors, reference.vectors))
            s["res"].append(run.residual)
    header = ["mode", "time / eigsh, median (range)", "products", "passes", "min overlap",
              "max residual / θ1"]
    if args.pass_cost:
        header.append(f"predicted at c0 = {args.pass_cost[0]:g}, c1 = {args.pass_cost[1]:g} ms")
    rows = []
    for name in ["eigsh", *names]:
        s = stats[name]
        if not s["ratio"]:
            continue
        row = [name, f"{statistics.median(s['ratio']):.2f} ({min(s['ratio']):.2f}–"
               f"{max(s['ratio']):.2f})", f"{statistics.median(s['mv']):g}",
               f"{statistics.median(s['passes']):g}", f"{min(s['ov']):.4f}",
               f"{max(s['res']):.1e}"]
        if args.pass_cost:
            c0, c1 = args.pass_cost
            predicted = [(p * c0 + m * c1) / (a * (c0 + c1)) for p, m, a in
                         zip(s["passes"], s["mv"], stats["eigsh"]["mv"], strict=True)]
            row.append(f"{statistics.median(predicted):.2f}")
        rows.append(row)
    cost = getattr(previous["auto"], "pass_cost", None)
    if cost is not None:
        print(f"pass cost measured by 'auto': c0 = {1e3 * cost.c0:.3f} ms, c1 = "
              f"{1e3 * cost.c1:.3f} ms", flush=True)
    print_table(f"{problem.name}, p = {op.shape[0]}, k = {k}, tol {tol:g}, steps "
                f"{args.start}+{args.every}j, float32 ({machine_line()})", header, rows)


if __name__ == "__main__":
    main()
