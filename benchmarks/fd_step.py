"""Issue 25: the finite-difference step, a-priori against calibrated, and the measured estimate.

For the project's ``gpt`` (V = 8, T = 6, 1 layer, width 8, p = 1,000, 48 sequences) and an
8-16-4 MLP with LayerNorm and tanh (p = 244, 64 examples), untrained and after 300 Adam steps, in
float64 and float32: the relative error of one product along each of the top-3 eigenvectors
(largest printed) and a random vector, against the exact ``loop`` product of the same weights,
for the 2- and 4-point forms with the a-priori step ``h0 = eps^(1/3) max(‖θ‖, 1) / ‖v‖`` (the
calibration skipped) and with the calibrated one; and ``op.product_error`` after those products
(the estimate a solver stops at). Run: ``OMP_NUM_THREADS=1 python benchmarks/fd_step.py``.
"""

from __future__ import annotations

import warnings

import torch

import tinysubspace as ts
from common import machine_line, print_table
from tinysubspace.curvature.attention import exact_attention
from tinysubspace.curvature.finite_difference import FiniteDifference
from tinysubspace.problems.models.gpt import GPT


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))


def build(name: str, dtype: torch.dtype, steps: int) -> tuple:
    """``(model, loss_fn, data)`` of ``name`` after ``steps`` Adam steps."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "gpt":
            model = GPT(8, 6, n_layer=1, n_head=2, n_embd=8).to(dtype)
            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, 8, (48, 7), generator=gen)
            tokens[:, 1::2] = (3 * tokens[:, 0::2][:, :3] + 1) % 8
            data, loss_fn = (tokens[:, :-1], tokens[:, 1:]), _token_loss
        else:
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                        torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
            data = (torch.randn(64, 8, dtype=dtype), torch.randint(0, 4, (64,)))
            loss_fn = torch.nn.functional.cross_entropy
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        optimizer.step()
    return model, loss_fn, data


def errors(model, loss_fn, data, method: str, calibrated: bool, vectors: list) -> tuple:
    """``(largest top-3 error, random-vector error, op.product_error)``."""
    op = ts.HessianOperator(model, loss_fn, data, hvp_method=method)
    if not calibrated:
        op.hvp_strategy().kappa = FiniteDifference.a_priori_kappa(op.dtype)
    found = [float((op @ v).sub(exact).norm() / exact.norm()) for v, exact in vectors]
    return max(found[:3]), found[3], op.product_error


def main() -> None:
    torch.set_num_threads(1)
    print(machine_line())
    rows = []
    for name in ("gpt", "mlp"):
        for steps in (0, 300):
            for dtype in (torch.float64, torch.float32):
                model, loss_fn, data = build(name, dtype, steps)
                with exact_attention(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    exact = ts.HessianOperator(model, loss_fn, data, hvp_method="loop")
                    eig = ts.top_eigenpairs(exact, k=3, tol=1e-8, seed=0)
                    gen = torch.Generator().manual_seed(0)
                    random = torch.randn(exact.shape[0], generator=gen, dtype=dtype)
                    vs = [eig.vectors[:, i] for i in range(3)] + [random]
                    vectors = [(v, exact @ v) for v in vs]
                    row = [f"{name} (p = {exact.shape[0]}), {steps} Adam steps",
                           str(dtype).replace("torch.", "")]
                    for method in ("finite_difference", "finite_difference4"):
                        for calibrated in (False, True):
                            top, rand, estimate = errors(model, loss_fn, data, method,
                                                         calibrated, vectors)
                            row += [f"{top:.1e}", f"{rand:.1e}"]
                            if calibrated:
                                row.append(f"{estimate:.1e}")
                rows.append(row)
                print(" | ".join(row), flush=True)
    print_table("Finite-difference step: a-priori h0 against calibrated (relative errors)",
                ["model", "dtype", "2pt h0 top", "2pt h0 random", "2pt top", "2pt random",
                 "2pt estimate", "4pt h0 top", "4pt h0 random", "4pt top", "4pt random",
                 "4pt estimate"], rows)


if __name__ == "__main__":
    main()
