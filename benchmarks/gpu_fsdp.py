"""Issue 25 on a GPU: a GPT-2-small-sized model under FSDP2 on one device, measured in bfloat16.

A Hugging Face GPT-2 built from its config (12 layers, width 768, 12 heads, 50 257 tokens,
p = 124M; no download), cast to bfloat16, each block and the whole model wrapped with
``fully_shard`` on a one-rank NCCL mesh, on ``--sequences`` random sequences of ``--tokens``
tokens. ``ts.HessianOperator`` returns the sharded operator (finite differences of ordinary
gradients in bfloat16, no float32 copy); ``top_eigenpairs(k, tol=0.1)`` prints the top-k
eigenvalues, products, seconds, the operator's error estimate and the peak GPU memory, against
the memory of the bf16 parameters themselves.

Run through ``bash benchmarks/gpu.sh`` (its last section) or ``python benchmarks/gpu_fsdp.py``;
without a GPU it says so and exits 0 (never required by the tests). ``--smoke``: the same code
on the CPU (gloo) with a 2-layer, width-32 GPT-2, to check the script where no GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch

from common import machine_line, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-matvecs", type=int, default=60)
    parser.add_argument("--method", default="finite_difference")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 on the CPU (gloo)")
    args = parser.parse_args()
    device, backend = ("cpu", "gloo") if args.smoke else ("cuda", "nccl")
    if args.smoke:
        args.sequences, args.tokens = min(args.sequences, 4), min(args.tokens, 16)
    elif not torch.cuda.is_available():
        print("gpu_fsdp: no CUDA device, skipped")
        return
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import tinysubspace as ts
    from tinysubspace.curvature.losses import causal_lm_loss

    store = os.path.join(tempfile.mkdtemp(), "store")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    print(machine_line())
    size = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64) if args.smoke else dict(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    config = transformers.GPT2Config(**size, n_positions=1024, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device=device, dtype=torch.bfloat16)
    model.eval()
    p = sum(q.numel() for q in model.parameters())
    mesh = init_device_mesh(device, (1,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.tokens),
                        generator=gen).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    op = ts.HessianOperator(model, causal_lm_loss, (ids, ids.clone()), hvp_method=args.method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eig = ts.top_eigenpairs(op, k=args.k, tol=0.1, max_matvecs=args.max_matvecs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    name = f"GPT-2 {'smoke' if args.smoke else 'small'} p={p / 1e6:.1f}M"
    rows = [[name, "bf16", args.method, args.k,
             ", ".join(f"{v:.4g}" for v in eig.values.float().tolist()), eig.matvecs,
             eig.converged, seconds, seconds / max(eig.matvecs, 1), op.last_product_error,
             p * 2 / 2**30, peak]]
    print_table(f"FSDP2 on one {device} (world 1, {backend}), "
                f"{args.sequences}x{args.tokens} tokens, "
                f"top_eigenpairs(k={args.k}, tol=0.1)",
                ["model", "dtype", "method", "k", "eigenvalues", "products", "converged", "s",
                 "s / product", "error estimate", "bf16 params GiB", "peak GiB"], rows)
    for warning in caught:
        print(f"  {warning.category.__name__}: {str(warning.message)[:300]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
