"""Issue 18: a whole tracked run's measuring time, warm-started tracker against a cold solver.

One training run of the paper's Fig. 1 setting on Fashion-MNIST (``fig1-fc-fashion``: FC
784-100-100-10, SGD η = 0.1, batch 64, its mini-batch order; ``data.n_train`` images) is made,
and at every step of the paper's schedule (``tracker.*``: every 10 steps up to 200, then every
100, anchors and the last step) it is measured by each variant (``VARIANTS``) of the experiments'
own :class:`~tinysubspace.experiments.tracker.Tracker`, on the same parameters:
``cold`` (a cold :func:`~tinysubspace.top_eigenpairs` at every measurement, the baseline),
``track`` (warm-started :func:`~tinysubspace.track_eigenpairs` with the multiplicity check at
every measurement), ``amortised`` (the check amortised, issue 23) and ``budget`` (a fixed
budget of products per measurement). The order rotates from one measurement to the next.
Each measurement's whole time (``cost/seconds``: loss, gradient, accuracy, the 2k eigenpairs,
H·g, anchor overlaps) is summed over the run.
A measurement changes nothing of the model (``Tracker`` guarantees it), so both see one
trajectory, and the ratio comes from one process, interleaved.

Run: ``OMP_NUM_THREADS=1 python benchmarks/end_to_end.py [--steps 1500] [--n 10000]
[--variants track amortised budget]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from common import machine_line, print_table
from tinysubspace import subspace_overlap
from tinysubspace.experiments.build import batch_indices, build_problem
from tinysubspace.experiments.catalog import load_experiment
from tinysubspace.experiments.tracker import Tracker, measurement_steps


def sgd_step(problem, optimizer: torch.optim.Optimizer, X, Y, step: int, batch: int,
             seed: int) -> None:
    """One mini-batch SGD step on the run's batch of ``step`` (as ``tinysubspace run``)."""
    index = batch_indices(len(X), batch, seed, step)
    problem.model.train()
    optimizer.zero_grad(set_to_none=True)
    problem.loss_fn(problem.model(X[index]), Y[index]).backward()
    optimizer.step()
    problem.model.eval()


#: The tracker's modes (issue 23), as ``TrackerConfig`` fields; "cold" is the baseline.
VARIANTS: dict[str, dict] = {
    "cold": {"solver": "cold"},
    "track": {"solver": "track", "check": "full"},
    "amortised": {"solver": "track", "check": "amortised"},
    "budget": {"solver": "budget", "budget_matvecs": 40},  # 40 products for the 2k = 20 pairs
}


def run(args: argparse.Namespace) -> dict[str, list]:
    """Train once; measure with every variant at every scheduled step, interleaved.

    Returns per variant one row per measured step: ``[step, seconds, products, overlap(2k) with
    cold, overlap(k) with cold, |f_top − f_top(cold)|]``.
    """
    overrides = {"data.n_train": str(args.n), "train.steps": str(args.steps),
                 "tracker.tol_scale": args.tol_scale}
    config = load_experiment(args.experiment, overrides)
    problem = build_problem(config, args.data_root)
    X, Y = problem.tensors("train")
    names = ["cold"] + [v for v in args.variants if v != "cold"]
    trackers = {name: Tracker(dataclasses.replace(config.tracker, **VARIANTS[name]),
                              problem.loss_fn, (X, Y)) for name in names}
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=config.optim.lr)
    steps = measurement_steps(config.tracker, config.train.steps)
    rows: dict[str, list] = {name: [] for name in names}
    step, n = 0, config.tracker.k
    for index, at in enumerate(steps):
        if args.deadline and time.perf_counter() > args.deadline and index > 1:
            print(f"(deadline: stopped before step {at}; {index} of {len(steps)} "
                  f"measurements done)", flush=True)
            break
        while step < at:
            sgd_step(problem, optimizer, X, Y, step, config.optim.batch_size, config.train.seed)
            step += 1
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        out = {s: trackers[s].measure(problem.model, at, seed=config.train.seed) for s in order}
        cold = out["cold"]
        for name in names:
            got = out[name]
            rows[name].append([
                at, got.row["cost/seconds"], got.eigenpairs.matvecs,
                subspace_overlap(got.eigenpairs.vectors, cold.eigenpairs.vectors),
                subspace_overlap(got.eigenpairs.vectors[:, :n], cold.eigenpairs.vectors[:, :n]),
                abs(got.row["hessian/f_top"] - cold.row["hessian/f_top"])])
        print(f"  step {at} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{name} {rows[name][-1][1]:.1f} s / {rows[name][-1][2]} products"
            for name in names), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="fig1-fc-fashion")
    parser.add_argument("--n", type=int, default=10_000, help="training images")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (paper: 1500)")
    parser.add_argument("--tol-scale", default="top", choices=["top", "pair"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help="stop measuring after this many seconds (report what was done)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="tracker modes measured against cold (cold is always measured)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.n, args.steps = 500, 30
    print(machine_line(), flush=True)
    started = time.perf_counter()
    args.deadline = started + args.budget if args.budget else None
    rows = run(args)
    cold = rows["cold"]
    table = []
    for name, got in rows.items():
        ratios = sorted(g[1] / c[1] for g, c in zip(got[1:], cold[1:], strict=True))
        table.append([name, f"{sum(g[1] for g in got):.1f}",
                      f"{sum(g[1] for g in got) / sum(c[1] for c in cold):.2f}",
                      f"{ratios[len(ratios) // 2]:.2f}" if ratios else "-",
                      sum(g[2] for g in got), f"{min(g[3] for g in got):.4f}",
                      f"{min(g[4] for g in got):.4f}", f"{max(g[5] for g in got):.1e}"])
    header = ["variant", "measuring s", "/ cold (whole run)", "median / cold (after the first)",
              "products", "min ov(2k)", "min ov(k)", "max |Δ f_top|"]
    print_table(f"{args.experiment}, {args.n} images, {args.steps} steps, {len(cold)} "
                f"measurements, each measured by every variant ({machine_line()})", header, table)
    print(f"wall {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
