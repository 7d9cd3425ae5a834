"""Issue 24 items 2 and 4 on a tiny GPT-2 built from a config (nothing downloaded).

1. The per-sequence against the per-token empirical Fisher (``examples=``): λ₁ of each, float64.
2. The model's own ``outputs.loss`` (computed in float32 by Hugging Face) against
   ``ts.causal_lm_loss`` when measuring in float64: relative differences of loss, gradient, H·v.

Model: GPT-2, 2 layers, width 16, 2 heads, V = 50; data: 16 random sequences of 32 tokens, every
third padded (-100) from position 20; four batches of 4 with ``Batch(size=tokens)``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/fisher_tokens.py`` (about a minute).
"""

from __future__ import annotations

import warnings

import torch
import transformers
from torch.nn import functional

import tinysubspace as ts
from tinysubspace.curvature.data import Batch, count_tokens
from tinysubspace.integrations.transformers import model_loss

F64 = torch.float64


class ShiftedLogits(torch.nn.Module):
    """The logits of positions 0 … T−2 (those that predict a next token)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[:, :-1]


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2,
                                     n_head=2, attn_implementation="eager", bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(50, (16, 32), generator=gen)
    labels = ids.clone()
    labels[::3, 20:] = -100
    targets = labels[:, 1:]
    data = [Batch(ids[i:i + 4], targets[i:i + 4], count_tokens(targets[i:i + 4]))
            for i in range(0, 16, 4)]
    top = {}
    for examples in ("token", "sequence"):
        op = ts.FisherOperator(ShiftedLogits(model), token_ce, data, examples=examples,
                               dtype=F64)
        top[examples] = float(ts.top_eigenpairs(op, k=1, tol=1e-6, seed=0).values[0])
    print(f"empirical Fisher λ1: token {top['token']:.4g}, sequence {top['sequence']:.4g}, "
          f"sequence/token {top['sequence'] / top['token']:.3f}")
    batches = [Batch({"input_ids": ids[i:i + 4], "labels": labels[i:i + 4]}, labels[i:i + 4],
                     count_tokens(labels[i:i + 4], shift=True)) for i in range(0, 16, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        own = ts.HessianOperator(model, model_loss, batches, dtype=F64)
        loss_own, g_own = own.loss_and_gradient()
        v = torch.randn(own.shape[0], generator=gen, dtype=F64)
        hv_own = own @ v
    ours = ts.HessianOperator(model, ts.causal_lm_loss, batches, dtype=F64)
    loss, g = ours.loss_and_gradient()
    hv = ours @ v
    gap_g, gap_hv = float((g_own - g).norm() / g.norm()), float((hv_own - hv).norm() / hv.norm())
    print(f"own loss vs causal_lm_loss in float64 (relative): loss "
          f"{abs(loss_own - loss) / abs(loss):.2e}, gradient {gap_g:.2e}, H·v {gap_hv:.2e}")


if __name__ == "__main__":
    main()
