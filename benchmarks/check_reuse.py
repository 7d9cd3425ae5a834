"""Issue 18: can the multiplicity check's products also build the answer?

The check (:mod:`tinysubspace.linalg.deflation`) spends ``CHECK_STEPS = 8`` products on Lanczos
on ``(I − VVᵀ) H (I − VVᵀ)`` after the solve has converged; if nothing is found they are spent
for the guarantee alone. The lever measured here: stop the main solve *before* it converges, run
the check from there, and take the answer from one Rayleigh–Ritz on the union of the main Krylov
basis and the check's basis (their images are stored, so this costs no product). If the union
converges ``d`` products earlier than the main basis alone, the check costs ``8 − d``.

For each measurement of an SGD trajectory (digits FC 64-100-100-10, float64, kept graphs) and
each start (cold: random; warm: the previous measurement's top ``n`` summed plus a ``10⁻²``
random part, as ``track_eigenpairs(warm="krylov")``):

* ``j0``: the fewest Lanczos products (full reorthogonalisation) whose Ritz pairs all satisfy
  ``‖r_i‖ ≤ tol·θ_1``; today's cost is ``j0 + 8``;
* ``union, random``: the fewest ``j`` such that Rayleigh–Ritz on ``[Q_j, W_8]`` (``W_8`` the
  check's basis from a fresh random start, deflated against the Ritz vectors of ``Q_j``)
  satisfies the same test; cost ``j + 8``;
* ``union, f + r``: the same with the check started from the main solve's next Lanczos
  direction plus a random vector (so its space continues the main Krylov space and still has a
  random part for the guarantee).

Products only (no timing): the counts do not depend on the machine's load.

Run: ``OMP_NUM_THREADS=1 python benchmarks/check_reuse.py [--n 10 20] [--count 5]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import digits_problem, machine_line, print_table
from tinysubspace import HessianOperator
from tracking import trajectory

CHECK = 8


def lanczos(op, start: torch.Tensor, steps: int, deflate: torch.Tensor | None = None):
    """``steps`` Lanczos products from ``start`` (full reorthogonalisation, optionally on
    ``(I − VVᵀ) H (I − VVᵀ)``): the basis ``(p, steps)`` and its images ``H Q``."""
    Q, HQ = [], []
    q = start / start.norm()
    for _ in range(steps):
        w = (op @ q[:, None])[:, 0]
        Q.append(q)
        HQ.append(w)
        basis, f = torch.stack(Q, 1), w
        for _ in range(2):
            if deflate is not None:
                f = f - deflate @ (deflate.T @ f)
            f = f - basis @ (basis.T @ f)
        q = f / f.norm()
    return torch.stack(Q, 1), torch.stack(HQ, 1)


def rayleigh_ritz(Z: torch.Tensor, HZ: torch.Tensor, n: int):
    """Top ``n`` Ritz values, vectors and exact residual norms on ``span(Z)`` (orthonormal)."""
    B = Z.T @ HZ
    theta, Y = torch.linalg.eigh((B + B.T) / 2)
    theta, Y = theta.flip(0)[:n], Y.flip(1)[:, :n]
    V = Z @ Y
    return theta, V, (HZ @ Y - V * theta).norm(dim=0)


def converged(theta: torch.Tensor, residuals: torch.Tensor, tol: float) -> bool:
    return bool((residuals <= tol * theta.abs().max()).all())


def union(Q, HQ, W, HW):
    """``[Q, W']`` orthonormal with ``W'`` spanning ``W`` minus ``span(Q)``, and its images."""
    C = Q.T @ W
    W, HW = W - Q @ C, HW - HQ @ C
    R_inv = torch.linalg.inv(torch.linalg.qr(W).R)
    return torch.cat([Q, W @ R_inv], 1), torch.cat([HQ, HW @ R_inv], 1)


def first_converged(Q, HQ, n: int, tol: float) -> int:
    for j in range(n, Q.shape[1] + 1):
        theta, _, res = rayleigh_ritz(Q[:, :j], HQ[:, :j], n)
        if converged(theta, res, tol):
            return j
    raise RuntimeError("not converged within the basis: raise --basis")


def with_union(op, Q, HQ, n: int, tol: float, j0: int, mode: str, gen) -> int:
    """The cost ``j + CHECK`` of the earliest ``j ≤ j0`` whose union with the check converges."""
    for j in range(n, j0 + 1):
        theta, V, _ = rayleigh_ritz(Q[:, :j], HQ[:, :j], n)
        start = torch.randn(Q.shape[0], generator=gen, dtype=Q.dtype)
        start = start - V @ (V.T @ start)
        start = start / start.norm()
        if mode == "f + r":
            f = HQ[:, j - 1] - Q[:, :j] @ (Q[:, :j].T @ HQ[:, j - 1])
            start = start + f / f.norm()
        W, HW = lanczos(op, start, CHECK, deflate=V)
        Z, HZ = union(Q[:, :j], HQ[:, :j], W, HW)
        theta, _, res = rayleigh_ritz(Z, HZ, n)
        if converged(theta, res, tol):
            return j + CHECK
    return j0 + CHECK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="*", default=[10, 20])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--basis", type=int, default=160)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line(), flush=True)
    problem = digits_problem()
    states = trajectory(problem, 100, args.every, args.count)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in args.n:
        previous, costs = None, {}
        for index, state in enumerate(states):
            problem.model.load_state_dict(state)
            op = HessianOperator(problem.model, problem.loss_fn, (problem.X, problem.Y),
                                 dtype=torch.float64)
            p = op.shape[0]
            starts = {"cold": torch.randn(p, generator=gen, dtype=torch.float64)}
            if previous is not None:
                noise = torch.randn(p, generator=gen, dtype=torch.float64)
                summed = previous.sum(1) / previous.sum(1).norm()
                starts["warm"] = summed + 1e-2 * noise / noise.norm()
            for kind, start in starts.items():
                Q, HQ = lanczos(op, start, args.basis)
                j0 = first_converged(Q, HQ, n, args.tol)
                counts = {"check after convergence (today)": j0 + CHECK}
                for mode in ("random", "f + r"):
                    counts[f"union, {mode}"] = with_union(op, Q, HQ, n, args.tol, j0, mode, gen)
                for name, count in counts.items():
                    costs.setdefault((kind, name), []).append(count)
                print(f"  n={n} measurement {index} {kind}: {counts}", flush=True)
                if kind == "cold":
                    previous = rayleigh_ritz(Q[:, :j0], HQ[:, :j0], n)[1]
        for (kind, name), counts in costs.items():
            base = costs[(kind, "check after convergence (today)")]
            ratio = statistics.median([c / b for c, b in zip(counts, base, strict=True)])
            rows.append([n, kind, name, statistics.median(counts),
                         f"{min(counts)}–{max(counts)}", f"{ratio:.3f}"])
    print_table(f"products per solve, digits, float64, tol {args.tol:g}, {args.count} "
                f"measurements {args.every} SGD steps apart (warm: from measurement 1)",
                ["n", "start", "check", "products (median)", "range", "/ today (median)"], rows)


if __name__ == "__main__":
    main()
