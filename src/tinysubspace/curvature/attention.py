"""Attention that second-order autodiff can go through: the composite ("math") kernel of
``F.scaled_dot_product_attention`` around every forward the operators run.

PyTorch's fused attention kernels (flash attention on CPU and CUDA, memory-efficient attention,
cuDNN) have a first derivative but no derivative of that derivative, and no forward-mode
derivative: ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` and every model calling
``F.scaled_dot_product_attention`` fail in double backprop ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented") and in
``torch.func.jvp``. The math backend computes the same function,

.. math::  \\operatorname{attn}(Q, K, V) = \\operatorname{softmax}\\Big(\\frac{Q K^\\top}
           {\\sqrt{d}} + M\\Big) V

(``M`` the causal or additive mask), from ordinary differentiable operations, so
``∇²ℓ · v`` through it is exact to rounding in every H·V method. :func:`exact_attention` selects
it for the duration of a block and then restores the caller's backend flags (and their priority
order) as they were, also when the block raises.

The switch is process-wide (PyTorch keeps these flags globally, not per thread), as with
``torch.nn.attention.sdpa_kernel`` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["attention_backends", "exact_attention"]


def attention_backends() -> tuple[str, ...]:
    """The ``scaled_dot_product_attention`` backends enabled right now, in a fixed order
    (``flash``, ``mem_efficient``, ``cudnn``, ``math``; the flags are the same on CPU and CUDA)."""
    cuda = torch.backends.cuda
    flags = {"flash": cuda.flash_sdp_enabled, "mem_efficient": cuda.mem_efficient_sdp_enabled,
             "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: False),
             "math": cuda.math_sdp_enabled}
    return tuple(name for name, enabled in flags.items() if enabled())


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` by its math kernel inside the block (double backward
    and forward-mode AD work through it); restore the caller's backends on exit.

    >>> import torch.nn.functional as F
    >>> q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    >>> before = attention_backends()
    >>> with exact_attention():
    ...     out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    ...     (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    >>> torch.autograd.grad(g.sum(), q)[0].shape, attention_backends() == before
    (torch.Size([1, 2, 3, 4]), True)
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                            enable_mem_efficient=False):
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
