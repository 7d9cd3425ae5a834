"""Track the tiny subspace inside your own training loop (docs/own-loop.md).

A small fully-connected network on scikit-learn's digits, trained by plain SGD in a loop of our
own; ``ts.SubspaceTracker`` measures the Hessian's top-k subspace on the whole training set at
the steps of the paper's schedule, writes the CLI's run folder, and the run is read back.

    python examples/own_loop.py --steps 200 --out runs/own-loop
    tinysubspace plot runs/own-loop
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

import tinysubspace as ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--budget", type=float, default=None, help="e.g. 0.2")
    parser.add_argument("--out", default="runs/own-loop")
    args = parser.parse_args()

    digits = ts.load_dataset("digits")
    model = ts.build_model("fc", digits.input_shape, digits.num_outputs, widths=(32, 32), seed=0)
    loader = DataLoader(TensorDataset(digits.inputs, digits.targets), batch_size=64,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    tracker = ts.SubspaceTracker(model, F.cross_entropy, loader, k=args.k, schedule="paper",
                                 out=args.out, budget=args.budget, dtype=torch.float64)
    step, batches = 0, iter(loader)
    while step < args.steps:
        row = tracker.on_step(step)  # before the update of this step: step 0 is the init
        if row is not None:
            print(f"step {step:4d}  loss {row['train/loss']:.4f}  f_top {row['hessian/f_top']:.3f}"
                  f"  lambda_1 {row['hessian/eig_1']:.3f}  overhead {row['cost/overhead']:.0%}")
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        step += 1
    tracker.on_step(step, force=True)  # the final parameters
    tracker.close()

    run = ts.load_run(args.out)
    print(f"{len(run.metrics)} measurements in {args.out}; f_top at the end "
          f"{run.metrics['hessian/f_top'].iloc[-1]:.3f}")


if __name__ == "__main__":
    main()
