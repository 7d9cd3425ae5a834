"""Peak memory of one exact H·v of a character-level GPT, against the chunk size (issue 14).

The Hessian operator runs the data through the model in chunks of ``chunk_size`` sequences
(``tracker.chunk_size``); one chunk's graph — its ``b × T × V`` logits and the activations,
built with ``create_graph`` for double backprop — is what a product needs. With
``graph_memory=0`` (no graphs kept between products) the peak memory of an H·v is therefore
bounded by the chunk, not by the data set; by default the operator also keeps chunks' graphs
for later products, up to its ``graph_memory`` budget (25% of free memory). This script measures
the extra resident memory (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
of one product for several chunk sizes over a fixed data set, each in a fresh process after a
warm-up product on one sequence (which loads what PyTorch loads lazily, ~300 MiB).

Run: ``python benchmarks/transformer_memory.py [--vocab-scale 1]`` (about a minute on one core).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
import tinysubspace as ts
from tinysubspace.problems.models.gpt import token_cross_entropy
cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
data = ts.load_dataset("pydoc-chars", context_length=cfg["T"], max_chars=cfg["n"] * cfg["T"] + 1)
model = ts.build_model("gpt", (cfg["T"],), data.num_outputs, n_layer=cfg["L"], n_embd=cfg["d"])
op = ts.HessianOperator(model, token_cross_entropy, data.tensors,
                        dtype=getattr(torch, cfg["dtype"]), chunk_size=cfg["chunk"],
                        hvp_method=cfg["method"], graph_memory=cfg["graph_memory"])
v = torch.randn(op.shape[0], cfg["columns"], generator=torch.Generator().manual_seed(0),
                dtype=op.dtype).squeeze(1)
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
warm = ts.HessianOperator(model, token_cross_entropy, (data.inputs[:1], data.targets[:1]),
                          dtype=op.dtype, hvp_method=cfg["method"], graph_memory=0)
warm @ torch.zeros(op.shape[0], cfg["columns"], dtype=op.dtype).squeeze(1)  # lazy imports, pools
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
op @ v
print(json.dumps({"extra_mib": (rss("VmHWM:") - before) / 1024, "p": op.shape[0],
                  "V": data.num_outputs, "kept_mib": op.retained_graph_bytes / 2**20}))
"""


def measure(config: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256, help="sequences in the data set")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args()
    print(f"GPT n_layer=2 n_embd=32, T=32, {args.sequences} sequences, {args.dtype}")
    print(f"{'method':8} {'cols':>4} {'kept':>5} {'chunk':>6} {'tokens/chunk':>12} "
          f"{'logits MiB':>10} {'peak extra MiB':>14} {'kept graphs MiB':>15}")
    cases = [("loop", 1, 0), ("batched", 8, 0), ("jvp", 8, 0), ("loop", 1, 0.25)]
    for method, columns, graph_memory in cases:
        for chunk in (16, 64, 256):
            config = {"T": 32, "n": args.sequences, "L": 2, "d": 32, "chunk": chunk,
                      "method": method, "columns": columns, "dtype": args.dtype,
                      "graph_memory": graph_memory}
            result = measure(config)
            logits = chunk * 32 * result["V"] * (8 if args.dtype == "float64" else 4) / 2**20
            print(f"{method:8} {columns:>4} {graph_memory:>5} {chunk:>6} {chunk * 32:>12} "
                  f"{logits:>10.2f} {result['extra_mib']:>14.1f} {result['kept_mib']:>15.1f}")


if __name__ == "__main__":
    main()
