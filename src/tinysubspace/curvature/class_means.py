"""Class means of per-example gradients (Papyan 2019, 2020): a cheap model of the top subspace.

For softmax cross-entropy with ``C`` classes write ``δ_{i,c'} = ∇_θ ℓ(x_i, c')``, the gradient
example ``i`` would have if its label were ``c'``. The GGN (= the Fisher) is exactly

.. math::  G = \\frac1N \\sum_i \\sum_{c'} p_{i c'}\\, \\delta_{i,c'} \\delta_{i,c'}^T .

Papyan (2019) finds its ``C`` outliers (and those of ``H``) in the class means
``δ_{c,c'} = mean_{i ∈ class c} δ_{i,c'}`` (the ``C(C − 1)`` cross-class means make a
"mini-bulk"), and approximates the top subspace by the top eigenvectors of

.. math::  M = \\sum_{c, c'} w_{c c'}\\, \\delta_{c,c'} \\delta_{c,c'}^T, \\qquad
           w_{c c'} = \\frac1N \\sum_{i \\in c} p_{i c'},

``G`` with each ``δ_{i,c'}`` replaced by its class mean: a rank-``C²`` matrix, so its top
subspace costs an SVD of ``p × C²`` (no Lanczos). The true-label means ``δ_{c,c}`` alone span a
``C``-dimensional subspace that always contains the full gradient
(``g = Σ_c (N_c/N) δ_{c,c}``).

Cost: one pass over the data, ``C²`` backward passes through each batch's output graph (``δ_{c,c}``
alone: ``C``). Sums meet in the operator's ``sum_over_data``, so the means are distributed like
the operator's products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.curvature.fisher import ignore_index_of
from tinysubspace.curvature.ggn import GGNOperator

__all__ = ["ClassMeans", "class_gradient_means", "class_mean_basis", "papyan_basis"]


@dataclass(frozen=True)
class ClassMeans:
    """Class means of per-example gradients.

    Attributes:
        means: ``(C, C, p)``; ``means[c, c']`` is ``δ_{c,c'}`` (zero for an empty class).
        counts: ``(C,)`` examples per class ``N_c``.
        weights: ``(C, C)`` ``w_{c c'} = (1/N) Σ_{i ∈ c} p_{i c'}`` (sum 1; ``N = Σ_c N_c``,
            the examples whose label is not padding).
        backward_passes: output-graph backward passes used (per batch ``C²``, or ``C``).
    """

    means: torch.Tensor
    counts: torch.Tensor
    weights: torch.Tensor
    backward_passes: int

    @property
    def true_label_means(self) -> torch.Tensor:
        """``(p, C)``: column ``c`` is ``δ_{c,c}``, the mean gradient of class ``c``."""
        return torch.diagonal(self.means, dim1=0, dim2=1)


def class_gradient_means(op: GGNOperator, num_classes: int,
                         cross_class: bool = True) -> ClassMeans:
    """``δ_{c,c'}`` and ``w_{c c'}`` over ``op``'s data at ``op``'s parameters (module docstring).

    Args:
        op: a :class:`GGNOperator` (or subclass) of a softmax cross-entropy classifier whose
            targets are class indices ``0 … C − 1`` (or ``ignore_index``, -100: padding, left
            out of every mean, count and weight); its dtype, parameter subset and mode are used.
        num_classes: ``C`` (the model's output width).
        cross_class: compute every ``δ_{c,c'}``; ``False``: the true-label means ``δ_{c,c}`` only
            (``C`` backward passes per batch instead of ``C²``; other entries left zero).

    Raises:
        ValueError: outputs that are not ``(n, C)``, or targets outside ``0 … C − 1``.
    """
    C, p = int(num_classes), op.shape[0]
    passes, ignore = 0, ignore_index_of(op.loss_fn)

    def local_sum() -> torch.Tensor:  # [Σ_{i∈c} δ_{i,c'} (C·C·p), N_c (C), Σ_{i∈c} p_{ic'} (C·C)]
        nonlocal passes
        sums = torch.zeros(C, C, p, dtype=op.dtype, device=op.device)
        counts = torch.zeros(C, dtype=op.dtype, device=op.device)
        weights = torch.zeros(C, C, dtype=op.dtype, device=op.device)
        for batch in op.batches:
            y = torch.as_tensor(batch.targets, device=op.device).reshape(-1).long()
            counted = y != ignore  # padding labels belong to no class
            with torch.enable_grad():
                z = op.batch_outputs(batch)
                _check(z, y[counted], C)
                probs = torch.softmax(z.detach(), dim=1) * counted[:, None]
                members = torch.nn.functional.one_hot(y.clamp_min(0), C).to(op.dtype) \
                    * counted[:, None]  # (n, C)
                counts += members.sum(0)
                weights += members.T @ probs
                for c in range(C):
                    for c2 in range(C) if cross_class else (c,):
                        if not bool(members[:, c].any()):
                            continue
                        # ∇ Σ_{i∈c} ℓ(z_i, c') = Jᵀ u with u_i = 1[i∈c] (p_i − e_{c'})
                        u = members[:, c:c + 1] * (probs - torch.nn.functional.one_hot(
                            torch.full_like(y, c2), C).to(op.dtype))
                        grads = torch.autograd.grad(z, op.leaves, grad_outputs=u,
                                                    retain_graph=True, allow_unused=True)
                        sums[c, c2] += op.layout.flatten(grads, like=sums[c, c2])
                        passes += 1
        return torch.cat([sums.reshape(-1), counts, weights.reshape(-1)])

    total = op.sum_over_data(local_sum)
    sums = total[:C * C * p].reshape(C, C, p)
    counts = total[C * C * p:C * C * p + C]
    weights = total[C * C * p + C:].reshape(C, C) / counts.sum().clamp_min(1)
    means = sums / counts.clamp_min(1)[:, None, None]
    return ClassMeans(means, counts, weights, passes)


def _check(z: torch.Tensor, y: torch.Tensor, C: int) -> None:
    if z.ndim != 2 or z.shape[1] != C:
        raise ValueError(f"class means need outputs of shape (batch, {C}), got "
                         f"{tuple(z.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"targets must be class indices 0 … {C - 1}, got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def class_mean_basis(means: ClassMeans, rtol: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis ``(p, r)`` of ``span{δ_{c,c}}`` (``r ≤ C``: singular values below
    ``rtol`` times the largest are dropped)."""
    U, sing, _ = torch.linalg.svd(means.true_label_means, full_matrices=False)
    return U[:, sing > rtol * sing.max()]


def papyan_basis(means: ClassMeans, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of ``M = Σ w_{cc'} δ_{c,c'} δ_{c,c'}ᵀ`` from the SVD of the
    ``p × C²`` matrix ``[√w_{cc'} δ_{c,c'}]``: ``(values (k,), vectors (p, k))``, descending.

    Raises:
        ValueError: ``k`` above ``C²`` (the rank of ``M``).
    """
    C = means.weights.shape[0]
    if not 1 <= k <= C * C:
        raise ValueError(f"k must be between 1 and C² = {C * C}, got {k}")
    columns = (means.means * means.weights.clamp_min(0).sqrt()[:, :, None]).reshape(C * C, -1).T
    U, S, _ = torch.linalg.svd(columns, full_matrices=False)
    return S[:k].square(), U[:, :k]
