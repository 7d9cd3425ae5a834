"""Issue 13: what ``SubspaceTracker(budget=0.2)`` costs in the default digits run.

The CLI's default job (``fig1-fc-digits``: FC 64-100-100-10 on digits, SGD lr 0.1, batch 64,
1,500 steps; tracker k = 10, tol 1e-4, float64, the paper's anchors) is trained in a plain loop
(the CLI's mini-batches, ``batch_indices``) four ways:

(a) without a tracker;
(b) ``schedule="paper", budget=0.2``: the paper's steps, skipped where the overhead would pass 20%;
(c) ``schedule=1, budget=0.2``: measure as often as the budget allows;
(d) ``schedule="paper"`` without a budget (what the CLI measures: 34 rows);
(e) ``schedule=1, budget=0.2, subset=256``: cheaper measurements on a seeded subset (of 1,437).

The first measurement (step 0) is always made: its cost is not known before. When one
measurement costs more than a fifth of the whole training, as here (the network trains in
seconds), that one row is all a budget of 0.2 allows, and its overhead stays above 0.2.

For each: wall time, ratio to (a), rows measured, due steps skipped, and the final
``cost/overhead`` (seconds measuring over wall seconds since the tracker was built).

Measured (2 CPU cores shared with other jobs: load average 12, so every time is several times
the idle machine's; the CLI's default job takes 27 s idle against 140 s here):

| run | wall s | × no tracker | rows | skipped | overhead |
|---|---|---|---|---|---|
| (a) no tracker | 3.51 | 1.00 | 0 | 0 | — |
| (b) paper, budget 0.2 | 11.4 | 3.26 | 1 | 33 | 0.734 |
| (c) every step, budget 0.2 | 12.1 | 3.46 | 1 | 1500 | 0.718 |
| (d) paper, no budget | 140 | 39.9 | 34 | 0 | 0.977 |
| (e) every step, budget 0.2, subset 256 | 6.80 | 1.94 | 1 | 1500 | 0.40 |

Run: ``OMP_NUM_THREADS=1 python benchmarks/budget.py [--steps 1500]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_line, print_table
from tinysubspace.experiments.build import batch_indices, build_problem
from tinysubspace.experiments.config import ExperimentConfig
from tinysubspace.experiments.subspace_tracker import SubspaceTracker


def train(steps: int, tracker_options: dict | None) -> tuple[float, SubspaceTracker | None, int]:
    problem = build_problem(ExperimentConfig())
    model, loss_fn = problem.model, problem.loss_fn
    X, Y = problem.tensors("train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.perf_counter()
    tracker = None
    if tracker_options is not None:
        tracker = SubspaceTracker(model, loss_fn, (X, Y), k=10, tol=1e-4, dtype=torch.float64,
                                  batch_size=4096, **tracker_options)
    rows = 0
    for step in range(steps + 1):
        if tracker is not None:
            rows += tracker.on_step(step) is not None
        if step == steps:
            break
        index = batch_indices(len(X), 64, 0, step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(X[index]), Y[index]).backward()
        optimizer.step()
    return time.perf_counter() - started, tracker, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    print(machine_line())
    cases = {"(a) no tracker": None,
             "(b) paper, budget 0.2": {"schedule": "paper", "budget": 0.2},
             "(c) every step, budget 0.2": {"schedule": 1, "budget": 0.2},
             "(d) paper, no budget": {"schedule": "paper"},
             "(e) every step, budget 0.2, subset 256": {"schedule": 1, "budget": 0.2,
                                                        "subset": 256}}
    results = []
    for name, options in cases.items():
        seconds, tracker, rows = train(args.steps, options)
        overhead = float("nan")
        if tracker is not None and tracker.last_step is not None:
            overhead = tracker.clock["spent"] / tracker._elapsed()
        results.append((name, seconds, rows, tracker.skipped if tracker else 0, overhead))
    base = results[0][1]
    print_table(f"digits default run, {args.steps} steps",
                ["run", "wall s", "× no tracker", "rows", "skipped", "overhead"],
                [(n, s, s / base, r, k, o) for n, s, r, k, o in results])


if __name__ == "__main__":
    main()
