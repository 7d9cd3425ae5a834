"""Fisher information matrices of a data set, as operators: empirical, Monte Carlo and true.

With per-example losses :math:`\\ell_i = -\\log p(y_i \\mid z_i)` of outputs
:math:`z_i = f(x_i; \\theta)` and :math:`r_i(y) = \\nabla_{z_i} \\ell(z_i, y)` (so that the
per-example gradient is :math:`g_i = J_i^T r_i(y_i)`), the three matrices are

.. math::  F_{emp} = \\frac1N \\sum_i g_i g_i^T = \\frac1N \\sum_i J_i^T r_i r_i^T J_i, \\qquad
           F_{MC} = \\frac1N \\sum_i \\frac1S \\sum_{s=1}^S J_i^T r_i(\\hat y_{is})
                    r_i(\\hat y_{is})^T J_i, \\;\\hat y_{is} \\sim p(\\cdot \\mid z_i),

.. math::  F = \\frac1N \\sum_i J_i^T\\, \\mathbb{E}_{y \\sim p(\\cdot\\mid z_i)}[r_i r_i^T]\\, J_i,
           \\quad \\mathbb{E}[r r^T] = \\mathrm{diag}(p_i) - p_i p_i^T \\text{ (softmax)},\\;
           \\tfrac{2}{C} I \\text{ (mean-squared error over } C \\text{ outputs)}.

For these two losses (canonical links) the true Fisher equals the generalised Gauss–Newton
matrix (:class:`~tinysubspace.curvature.ggn.GGNOperator`); the empirical Fisher does not
(Kunstner et al. 2019). Every product is exact and uses the GGN's machinery (``Jᵀ M J V`` per
batch, one data pass per block, never a per-example gradient): only the output-space matrix
``M`` differs. The mean-reduced ``loss_fn`` of a batch must be the mean of per-example losses
(true for ``cross_entropy`` and ``mse_loss`` with ``reduction="mean"``), so that
``r_i = n_j ∇_{z_i} loss_fn(z, y)``.

Monte Carlo targets are drawn on the CPU from a generator seeded by ``(seed, rank, batch
index)``: the same operator gives the same products on every pass and every device, provided
the data come in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from tinysubspace.curvature import collectives as tsdist
from tinysubspace.curvature.data import Batch
from tinysubspace.curvature.dataset_operator import DataSetOperator
from tinysubspace.curvature.linearized import OutputCurvature, linearized_product

__all__ = ["FISHER_KINDS", "LIKELIHOODS", "FisherOperator", "likelihood_of"]

FISHER_KINDS = ("empirical", "mc", "true")
LIKELIHOODS = ("categorical", "gaussian")
_SEED_STRIDE = (1_000_003, 10_007)  # seed, rank and batch index mixed into one generator seed


def likelihood_of(loss_fn: Callable[..., Any]) -> str:
    """``"categorical"`` for cross-entropy, ``"gaussian"`` for mean-squared error.

    Raises:
        ValueError: another loss, a loss module with ``reduction`` other than ``"mean"``, or
            cross-entropy with label smoothing or class weights (not a likelihood).
    """
    if loss_fn is functional.cross_entropy:
        return "categorical"
    if loss_fn is functional.mse_loss:
        return "gaussian"
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)):
        if loss_fn.reduction != "mean":
            raise ValueError(f"the Fisher needs a mean-reduced loss; {type(loss_fn).__name__} "
                             f"has reduction={loss_fn.reduction!r}")
        if isinstance(loss_fn, nn.MSELoss):
            return "gaussian"
        if loss_fn.label_smoothing != 0 or loss_fn.weight is not None:
            raise ValueError("cross-entropy with label smoothing or class weights is not the "
                             "negative log-likelihood of a categorical model; the true and "
                             "Monte Carlo Fisher are undefined for it (kind='empirical' works)")
        return "categorical"
    raise ValueError(f"cannot tell the likelihood of loss_fn {loss_fn!r}; pass likelihood= "
                     f"one of {LIKELIHOODS}")


class FisherOperator(DataSetOperator):
    """Exact Fisher information of the mean loss over a data set: empirical, Monte Carlo or true.

    Args:
        model, loss_fn, data, params, dtype, device, mode, batch_size, distributed: as
            :class:`~tinysubspace.curvature.hessian.HessianOperator`.
        kind: ``"empirical"`` (observed targets), ``"mc"`` (targets sampled from the model) or
            ``"true"`` (the exact expectation over the model's targets).
        likelihood: ``"categorical"`` (softmax over the last output dimension, integer class
            targets) or ``"gaussian"`` (mean-squared error); ``None``: from ``loss_fn``
            (:func:`likelihood_of`). Not needed for ``kind="empirical"``.
        mc_samples: targets drawn per example for ``kind="mc"``.
        seed: seed of the Monte Carlo targets.

    Raises:
        ValueError: an unknown ``kind`` or ``likelihood``, ``mc_samples < 1``, or a loss whose
            likelihood cannot be told (and everything ``HessianOperator`` raises).
    """

    product_name = "Fisher-vector product"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 data: Any, kind: str = "empirical", likelihood: str | None = None,
                 mc_samples: int = 1, seed: int = 0,
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", batch_size: int | None = None,
                 distributed: bool | None = None) -> None:
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS} or None, got "
                             f"{likelihood!r}")
        if kind == "mc" and (isinstance(mc_samples, bool) or not isinstance(mc_samples, int)
                             or mc_samples < 1):
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if kind != "empirical" and likelihood is None:
            likelihood = likelihood_of(loss_fn)
        self.kind, self.likelihood = kind, likelihood
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode=mode, batch_size=batch_size, distributed=distributed)

    # ------------------------------------------------------------------ public
    def sample_targets(self, outputs: torch.Tensor, index: int) -> torch.Tensor:
        """The ``mc_samples`` targets drawn for batch ``index`` with ``outputs`` ``(n, C)``:
        ``(S, n)`` class indices (categorical) or ``(S, n, C)`` values (gaussian, ``z + σ ε``
        with ``σ² = C/2``, the variance for which mean-squared error is ``−log p``)."""
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE[0]
                                            + tsdist.rank() * _SEED_STRIDE[1] + index)
        z = outputs.detach().to("cpu", torch.float64)
        if self.likelihood == "categorical":
            probs = torch.softmax(z.reshape(-1, z.shape[-1]), dim=-1)
            draws = torch.multinomial(probs, self.mc_samples, replacement=True, generator=gen)
            return draws.T.reshape(self.mc_samples, *z.shape[:-1]).to(outputs.device)
        sigma = (z[0].numel() / 2) ** 0.5
        noise = torch.randn((self.mc_samples, *z.shape), generator=gen, dtype=torch.float64)
        return (z + sigma * noise).to(device=outputs.device, dtype=outputs.dtype)

    def batch_product(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        """``F_j V = Jᵀ M_j J V`` for one batch, ``M_j`` the kind's output-space matrix."""
        return linearized_product(self, batch, index, block, self._output_curvature)

    # ---------------------------------------------------------------- internals
    def _checked_loss(self, outputs: torch.Tensor, batch: Batch, index: int,
                      targets: Any = None) -> torch.Tensor:
        """The batch's checked mean loss of ``outputs`` (:meth:`output_loss`)."""
        return self.output_loss(outputs, batch, index, targets)

    def _output_curvature(self, outputs: torch.Tensor, batch: Batch,
                          index: int) -> OutputCurvature:
        n = batch.size
        if self.likelihood == "categorical" and self.kind != "empirical" and outputs.ndim != 2:
            raise ValueError(f"a categorical Fisher needs outputs of shape (batch, classes), got "
                             f"shape {tuple(outputs.shape)}")
        if self.kind == "true":
            return self._expected_curvature(outputs.detach(), n)
        if self.kind == "empirical":
            targets = [batch.targets]
        else:
            targets = list(self.sample_targets(outputs, index))
        residuals = [n * self._output_gradient(outputs, batch, index, y) for y in targets]
        weight = 1.0 / (n * len(residuals))  # (1/n_j) Σ_i, averaged over the samples

        def apply(w: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(w)
            for r in residuals:
                dots = (r * w).reshape(n, -1).sum(1).reshape(n, *([1] * (w.ndim - 1)))
                total += r * dots
            return weight * total

        return apply

    def _output_gradient(self, outputs: torch.Tensor, batch: Batch, index: int,
                         targets: Any) -> torch.Tensor:
        """``∇_z loss_fn(z, targets)`` for one batch (``(n, C)``, detached)."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (dz,) = torch.autograd.grad(self._checked_loss(z, batch, index, targets), z)
        return dz

    def _expected_curvature(self, z: torch.Tensor, n: int) -> OutputCurvature:
        """``w ↦ (1/n) E[r rᵀ] w`` per example, in closed form."""
        if self.likelihood == "gaussian":
            scale = 2.0 / (n * z[0].numel())
            return lambda w: scale * w
        p = torch.softmax(z, dim=-1)
        return lambda w: (p * w - p * (p * w).sum(-1, keepdim=True)) / n
