"""Issue 25: finite-difference H·v against exact H·v, low precision, and per-rank basis memory.

Three tables (CPU, one torch and one BLAS thread, every variant interleaved in one process):

1. **Cost and error of a product.** For an MLP (digits FC 64-100-100-10, 512 examples) and the
   project's ``gpt`` (1 layer, width 16, 64 sequences of 8 tokens), in float64 and float32:
   ``loop`` (exact double backward), ``finite_difference`` and ``finite_difference4``. Time per
   product (one vector), that time in gradients (over one ``loss_and_gradient`` of the same
   operator, measured in the same run), the relative error against the float64 ``loop`` product
   of the same weights, and the operator's own estimate ``op.last_product_error``.
2. **bfloat16 without a copy.** The ``gpt`` cast to bfloat16, measured in bfloat16 (float32
   sums, no float32 copy of the model) by both finite-difference methods: product error against
   the float64 product of the same (rounded) weights for a random vector and the top
   eigenvector, and with ``--eigen`` the top-3 eigenvalues and ``f_top`` of ``top_eigenpairs``
   against float64 (untrained and after 300 Adam steps).
3. **Per-rank memory of a Lanczos basis** (23 vectors and their images, float64, an MLP with
   p = 39 434) for 1, 2 and 3 gloo ranks under FSDP2: ``tests/fsdp_workers.memory_worker``
   launched by ``tests/distributed_workers.launch``.

Run: ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/scale.py [--eigen] [--no-ranks]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import tinysubspace as ts
from common import digits_problem, machine_line, print_table, timeit_interleaved
from tinysubspace.problems.models.gpt import GPT

TESTS = Path(__file__).resolve().parents[1] / "tests"
F64 = torch.float64
METHODS = ("loop", "finite_difference", "finite_difference4")


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, the softmax in float32 at least (as Hugging Face does)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))


def gpt_problem(train_steps: int = 0, seed: int = 0) -> tuple[torch.nn.Module, tuple]:
    """The ``gpt`` (V = 16, T = 8, 1 layer, width 16, p = 3 696) on 64 sequences whose odd
    tokens follow from the even ones (something to learn), after ``train_steps`` Adam steps."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(16, 8, n_layer=1, n_head=2, n_embd=16)
    tokens = torch.randint(0, 16, (64, 9), generator=gen)
    tokens[:, 1::2] = (tokens[:, 0::2][:, :4] * 3 + 1) % 16
    X, Y = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        optimizer.zero_grad()
        token_loss(model(X), Y).backward()
        optimizer.step()
    return model, (X, Y)


def mlp_problem() -> tuple[torch.nn.Module, tuple, object]:
    problem = digits_problem()
    return problem.model, (problem.X[:512], problem.Y[:512]), problem.loss_fn


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def product_table() -> None:
    rows = []
    gpt, gpt_data = gpt_problem()
    cases = {"MLP 64-100-100-10": mlp_problem(), "gpt p=3696": (gpt, gpt_data, token_loss)}
    for name, (model, data, loss_fn) in cases.items():
        reference = ts.HessianOperator(model, loss_fn, data, dtype=F64, hvp_method="loop")
        v = torch.randn(reference.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
        exact = reference @ v
        for dtype in (F64, torch.float32):
            ops = {m: ts.HessianOperator(model, loss_fn, data, dtype=dtype, hvp_method=m,
                                         graph_memory=0) for m in METHODS}
            vd = v.to(dtype)
            fns = {m: (lambda op=op, vd=vd: op @ vd) for m, op in ops.items()}
            fns["gradient"] = lambda op=ops["loop"]: op.loss_and_gradient()
            best = timeit_interleaved(fns, repeat=3)
            for m, op in ops.items():
                product = op @ vd
                rows.append([name, str(dtype).removeprefix("torch."), m,
                             1e3 * best[m], best[m] / best["gradient"],
                             relative(product, exact), op.last_product_error])
    print_table("H·v: finite differences against exact (one vector; time in gradients of the "
                "same operator)", ["model", "dtype", "method", "ms / product", "gradients",
                                   "rel. error vs float64", "own estimate"], rows)


def bf16_gpt(steps: int) -> tuple[torch.nn.Module, tuple, ts.HessianOperator]:
    """The ``gpt`` after ``steps`` Adam steps, cast to bfloat16, its data, and the exact float64
    Hessian of those same bfloat16 weights (the reference of both bf16 tables)."""
    model, data = gpt_problem(steps)
    half = model.to(torch.bfloat16)
    return half, data, ts.HessianOperator(half, token_loss, data, dtype=F64, hvp_method="loop")


def bf16_product_table() -> None:
    rows = []
    for steps in (0, 300):
        half, data, reference = bf16_gpt(steps)
        top = ts.top_eigenpairs(reference, k=1, tol=1e-8).vectors[:, 0]
        random = torch.randn(top.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
        for method in METHODS[1:]:
            op = ts.HessianOperator(half, token_loss, data, hvp_method=method)
            for vname, v in {"random": random / random.norm(), "top eigenvector": top}.items():
                product = op @ v.to(torch.bfloat16)
                rows.append([steps, method, vname, relative(product, reference @ v),
                             op.last_product_error, op.product_error])
    print_table("bfloat16 gpt measured in bfloat16 (no float32 copy): product error against the "
                "float64 product of the same weights", ["Adam steps", "method", "vector",
                                                       "rel. error", "own estimate",
                                                       "op.product_error"], rows)


def bf16_eigen_table() -> None:
    rows = []
    for steps in (0, 300):
        half, data, reference = bf16_gpt(steps)
        _, g = reference.loss_and_gradient()
        exact = ts.top_eigenpairs(reference, k=3, tol=1e-8)
        f_exact = float(ts.top_fraction(g, exact.vectors))
        for method in METHODS[1:]:
            op = ts.HessianOperator(half, token_loss, data, hvp_method=method)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eig = ts.top_eigenpairs(op, k=3, tol=0.05, max_matvecs=150)
            V = torch.linalg.qr(eig.vectors.double())[0]
            f_top = float(ts.top_fraction(op.loss_and_gradient()[1].double(), V))
            errors = (eig.values.double() - exact.values).abs() / exact.values.abs()
            rows.append([steps, method, f"{float(exact.values[0]):.3g}",
                         float(errors.max()), f_exact, abs(f_top - f_exact) / f_exact,
                         eig.converged, eig.matvecs, len(caught)])
    print_table("bfloat16 gpt: top-3 eigenvalues and f_top of top_eigenpairs(k=3, tol=0.05) "
                "against float64", ["Adam steps", "method", "λ1", "max rel. error λ1..3",
                                    "f_top (float64)", "f_top rel. error", "converged",
                                    "products", "warnings"], rows)


def memory_table() -> None:
    sys.path.insert(0, str(TESTS))
    import fsdp_workers
    from distributed_workers import launch

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for world in (1, 2, 3):
            results = launch(fsdp_workers.memory_worker, Path(folder) / str(world), world=world,
                             deadline_s=300.0)
            per_rank = [r["ok"] for r in results]
            rows.append([world, per_rank[0]["p"], ", ".join(str(r["rows"]) for r in per_rank),
                         ", ".join(str(r["bytes"]) for r in per_rank),
                         max(r["bytes"] for r in per_rank) / per_rank[0]["p"] / 8 / 46])
    print_table("Per-rank memory of a Lanczos basis under FSDP2 (23 vectors + images, float64)",
                ["world", "p", "rows per rank", "basis bytes per rank",
                 "largest rank / full p"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eigen", action="store_true", help="also the bf16 eigenvalue table")
    parser.add_argument("--no-ranks", action="store_true", help="skip the multi-rank table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    product_table()
    bf16_product_table()
    if args.eigen:
        bf16_eigen_table()
    if not args.no_ranks:
        memory_table()


if __name__ == "__main__":
    main()
