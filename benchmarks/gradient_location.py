"""Where the gradient lies at a run's final checkpoint, on the exact spectrum (small models only).

    python benchmarks/gradient_location.py RUN [--batches 50]

Forms the dense Hessian of the whole training set in float64 (H·I in blocks of 128 columns,
symmetrised; p up to a few thousand), diagonalises it (``torch.linalg.eigh``) and prints for the
full-data gradient g the top-k share f_top (eq. 2), overlap(g, Hg) (eq. 3) and how many
eigenvectors (by eigenvalue) hold 50% and 90% of ‖g‖² (from c_i², eq. 12); then the same for
mini-batch gradients g_B of the run's batch size at the same point: f_top on the full H's top-k
subspace, overlap(g_B, H g_B) and overlap(g_B, H_B g_B). docs/reproduction.md uses it to explain
the softmax row of Table 1 on digits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import tinysubspace as ts
from tinysubspace.experiments.build import build_problem
from tinysubspace.experiments.config import config_from_dict


def dense_hessian(op: ts.HessianOperator, block: int = 128) -> torch.Tensor:
    """``H`` as a dense symmetric matrix, ``block`` columns of the identity at a time."""
    p = op.shape[0]
    eye = torch.eye(p, dtype=torch.float64)
    H = torch.cat([op @ eye[:, i:i + block] for i in range(0, p, block)], dim=1)
    return (H + H.T) / 2


def overlap(g: torch.Tensor, Hg: torch.Tensor) -> float:
    return float(g @ Hg / (g.norm() * Hg.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    config = config_from_dict(json.loads(Path(args.run, "config.json").read_text()))
    problem = build_problem(config)
    checkpoint = torch.load(f"{args.run}/checkpoint.pt", weights_only=False)
    problem.model.load_state_dict(checkpoint["model"])
    X, Y = problem.train.inputs, problem.train.targets
    op = ts.HessianOperator(problem.model, problem.loss_fn, (X, Y), dtype=torch.float64)
    H = dense_hessian(op)
    values, vectors = torch.linalg.eigh(H)
    values, vectors = values.flip(0), vectors.flip(1)
    _, g = op.loss_and_gradient()
    k = config.tracker.k
    c2 = (vectors.T @ g) ** 2 / (g @ g)
    print(f"{args.run} at step {checkpoint['step']}: p = {H.shape[0]}, lambda_1..{k + 1} = "
          f"{np.round(values[:k + 1].numpy(), 4)}")
    print(f"full-data g: f_top (k = {k}) {float(c2[:k].sum()):.3f}, overlap(g, Hg) "
          f"{overlap(g, H @ g):.3f}")
    cumulative = torch.cumsum(c2, 0)
    for share in (0.5, 0.9):
        i = int((cumulative < share).sum())
        print(f"  {share:.0%} of |g|^2 within the top {i + 1} eigenvectors "
              f"(lambda_{i + 1} = {float(values[i]):.2e})")
    generator = torch.Generator().manual_seed(0)
    f_top, full_h, own_h = [], [], []
    for _ in range(args.batches):
        idx = torch.randperm(len(Y), generator=generator)[:config.optim.batch_size]
        op_b = ts.HessianOperator(problem.model, problem.loss_fn, (X[idx], Y[idx]),
                                  dtype=torch.float64)
        _, g_b = op_b.loss_and_gradient()
        f_top.append(float(((vectors[:, :k].T @ g_b) ** 2).sum() / (g_b @ g_b)))
        full_h.append(overlap(g_b, H @ g_b))
        own_h.append(overlap(g_b, op_b @ g_b))
    print(f"mini-batch g_B (batch {config.optim.batch_size}, {args.batches} draws): f_top "
          f"{np.mean(f_top):.3f}, overlap(g_B, H g_B) {np.mean(full_h):.3f}, "
          f"overlap(g_B, H_B g_B) {np.mean(own_h):.3f}")


if __name__ == "__main__":
    main()
