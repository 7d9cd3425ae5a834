"""What a data pass costs, and which warm start that makes fastest.

A pass of ``op @ V`` with ``b`` columns costs ``t(b) = c0 + c1 · b`` seconds: ``c0`` once per pass
(for a Hessian: the forward pass and the gradient graph), ``c1`` per column. On a CPU a
column of a block costs 0.6–1.0 of a single product, ``c1/(c0 + c1) ≈ 0.6–1`` (count
products); on a GPU 0.06 (FC) to 0.3 (ResNet-18), ``c1 ≪ c0`` (a 20-column block costs about one
product: count passes). :func:`measure_pass_cost` times a
1-column and a ``b``-column product (at the first warm measurement; its products are counted);
:func:`choose_warm_start` is a pure function of the measured ``(c0, c1)``, so it is testable with
injected costs and decides the same way on any device with the same costs.

The model of each strategy's work, for ``n`` wanted pairs (measured on digits and Fashion-MNIST,
docs/performance.md section 3, "every 2/10 steps, k 10/20"): ``krylov`` spends ``P ≈``
:data:`KRYLOV_PRODUCTS_PER_PAIR` ``· n`` products, one per pass; ``subspace`` spends
:data:`SUBSPACE_PRODUCT_RATIO` ``· P`` products, the first ``n`` in one pass and the rest in
blocks of ``b = ⌈n/4⌉``. So

.. math::  T_{krylov} = P (c_0 + c_1), \\qquad
           T_{subspace} = (1 + (ρP − n)/b)\\, c_0 + ρ P\\, c_1 ,

and ``auto`` picks the smaller. With ``c1 = c0`` (CPU) ``krylov`` wins (n = 10: 50 vs 57.7 c0);
with ``c1 = 0.06 c0`` (GPU, FC) ``subspace`` does (26.5 vs 15.4 c0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["PassCost", "choose_warm_start", "measure_pass_cost", "predicted_times"]

KRYLOV_PRODUCTS_PER_PAIR = 2.5
"""Products of a ``krylov`` warm solve per wanted pair (multiplicity check included): 14–31 for
``n = 10`` and 50–120 for ``n = 20`` at tol 1e-3/1e-4 (docs/performance.md)."""

SUBSPACE_PRODUCT_RATIO = 1.8
"""Products of a ``subspace`` warm solve over a ``krylov`` one at the same tolerance (1.5–2.0
in the same tables, 1.8 and 1.86 at the medians for n = 10 and 20; their passes match
``1 + (S − n)/b``: 7 and 33)."""


@dataclass(frozen=True)
class PassCost:
    """Seconds of a pass of ``b`` columns: ``c0 + c1 · b`` (module docstring)."""

    c0: float
    c1: float

    def seconds(self, passes: float, products: float) -> float:
        """Predicted time of ``passes`` passes with ``products`` products in all."""
        return passes * self.c0 + products * self.c1


def measure_pass_cost(op, block: torch.Tensor, repeat: int = 2) -> PassCost:
    """``(c0, c1)`` from the best of ``repeat`` timings of ``op @ block[:, :1]`` and
    ``op @ block`` (``b ≥ 2`` columns): ``c1 = (t_b − t_1)/(b − 1)``, ``c0 = t_1 − c1``, both
    clamped at 0. Costs ``repeat · (1 + b)`` products. Waits for a CUDA device to finish.

    Raises:
        ValueError: ``block`` is not ``(p, b)`` with ``b ≥ 2``.
    """
    if block.ndim != 2 or block.shape[1] < 2 or block.shape[0] != op.shape[0]:
        raise ValueError(f"block must have shape ({op.shape[0]}, b) with b >= 2 columns to "
                         f"separate c0 from c1, got {tuple(block.shape)}")
    block = block.to(device=op.device, dtype=op.dtype)

    def best(columns: torch.Tensor) -> float:
        times = []
        for _ in range(repeat):
            _sync(op.device)
            start = time.perf_counter()
            op @ columns
            _sync(op.device)
            times.append(time.perf_counter() - start)
        return min(times)

    t1, tb = best(block[:, :1].contiguous()), best(block)
    c1 = max(0.0, (tb - t1) / (block.shape[1] - 1))
    return PassCost(max(0.0, t1 - c1), c1)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def predicted_times(cost: PassCost, n: int) -> dict[str, float]:
    """Predicted seconds of a ``krylov`` and a ``subspace`` warm solve of ``n`` pairs (module
    docstring's model).

    >>> t = predicted_times(PassCost(1.0, 1.0), 10)
    >>> round(t["krylov"], 1), round(t["subspace"], 1)
    (50.0, 57.7)
    """
    products = KRYLOV_PRODUCTS_PER_PAIR * n
    block = max(1, -(-n // 4))
    subspace_products = SUBSPACE_PRODUCT_RATIO * products
    passes = 1 + max(0.0, subspace_products - n) / block
    return {"krylov": cost.seconds(products, products),
            "subspace": cost.seconds(passes, subspace_products)}


def choose_warm_start(cost: PassCost, n: int) -> str:
    """``"krylov"`` or ``"subspace"``, whichever :func:`predicted_times` says is faster for
    ``n`` pairs at ``cost`` (``krylov`` on a tie).

    >>> choose_warm_start(PassCost(1.0, 1.0), 10), choose_warm_start(PassCost(1.0, 0.06), 10)
    ('krylov', 'subspace')

    Raises:
        ValueError: a negative or non-finite cost, or ``n < 1``.
    """
    if not (cost.c0 >= 0 and cost.c1 >= 0 and cost.c0 + cost.c1 < float("inf")):
        raise ValueError(f"pass costs must be finite and non-negative, got c0={cost.c0!r}, "
                         f"c1={cost.c1!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    times = predicted_times(cost, n)
    return "subspace" if times["subspace"] < times["krylov"] else "krylov"
