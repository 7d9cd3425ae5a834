"""A decoder-only transformer (GPT; Radford et al. 2019, after Karpathy's nanoGPT), small enough
to train on two CPU cores in minutes, and its loss: the mean next-token cross-entropy.

For token ids ``x_1 … x_T`` the model returns logits ``z_t ∈ R^V`` for every position ``t`` from
``x_1 … x_t`` only (causal attention), and the loss of a batch of ``B`` sequences is

.. math::  \\ell = \\frac{1}{BT} \\sum_{b=1}^{B} \\sum_{t=1}^{T}
           -\\log \\operatorname{softmax}(z_{b,t})_{y_{b,t}},  \\qquad y_{b,t} = x_{b,t+1},

the mean over tokens (:func:`token_cross_entropy`). Architecture (pre-norm):

``wte`` (token embedding ``V × d``) + ``wpe`` (position embedding ``context_length × d``) →
``n_layer`` blocks ``h.i`` = ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` → ``ln_f`` → ``lm_head``
(``d → V``; by default tied to ``wte``, so ``named_parameters()`` lists ``wte.weight`` once).
``attn`` has separate ``query``, ``key``, ``value`` and ``proj`` linear layers (so that per-block
curvature can tell query/key from value/output) and calls
``F.scaled_dot_product_attention(..., is_causal=True)``; ``mlp`` is ``fc`` (``d → 4d``), GELU,
``proj`` (``4d → d``). Initialisation as in nanoGPT: weights ``N(0, 0.02²)``, the residual
projections ``N(0, 0.02² / (2 n_layer))``, biases 0, layer norms ``(1, 0)``. No dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from tinysubspace.problems.registry import renamed_keyword

__all__ = ["GPT", "build_gpt", "gpt_parameter_count", "token_cross_entropy"]

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over every token position: logits ``(..., V)``, targets ``(...)``
    (targets equal to -100 are left out of the mean, as in PyTorch and Hugging Face).

    Raises:
        ValueError: the shapes do not match.

    >>> logits = torch.zeros(2, 3, 4)  # uniform over V = 4
    >>> round(float(token_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))), 6)
    1.386294
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits (..., V) and targets (...) must agree in their leading "
                         f"dimensions, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    ignore_index=IGNORE_INDEX)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query/key/value/output projections."""

    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd, bias=bias)
        self.key = nn.Linear(n_embd, n_embd, bias=bias)
        self.value = nn.Linear(n_embd, n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = [f(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                 for f in (self.query, self.key, self.value)]
        y = functional.scaled_dot_product_attention(*heads, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``proj(gelu(fc(x)))`` with a hidden width of ``4 d``."""

    def __init__(self, n_embd: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(functional.gelu(self.fc(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token ids ``(B, T)`` (``T ≤ context_length``, the positions it
    has embeddings for; nanoGPT's ``block_size``) → logits ``(B, T, V)`` (module docstring)."""

    def __init__(self, vocab: int, context_length: int, n_layer: int, n_head: int,
                 n_embd: int, bias: bool = True, tie_weights: bool = True) -> None:
        super().__init__()
        self.context_length = context_length
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context_length, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # layer-norm scales
                nn.init.ones_(p)
            else:
                residual = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
                std = 0.02 / math.sqrt(2 * n_layer) if residual else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT expects integer token ids of shape (batch, time), got "
                             f"{idx.dtype} of shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if self.context_length < T:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_gpt(input_shape: tuple[int, ...], num_outputs: int, *, n_layer: int = 2,
              n_head: int = 2, n_embd: int = 32, context_length: int | None = None,
              vocab: int | None = None, bias: bool = True, tie_weights: bool = True,
              block_size: int | None = None) -> GPT:
    """The ``gpt`` of the model registry: inputs ``(T,)`` token ids, ``num_outputs`` = ``V``.

    Args:
        input_shape: ``(T,)``, the data's sequence length.
        num_outputs: the vocabulary size ``V`` of the data.
        n_layer, n_head, n_embd: depth, heads, width (``n_embd`` divisible by ``n_head``).
        context_length: the longest sequence (positions); default ``T``; at least ``T``.
            ``block_size`` is its old name (both: ``TypeError``).
        vocab: the vocabulary size; default ``num_outputs`` (and it must equal it).
        bias: biases in linear and layer-norm layers.
        tie_weights: the output layer shares the token embedding's matrix.

    Raises:
        ValueError: bad sizes (the message says which).
    """
    if len(input_shape) != 1:
        raise ValueError(f"gpt needs token sequences, input_shape (T,), got {input_shape}; use a "
                         "text data set such as pydoc-chars")
    length = renamed_keyword("context_length", context_length, "block_size", block_size)
    length = input_shape[0] if length is None else length
    vocab = num_outputs if vocab is None else vocab
    _check_positive(n_layer=n_layer, n_head=n_head, n_embd=n_embd, context_length=length,
                    vocab=vocab)
    if n_embd % n_head:
        raise ValueError(f"n_embd must be divisible by n_head, got n_embd={n_embd}, "
                         f"n_head={n_head}")
    if length < input_shape[0]:
        raise ValueError(f"context_length {length} is shorter than the data's sequences "
                         f"({input_shape[0]} tokens)")
    if vocab != num_outputs:
        raise ValueError(f"vocab {vocab} differs from the data's vocabulary of {num_outputs}")
    for name, flag in {"bias": bias, "tie_weights": tie_weights}.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    return GPT(vocab, length, n_layer, n_head, n_embd, bias=bias, tie_weights=tie_weights)


def gpt_parameter_count(vocab: int, context_length: int, n_layer: int, n_embd: int,
                        bias: bool = True, tie_weights: bool = True) -> int:
    """Parameters of :class:`GPT` (closed form): ``V d + T d + L (12 d² + 13 d) + 2 d``
    (with biases; ``+ V d`` untied), checked against ``named_parameters()`` in the tests."""
    d = n_embd
    per_layer = 12 * d * d + (13 * d if bias else 2 * d)
    final = 2 * d if bias else d
    return vocab * d * (1 if tie_weights else 2) + context_length * d + n_layer * per_layer + final


def _check_positive(**values: Sequence[int] | int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
