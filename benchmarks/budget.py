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

Then ``check_subset=True`` at the initial and at the trained model (case (a)'s): eq. 5
between the top-10 of a seeded subset of 256 or 512 examples and of all 1,437, and both λ₁.

Measured (2 CPU cores shared with 5-6 other jobs, load average 6.7-7.7; median of 2
interleaved rounds; the numbers are in docs/own-loop.md):

| run | wall s | × no tracker | rows | skipped | overhead |
|---|---|---|---|---|---|
| (a) no tracker | 2.78 | 1.00 | 0 | 0 | — |
| (b) paper, budget 0.2 | 8.80 | 3.08 | 1 | 33 | 0.798 |
| (c) every step, budget 0.2 | 16.1 | 7.72 | 1 | 1500 | 0.296 |
| (d) paper, no budget | 197 | 97.3 | 34 | 0 | 0.976 |
| (e) every step, budget 0.2, subset 256 | 9.54 | 4.17 | 1 | 1500 | 0.492 |

Again with ``--cases abce --repeats 3`` (load 5.3-5.7): 1.52 s, 5.38 s (3.86×, overhead 0.77),
4.79 s (3.76×, 0.76), 2.34 s (1.62×, 0.47); rows and skips as above; the 16.1 s of (c) above is
the shared machine's noise (1,499 skipped ``on_step`` calls take 0.7 ms).

| model | subset | overlap top-10 (eq. 5) | λ1 subset | λ1 full |
|---|---|---|---|---|
| init | 256 | 0.623 | 0.438 | 0.377 |
| init | 512 | 0.787 | 0.401 | 0.377 |
| step 1500 | 256 | 0.864 | 5.88 | 5.31 |
| step 1500 | 512 | 0.952 | 5.64 | 5.31 |

Run: ``OMP_NUM_THREADS=1 python benchmarks/budget.py [--steps 1500] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import machine_line, print_table
from tinysubspace.experiments.build import batch_indices, build_problem
from tinysubspace.experiments.config import ExperimentConfig
from tinysubspace.experiments.subspace_tracker import SubspaceTracker


def train(steps: int, tracker_options: dict | None
          ) -> tuple[float, SubspaceTracker | None, int, torch.nn.Module]:
    problem = build_problem(ExperimentConfig())
    model, loss_fn = problem.model, problem.loss_fn
    X, Y = problem.tensors("train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.perf_counter()
    tracker = None
    if tracker_options is not None:
        tracker = SubspaceTracker(model, loss_fn, (X, Y), k=10, tol=1e-4, dtype=torch.float64,
                                  chunk_size=4096, **tracker_options)
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
    return time.perf_counter() - started, tracker, rows, model


def subset_report(model: torch.nn.Module, loss_fn, X: torch.Tensor, Y: torch.Tensor,
                  n: int) -> tuple[float, float, float, float]:
    """``check_subset=True`` at ``model``: eq. 5 between the top-10 of a seeded ``n``-subset and
    of the full set, the two λ₁, and the seconds of the subset's own measurement."""
    tracker = SubspaceTracker(model, loss_fn, (X, Y), k=10, tol=1e-4, dtype=torch.float64,
                              chunk_size=4096, subset=n, check_subset=True, anchors=())
    row = tracker.on_step(0)
    return (row["subset/overlap_top"], row["hessian/eig_1"], row["subset/eig_1_full"],
            row["cost/seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default="abcde", help="which of (a)-(e) to run")
    args = parser.parse_args()
    print(machine_line())
    cases = {"(a) no tracker": None,
             "(b) paper, budget 0.2": {"schedule": "paper", "budget": 0.2},
             "(c) every step, budget 0.2": {"schedule": 1, "budget": 0.2},
             "(d) paper, no budget": {"schedule": "paper"},
             "(e) every step, budget 0.2, subset 256": {"schedule": 1, "budget": 0.2,
                                                        "subset": 256}}
    cases = {name: options for name, options in cases.items()
             if name[1] in args.cases or name[1] == "a"}
    walls: dict[str, list[float]] = {name: [] for name in cases}
    last: dict[str, tuple[int, int, float]] = {}
    for _ in range(args.repeats):  # interleaved: every case once per round
        for name, options in cases.items():
            seconds, tracker, rows, model = train(args.steps, options)
            if options is None:
                trained = model
            overhead = float("nan")
            if tracker is not None and tracker.last_step is not None:
                overhead = tracker.clock["spent"] / tracker._elapsed()
            walls[name].append(seconds)
            last[name] = (rows, tracker.skipped if tracker else 0, overhead)
    base = walls["(a) no tracker"]
    table = [(name, statistics.median(w),
              statistics.median([t / b for t, b in zip(w, base, strict=True)]), *last[name])
             for name, w in walls.items()]
    print_table(f"digits default run, {args.steps} steps, median of {args.repeats} "
                "interleaved rounds", ["run", "wall s", "× no tracker", "rows", "skipped",
                                        "overhead"], table)
    print(machine_line())
    problem = build_problem(ExperimentConfig())
    X, Y = problem.tensors("train")
    report = []
    for when, model in (("init", problem.model), (f"step {args.steps}", trained)):
        for n in (256, 512):
            report.append((when, n, *subset_report(model, problem.loss_fn, X, Y, n)))
    print_table(f"subset against the full {len(X)} examples (check_subset=True, k = 10)",
                ["model", "subset", "overlap top-10 (eq. 5)", "λ1 subset", "λ1 full",
                 "subset measurement s"], report)


if __name__ == "__main__":
    main()
