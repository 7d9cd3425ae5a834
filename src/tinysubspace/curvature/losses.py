"""Losses computed in the measurement's dtype: the next-token cross-entropy of a causal LM.

A Hugging Face causal LM computes its own ``outputs.loss`` after ``logits.float()``: float32,
even when the operator measures in float64 (``dtype=torch.float64``), so the loss, the gradient
and every H·v are then only float32-accurate (1e-8 to 6e-8 relative on a GPT-2, issue 24).
:func:`causal_lm_loss` is the same mean next-token cross-entropy computed from the logits in
their own dtype (at least float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "logits_of"]

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: a tensor, ``outputs["logits"]`` or ``outputs.logits``.

    Raises:
        TypeError: no logits tensor found.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(
        outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"expected logits: a tensor (..., T, V) or model outputs with a "
                        f"'logits' tensor, got {type(outputs).__name__}")
    return logits


def causal_lm_loss(outputs: Any, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy, as a Hugging Face causal LM's own loss, in the logits'
    dtype (float64 stays float64; half precision is computed in float32, as Hugging Face does):

    .. math::  \\ell = \\frac{1}{m} \\sum_{b, t:\\, y_{b,t+1} \\ne \\text{ignore}}
               -\\log \\mathrm{softmax}(z_{b,t})_{y_{b,t+1}}, \\qquad
               m = \\#\\{(b, t): y_{b,t+1} \\ne \\text{ignore}\\}

    (position ``t`` predicts label ``t + 1``; the first label of each row is never a target:
    ``count_tokens(labels, shift=True)`` is ``m``, the size hook for a token mean).

    Args:
        outputs: logits ``(B, T, V)`` or model outputs holding them (``outputs.logits``).
        labels: ``(B, T)`` token ids, ``ignore_index`` at padding.
        ignore_index: the padding label (-100).

    Raises:
        ValueError: ``labels`` not of shape ``(B, T)`` for logits ``(B, T, V)``.

    >>> z = torch.zeros(1, 3, 4, dtype=torch.float64)  # uniform over V = 4
    >>> loss = causal_lm_loss(z, torch.tensor([[1, 2, -100]]))
    >>> round(float(loss), 6), loss.dtype
    (1.386294, torch.float64)
    """
    logits = logits_of(outputs)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:-1]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the logits' leading shape {tuple(logits.shape[:-1])} "
                         f"(logits {tuple(logits.shape)}), got {shape}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shifted = logits[..., :-1, :].to(dtype)
    targets = labels[..., 1:].to(logits.device)
    return functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                    ignore_index=ignore_index)
