"""Issue 18: a whole tracked run's measuring time, warm-started tracker against a cold solver.

One training run of the paper's Fig. 1 setting on Fashion-MNIST (``fig1-fc-fashion``: FC
784-100-100-10, SGD η = 0.1, batch 64, its mini-batch order; ``data.n_train`` images) is made,
and at every step of the paper's schedule (``tracker.*``: every 10 steps up to 200, then every
100, anchors and the last step) it is measured twice by the experiments' own
:class:`~tinysubspace.experiments.tracker.Tracker`, on the same parameters:
``tracker.solver=track`` (the default: warm-started :func:`~tinysubspace.track_eigenpairs`) and
``tracker.solver=cold`` (a cold :func:`~tinysubspace.top_eigenpairs` at every measurement).
The two alternate which goes first. Each measurement's whole time (``cost/seconds``: loss,
gradient, accuracy, the 2k eigenpairs, H·g, anchor overlaps) is summed over the run.
A measurement changes nothing of the model (``Tracker`` guarantees it), so both see one
trajectory, and the ratio comes from one process, interleaved.

Run: ``OMP_NUM_THREADS=1 python benchmarks/end_to_end.py [--steps 1500] [--n 10000]``.
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


def run(args: argparse.Namespace) -> list[list]:
    """Train once; measure with both solvers at every scheduled step; one row per step."""
    overrides = {"data.n_train": str(args.n), "train.steps": str(args.steps),
                 "tracker.tol_scale": args.tol_scale}
    config = load_experiment(args.experiment, overrides)
    problem = build_problem(config, args.data_root)
    X, Y = problem.tensors("train")
    trackers = {solver: Tracker(dataclasses.replace(config.tracker, solver=solver),
                                problem.loss_fn, (X, Y)) for solver in ("track", "cold")}
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=config.optim.lr)
    steps = measurement_steps(config.tracker, config.train.steps)
    rows, step = [], 0
    for index, at in enumerate(steps):
        if args.deadline and time.perf_counter() > args.deadline and index > 1:
            print(f"(deadline: stopped before step {at}; {len(rows)} of {len(steps)} "
                  f"measurements done)", flush=True)
            break
        while step < at:
            sgd_step(problem, optimizer, X, Y, step, config.optim.batch_size, config.train.seed)
            step += 1
        order = ("track", "cold") if index % 2 == 0 else ("cold", "track")
        out = {s: trackers[s].measure(problem.model, at, seed=config.train.seed) for s in order}
        warm, cold = out["track"], out["cold"]
        n = config.tracker.k
        row = [at, warm.row["cost/seconds"], cold.row["cost/seconds"],
               warm.row["cost/seconds"] / cold.row["cost/seconds"],
               warm.eigenpairs.matvecs, cold.eigenpairs.matvecs,
               subspace_overlap(warm.eigenpairs.vectors, cold.eigenpairs.vectors),
               subspace_overlap(warm.eigenpairs.vectors[:, :n], cold.eigenpairs.vectors[:, :n]),
               f"{os.getloadavg()[0]:.1f}"]
        print("  step", row, flush=True)
        rows.append(row)
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
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.n, args.steps = 500, 30
    print(machine_line(), flush=True)
    started = time.perf_counter()
    args.deadline = started + args.budget if args.budget else None
    rows = run(args)
    warm, cold = sum(r[1] for r in rows), sum(r[2] for r in rows)
    header = ["step", "track s", "cold s", "track / cold", "track products", "cold products",
              "ov(2k)", "ov(k)", "load"]
    print_table(f"{args.experiment}, {args.n} images, {args.steps} steps, {len(rows)} "
                f"measurements, each measured by both ({machine_line()})", header, rows)
    ratios = sorted(r[3] for r in rows[1:])
    print(f"whole run: measuring {warm:.1f} s (track) against {cold:.1f} s (cold): "
          f"{warm / cold:.2f}; per measurement after the first: median "
          f"{ratios[len(ratios) // 2]:.2f}; products {sum(r[4] for r in rows)} against "
          f"{sum(r[5] for r in rows)}; min overlap (2k) {min(r[6] for r in rows):.4f}; "
          f"wall {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
