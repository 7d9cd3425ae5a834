"""Per-block Hessian spectra of a model (``ts.block_spectra``) and their flat tracker columns
(:func:`block_measurements`).

For each parameter block ``b`` (:func:`tinysubspace.problems.models.blocks.parameter_blocks`)
the diagonal block ``H_bb`` of the Hessian of the mean loss is the
:class:`~tinysubspace.curvature.hessian.HessianOperator` restricted to the block's parameters
(``params=``; rows of a fused attention projection by
:class:`~tinysubspace.linalg.blocks.RestrictedOperator`); its top eigenvalues, Hutchinson trace
and SLQ density come from :func:`tinysubspace.linalg.blocks.block_spectrum`, and the
block-heterogeneity score of Zhang et al. (2024) from
:func:`tinysubspace.linalg.blocks.block_heterogeneity`. Every block is measured at the same
point, with the same probe seed; the model is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tinysubspace.curvature.data import chunk_size_argument
from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.linalg.blocks import (
    BlockSpectrum,
    RestrictedOperator,
    block_spectrum,
    heterogeneity_matrix,
    top_scales,
)
from tinysubspace.problems.models.blocks import BlockPart, parameter_blocks

__all__ = ["BlockSpectra", "block_columns", "block_measurements", "block_operator",
           "block_spectra"]


@dataclass(frozen=True)
class BlockSpectra:
    """Per-block curvature of a model at one point.

    Attributes:
        blocks: ``{name: BlockSpectrum}`` in block order.
        distances: ``(B, B)`` Jensen–Shannon distances between the blocks' densities.
        heterogeneity: their mean over pairs of distinct blocks (NaN for one block).
        normalized_distances, normalized_heterogeneity: the same with each block's spectrum
            divided by its ``|λ_1|`` (:func:`~tinysubspace.linalg.blocks.top_scales`).
    """

    blocks: dict[str, BlockSpectrum]
    distances: torch.Tensor
    heterogeneity: float
    normalized_distances: torch.Tensor
    normalized_heterogeneity: float

    @property
    def names(self) -> list[str]:
        return list(self.blocks)


def block_operator(model: torch.nn.Module, loss_fn: Callable, data: Any,
                   parts: Iterable[BlockPart], **operator_options: Any):
    """``H_bb``: the Hessian operator on the block's parameters, restricted to its rows when a
    part covers only some rows of a parameter."""
    parts = tuple(parts)
    names = list(dict.fromkeys(p.name for p in parts))  # (a fused projection: one name, 2 parts)
    op = HessianOperator(model, loss_fn, data, params=names, **operator_options)
    if all(p.rows is None for p in parts):
        return op
    offsets = dict(zip(op.layout.names, op.layout.slices(), strict=True))
    shapes = dict(zip(op.layout.names, op.layout.shapes, strict=True))
    index = []
    for part in parts:
        whole = offsets[part.name]
        if part.rows is None:
            index.append(torch.arange(whole.start, whole.stop))
            continue
        per_row = math.prod(shapes[part.name][1:])
        index.append(torch.arange(whole.start + part.rows[0] * per_row,
                                  whole.start + part.rows[1] * per_row))
    return RestrictedOperator(op, torch.cat(index))


def block_spectra(model: torch.nn.Module, loss_fn: Callable, data: Any,
                  blocks: str | Mapping[str, Iterable] = "auto", *, k: int = 5, steps: int = 40,
                  probes: int = 4, seed: int = 0, tol: float = 1e-4, tol_scale: str = "top",
                  exact_size: int = 64, points: int = 2000, sigma: float | None = None,
                  dtype: torch.dtype | None = torch.float64, mode: str = "eval",
                  chunk_size: int | None = None, hvp_method: str = "auto",
                  batch_size: int | None = None) -> BlockSpectra:
    """Top eigenvalues, Hutchinson trace (with its standard error) and SLQ density of every
    diagonal block of the Hessian, and the block-heterogeneity score.

    Args:
        model, loss_fn, data: as for :class:`~tinysubspace.curvature.hessian.HessianOperator`.
        blocks: ``"auto"`` (one block per module), ``"layers"``, ``"types"`` or an explicit
            ``{name: [parameter names]}`` (:func:`~tinysubspace.problems.models.blocks.
            parameter_blocks`).
        k: top eigenvalues per block.
        steps, probes: SLQ Lanczos steps and Rademacher probes per block (the trace comes from
            the same probes).
        seed: seed of every block's probes and Lanczos start.
        tol: relative residual of the eigenpairs; ``tol_scale``: relative to what, ``"top"``
            or ``"pair"`` (:func:`~tinysubspace.linalg.blocks.block_spectrum`).
        exact_size: blocks with at most this many parameters are formed and diagonalised.
        points, sigma: grid and broadening of the densities compared by the score.
        dtype, mode, chunk_size, hvp_method: passed to the operators (float64 by default);
            ``batch_size`` is the old name of ``chunk_size``.

    Returns:
        :class:`BlockSpectra`.

    Raises:
        ValueError: a bad blocking or parameter name, or bad solver settings.
    """
    groups = parameter_blocks(model, blocks)
    options = {"dtype": dtype, "mode": mode, "hvp_method": hvp_method,
               "chunk_size": chunk_size_argument(chunk_size, batch_size)}
    spectra = {name: block_spectrum(block_operator(model, loss_fn, data, parts, **options), name,
                                    k=k, steps=steps, probes=probes, seed=seed, tol=tol,
                                    exact_size=exact_size, tol_scale=tol_scale)
               for name, parts in groups.items()}
    B = len(spectra)
    if B < 2:
        empty = torch.zeros(B, B, dtype=torch.float64)
        return BlockSpectra(spectra, empty, math.nan, empty, math.nan)
    densities = [s.density for s in spectra.values()]
    distances = heterogeneity_matrix(densities, points, sigma)
    scales = top_scales([float(s.values[0]) for s in spectra.values()])
    normalized = heterogeneity_matrix(densities, points, sigma, scales)
    return BlockSpectra(spectra, distances, float(distances.sum() / (B * (B - 1))),
                        normalized, float(normalized.sum() / (B * (B - 1))))


def block_columns(names: Iterable[str], k: int) -> list[str]:
    """The columns :func:`block_measurements` fills for blocks ``names`` with ``k`` eigenvalues
    each (the tracker's ``blocks`` group declares these)."""
    cols = []
    for name in names:
        cols += [f"block/{name}/eig_{i}" for i in range(1, k + 1)]
        cols += [f"block/{name}/trace", f"block/{name}/trace_se", f"block/{name}/size"]
    return [*cols, "blocks/heterogeneity", "blocks/heterogeneity_normalized"]


def block_measurements(model: torch.nn.Module, loss_fn: Callable, data: Any,
                       blocks: str | Mapping[str, Iterable] = "auto", **options: Any
                       ) -> dict[str, float]:
    """:func:`block_spectra` as flat tracker columns (STYLE.md point 13):
    ``block/NAME/eig_1`` … ``eig_k``, ``block/NAME/trace``, ``block/NAME/trace_se``,
    ``block/NAME/size`` for every block, ``blocks/heterogeneity`` and
    ``blocks/heterogeneity_normalized``.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    >>> X = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    >>> row = block_measurements(model, torch.nn.functional.mse_loss, (X, X[:, :1]), k=1)
    >>> sorted(row)[:3]
    ['block/0/eig_1', 'block/0/size', 'block/0/trace']
    """
    result = block_spectra(model, loss_fn, data, blocks, **options)
    row: dict[str, float] = {}
    for name, spectrum in result.blocks.items():
        row.update({f"block/{name}/eig_{i + 1}": float(v)
                    for i, v in enumerate(spectrum.values)})
        row[f"block/{name}/trace"] = spectrum.trace.value
        row[f"block/{name}/trace_se"] = spectrum.trace.stderr
        row[f"block/{name}/size"] = float(spectrum.size)
    row["blocks/heterogeneity"] = result.heterogeneity
    row["blocks/heterogeneity_normalized"] = result.normalized_heterogeneity
    return row
