"""Issue 14 on a GPU: a character-level GPT of a few million parameters, float32 (TF32 off).

The model is the registry's ``gpt`` (default 6 layers, width 256, 8 heads, 128-token context:
4.8M parameters with the pydoc-chars vocabulary) on ``--sequences`` sequences of CPython's pydoc
topics. Measured in one run, each table printed as it comes (markdown, for docs/performance.md):

1. gradient, single H·v and 8-column block per-vector time for every ``hvp_method`` (attention by
   its math kernel inside the operator; ``benchmarks/gpu.py``'s table);
2. block cost per vector: one product of each diagonal block ``H_bb`` (``blocks="types"``:
   embeddings, query/key, value/output, MLP, norms), against a full H·v and the gradient, each
   a full pass (no graphs kept: table 1's ``grad`` column comes from a kept graph, so its ratios
   to ``grad`` are not those of a cold pass);
3. the tracking table of ``benchmarks/tracking.py`` (cold scipy eigsh, cold top_eigenpairs, warm
   track_eigenpairs) for k = 10, tol 1e-3, between SGD steps.

New work stops starting once ``--budget`` seconds have passed. Run through ``bash
benchmarks/gpu.sh`` (after the GPU tests and the ResNet tables), or ``python
benchmarks/gpu_gpt.py --quick`` on a CPU as a smoke test (a 2-layer, width-16 GPT).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import Problem, exact_device, machine_line, print_table, timeit_interleaved
from gpu import hvp_table
from tinysubspace import HessianOperator, load_dataset
from tinysubspace.problems.block_curvature import block_operator
from tinysubspace.problems.models.blocks import parameter_blocks
from tinysubspace.problems.models.gpt import token_cross_entropy
from tinysubspace.problems.models.networks import build_model
from tracking import run


def gpt_problem(sequences: int, T: int, layers: int, width: int, heads: int,
                device: str) -> Problem:
    """``sequences`` pydoc-chars sequences of ``T`` tokens (and their next tokens), a GPT."""
    data = load_dataset("pydoc-chars", context_length=T, max_chars=sequences * T + 1)
    model = build_model("gpt", (T,), data.num_outputs, n_layer=layers, n_embd=width,
                        n_head=heads)
    p = sum(q.numel() for q in model.parameters())
    name = (f"GPT {layers}x{width} ({heads} heads, p = {p / 1e6:.2f}M), pydoc-chars "
            f"{data.inputs.shape[0]}x{T} tokens, V = {data.num_outputs}")
    return Problem(name, model, token_cross_entropy, data.inputs, data.targets).to(device)


def block_table(problem: Problem, chunk: int, repeat: int) -> None:
    """Per-vector time of one ``H_bb v`` for each ``types`` block, next to ``H v`` and ``g``,
    every product and the gradient a full pass over the data (``graph_memory=0``: no graphs
    kept between calls, unlike table 1 where the operator's default keeps them)."""
    device = torch.device(problem.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    data = (problem.X, problem.Y)
    settings = {"chunk_size": chunk, "device": device, "graph_memory": 0}  # a pass each time
    full = HessianOperator(problem.model, problem.loss_fn, data, **settings)
    ops = {"full": full}
    for name, parts in parameter_blocks(problem.model, "types").items():
        ops[name] = block_operator(problem.model, problem.loss_fn, data, parts, **settings)
    gen = torch.Generator().manual_seed(0)
    vectors = {name: torch.randn(op.shape[0], generator=gen).to(device, op.dtype)
               for name, op in ops.items()}
    fns = {"grad": full.loss_and_gradient}
    fns.update({name: (lambda op=op, v=vectors[name]: op @ v) for name, op in ops.items()})
    best = timeit_interleaved(fns, repeat=repeat, sync=sync)
    rows = [[name, op.shape[0], 1e3 * best[name], best[name] / best["full"],
             best[name] / best["grad"]] for name, op in ops.items()]
    print_table(f"{problem.name}: diagonal blocks H_bb v, chunk {chunk}, no kept graphs "
                f"({machine_line()})",
                ["block", "size", "ms / vector", "/ full H·v", "/ grad"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64, help="sequences per pass")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    args = parser.parse_args()
    start = time.perf_counter()
    device = exact_device()
    shape = (2, 16, 2, 32) if args.quick else (6, 256, 8, 128)  # layers, width, heads, T
    sequences, chunk, repeat = (16, 8, 1) if args.quick else (args.sequences, args.chunk, 2)
    print(machine_line(), flush=True)
    layers, width, heads, T = shape
    problem = gpt_problem(sequences, T, layers, width, heads, device)
    method, single = hvp_table(problem, chunk, 8, repeat)
    HessianOperator.hvp_method = method  # the tables below use the fastest exact method
    print(f"H·v method for the tables below: {method} ({time.perf_counter() - start:.0f} s so far)",
          flush=True)
    block_table(problem, chunk, repeat)
    estimate = 2 * 4 * 50 * single  # two measurements, four solves of about 50 products each
    if time.perf_counter() + estimate > start + args.budget and not args.quick:
        print(f"skipped the tracking table: two measurements need about {estimate:.0f} s")
        return
    run(problem, 10, 1e-3, start=20, every=2, count=3, chunk=chunk, repeat=1,
        deadline=start + args.budget)
    print(f"({time.perf_counter() - start:.0f} s so far)", flush=True)


if __name__ == "__main__":
    main()
