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

**Examples and padding.** An *example* is what one ``g_i`` belongs to (``examples=``):
``"token"``, each position of outputs ``(..., C)`` (for next-token logits ``(B, T, V)``, each of
the ``B·T`` tokens; the default there) or ``"sequence"``, each row of the batch dimension (the
default otherwise; for ``(n, C)`` outputs the two agree). A token whose integer target is
``ignore_index`` (-100: the padding of every language-model collator) is no example, and a
sequence counts if one of its tokens does. With ``m_j`` the counted examples of batch ``j``,
``r_e = m_j ∇_{z_e} ℓ_j`` (for a token-mean cross-entropy, the gradient of token ``e``'s own loss;
for sequences, the sequence's part of the batch gradient, so that ``Σ_e r_e / m_j = ∇ℓ_j``) and
the batch's matrix is ``F_j = (1/m_j) Σ_e J_eᵀ r_e r_eᵀ J_e``, weighted by the batch's size ``n_j``
like every operator (:mod:`~tinysubspace.curvature.data`; with the size hook counting tokens,
``F`` is the mean over all tokens of the data set). The true Fisher masks padded positions and
divides by ``m_j``, so for cross-entropy it equals the GGN with any padding.

Monte Carlo targets are drawn on the CPU from a generator seeded by ``(seed, rank, batch
index)``: the same operator gives the same products on every pass and every device, provided
the data come in the same order. Drawn targets at padded positions are set back to
``ignore_index``.
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

__all__ = ["FISHER_EXAMPLES", "FISHER_KINDS", "LIKELIHOODS", "FisherOperator",
           "checked_examples", "counted_examples", "expected_output_curvature", "ignore_index_of",
           "likelihood_of", "resolve_examples"]

FISHER_KINDS = ("empirical", "mc", "true")
FISHER_EXAMPLES = ("auto", "token", "sequence")
IGNORE_INDEX = -100  # PyTorch's and Hugging Face's padding label
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
        model, loss_fn, data, params, dtype, device, mode, chunk_size, distributed: as
            :class:`~tinysubspace.curvature.hessian.HessianOperator`.
        kind: ``"empirical"`` (observed targets), ``"mc"`` (targets sampled from the model) or
            ``"true"`` (the exact expectation over the model's targets).
        likelihood: ``"categorical"`` (softmax over the last output dimension, integer class
            targets) or ``"gaussian"`` (mean-squared error); ``None``: from ``loss_fn``
            (:func:`likelihood_of`). Not needed for ``kind="empirical"``.
        mc_samples: targets drawn per example for ``kind="mc"``.
        seed: seed of the Monte Carlo targets.
        examples: what one example is (:data:`FISHER_EXAMPLES`, module docstring):
            ``"token"`` (each position of outputs ``(..., C)``), ``"sequence"`` (each row of
            the batch dimension) or ``"auto"`` (default: ``"token"`` for per-position class
            targets, i.e. outputs ``(B, T, V)`` with integer targets ``(B, T)``: next-token
            prediction; otherwise ``"sequence"``). Both are the same for ``(n, C)`` outputs.
            Targets equal to ``ignore_index`` (``loss_fn.ignore_index``, else -100) are not
            examples.

    Raises:
        ValueError: an unknown ``kind``, ``likelihood`` or ``examples``, ``mc_samples < 1``, a
            loss whose likelihood cannot be told (and everything ``HessianOperator`` raises);
            at the first product, outputs and targets that do not fit the examples.
    """

    product_name = "Fisher-vector product"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 data: Any, kind: str = "empirical", likelihood: str | None = None,
                 mc_samples: int = 1, seed: int = 0, examples: str = "auto",
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", chunk_size: int | None = None,
                 distributed: bool | None = None, *, batch_size: int | None = None) -> None:
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
        self.examples = checked_examples(examples)
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode=mode, chunk_size=chunk_size, distributed=distributed,
                         batch_size=batch_size)

    # ------------------------------------------------------------------ public
    def sample_targets(self, outputs: torch.Tensor, index: int) -> torch.Tensor:
        """The ``mc_samples`` targets drawn for batch ``index`` with ``outputs`` ``(n, C)``:
        ``(S, n)`` class indices (categorical; outputs ``(..., C)`` give ``(S, ...)``, one per
        position) or ``(S, n, C)`` values (gaussian, ``z + σ ε`` with ``σ² = C/2``, ``C`` the
        outputs of one example, the variance for which mean-squared error is ``−log p``).
        Targets are drawn for every position; :meth:`_output_curvature` drops those whose
        observed target is ``ignore_index``."""
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE[0]
                                            + tsdist.rank() * _SEED_STRIDE[1] + index)
        z = outputs.detach().to("cpu", torch.float64)
        if self.likelihood == "categorical":
            probs = torch.softmax(z.reshape(-1, z.shape[-1]), dim=-1)
            draws = torch.multinomial(probs, self.mc_samples, replacement=True, generator=gen)
            return draws.T.reshape(self.mc_samples, *z.shape[:-1]).to(outputs.device)
        per_example = z.shape[-1] if getattr(self, "examples", "auto") == "token" else z[0].numel()
        sigma = (per_example / 2) ** 0.5
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
        """``w ↦ (1/m) Σ_e r_e (r_eᵀ w_e)`` over the batch's ``m`` examples (module docstring;
        ``E[r rᵀ]`` in closed form for ``kind="true"``)."""
        ignore = ignore_index_of(self.loss_fn)
        examples = resolve_examples(getattr(self, "examples", "auto"), outputs, batch.targets)
        if self.likelihood == "categorical" and self.kind != "empirical":
            _check_categorical(outputs, batch.targets, examples)
        mask = counted_examples(outputs, batch.targets, examples, ignore)
        m = int(mask.sum())
        if m == 0:  # every target is padding: no example, no curvature
            return torch.zeros_like
        if self.kind == "true":
            return expected_output_curvature(outputs.detach(), mask, self.likelihood)
        if self.kind == "empirical":
            targets = [batch.targets]
        else:
            targets = [_masked(y, batch.targets, ignore) for y in
                       self.sample_targets(outputs, index)]
        residuals = [m * self._output_gradient(outputs, batch, index, y) for y in targets]
        rows, weight = mask.numel(), 1.0 / (m * len(residuals))  # (1/m) Σ_e, mean over samples

        def apply(w: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(w).reshape(rows, -1)
            for r in residuals:
                flat = r.reshape(rows, -1)
                total += flat * (flat * w.reshape(rows, -1)).sum(1, keepdim=True)
            return weight * total.reshape(w.shape)

        return apply

    def _output_gradient(self, outputs: torch.Tensor, batch: Batch, index: int,
                         targets: Any) -> torch.Tensor:
        """``∇_z loss_fn(z, targets)`` for one batch (``(n, C)``, detached)."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (dz,) = torch.autograd.grad(self._checked_loss(z, batch, index, targets), z)
        return dz

    def _expected_curvature(self, z: torch.Tensor, n: int) -> OutputCurvature:
        """``w ↦ (1/n) E[r rᵀ] w`` for ``n`` rows of ``z``, every one counted (no padding):
        :func:`expected_output_curvature`."""
        mask = torch.ones(z.shape[:-1] if z.ndim > 2 else z.shape[:1], dtype=torch.bool,
                          device=z.device).reshape(-1)
        return expected_output_curvature(z, mask, self.likelihood, count=n)


# ------------------------------------------------------------ examples and padding
def checked_examples(examples: str) -> str:
    """``examples`` if it is one of :data:`FISHER_EXAMPLES`.

    Raises:
        ValueError: anything else.
    """
    if examples not in FISHER_EXAMPLES:
        raise ValueError(f"examples must be one of {FISHER_EXAMPLES}, got {examples!r}")
    return examples


def ignore_index_of(loss_fn: Any) -> int:
    """The padding label ``loss_fn`` leaves out: its ``ignore_index`` (``nn.CrossEntropyLoss``),
    else -100 (the default of ``F.cross_entropy`` and Hugging Face's collators)."""
    value = getattr(loss_fn, "ignore_index", IGNORE_INDEX)
    return int(value) if isinstance(value, int) else IGNORE_INDEX


def _per_position(outputs: torch.Tensor, targets: Any) -> bool:
    """Integer targets with one class index per position of outputs ``(..., C)``."""
    return (isinstance(targets, torch.Tensor) and not targets.is_floating_point()
            and tuple(targets.shape) == tuple(outputs.shape[:-1]))


def resolve_examples(examples: str, outputs: torch.Tensor, targets: Any) -> str:
    """``"token"`` or ``"sequence"`` for one batch: ``"auto"`` is ``"token"`` for per-position
    class targets of outputs with three or more dimensions (next-token prediction), else
    ``"sequence"`` (the rows of the batch dimension; for ``(n, C)`` outputs the same)."""
    if examples != "auto":
        return examples
    return "token" if outputs.ndim >= 3 and _per_position(outputs, targets) else "sequence"


def counted_examples(outputs: torch.Tensor, targets: Any, examples: str,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Which examples of a batch count: a boolean vector, one entry per example (``"token"``:
    each position of outputs ``(..., C)``; ``"sequence"``: each row). A token counts unless its
    integer target is ``ignore_index``; a sequence counts if one of its tokens does. Other
    targets (floats, or integers without one per position) count every example.

    Raises:
        ValueError: ``"token"`` with integer targets that are not one per position.

    >>> z, y = torch.zeros(2, 3, 5), torch.tensor([[1, -100, 2], [-100, -100, -100]])
    >>> counted_examples(z, y, "token").tolist(), counted_examples(z, y, "sequence").tolist()
    ([True, False, True, False, False, False], [True, False])
    """
    token = examples == "token"
    rows = outputs.shape[:-1].numel() if token else outputs.shape[0]
    integer = isinstance(targets, torch.Tensor) and not targets.is_floating_point()
    if token and integer and not _per_position(outputs, targets) and outputs.ndim > 1:
        raise ValueError(f"examples='token' takes each position of outputs (..., C) as an "
                         f"example and needs integer targets of shape (...), got outputs "
                         f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}; use "
                         f"examples='sequence' or a loss over the last dimension")
    if not integer or (not token and (targets.ndim == 0 or targets.shape[0] != rows)):
        return torch.ones(rows, dtype=torch.bool, device=outputs.device)
    counted = (targets != ignore_index).to(outputs.device).reshape(rows, -1)
    return counted.any(1)


def expected_output_curvature(z: torch.Tensor, mask: torch.Tensor, likelihood: str,
                              count: int | None = None) -> OutputCurvature:
    """``w ↦ (1/m) Σ_e 1[e counts] E[r_e r_eᵀ] w_e``, ``m`` = ``count`` or the counted examples.

    Categorical (softmax over the last dimension; ``mask`` one entry per position):
    ``E[r rᵀ] = diag p − p pᵀ``. Gaussian (mean-squared error over all ``z.numel()`` numbers):
    ``2 I / z.numel()`` for the whole batch, whatever the examples.
    """
    if likelihood == "gaussian":
        scale = 2.0 / z.numel()
        return lambda w: scale * w
    m = int(mask.sum()) if count is None else count
    p = torch.softmax(z, dim=-1)
    keep = mask.reshape(*z.shape[:-1], 1).to(z.dtype)
    return lambda w: keep * (p * w - p * (p * w).sum(-1, keepdim=True)) / m


def _masked(sampled: torch.Tensor, targets: Any, ignore_index: int) -> torch.Tensor:
    """Sampled class targets with the observed padding positions set back to ``ignore_index``."""
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) == tuple(sampled.shape) \
            and not targets.is_floating_point() and not sampled.is_floating_point():
        return torch.where(targets == ignore_index, torch.full_like(sampled, ignore_index),
                           sampled)
    return sampled


def _check_categorical(outputs: torch.Tensor, targets: Any, examples: str) -> None:
    """A categorical true or Monte Carlo Fisher: ``(n, C)`` outputs, or per-token examples of
    outputs ``(..., C)`` with one class target per position."""
    if outputs.ndim == 2 or (examples == "token" and _per_position(outputs, targets)):
        return
    raise ValueError(f"a categorical Fisher needs outputs of shape (batch, classes), got shape "
                     f"{tuple(outputs.shape)}; for per-position classes in the last dimension "
                     "(e.g. next-token logits (B, T, V)) pass targets of shape (B, T), a loss "
                     "over the last dimension and examples='token' (or 'auto')")
