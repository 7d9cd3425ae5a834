"""Figures drawn from a run's stored arrays rather than its metrics table (PAPER.txt, Appendix B):
the spectrum (Figs. 4, 5: ``spectrum.npz``) and the top eigenvector (Figs. 6, 7:
``eigenvectors/step_*.pt``). Nothing is recomputed from a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from tinysubspace.linalg.density import broadened_density, default_sigma, density_grid
from tinysubspace.plots.common import (
    MissingDataError,
    RunLike,
    as_run,
    choose_steps,
    finish,
    new_figure,
    top_k,
)
from tinysubspace.problems.models.anatomy import ParameterGroup, label_parameters
from tinysubspace.results.store import Run

__all__ = [
    "figure_spectrum",
    "figure_top_edge_density",
    "figure_top_eigenvector",
    "figure_top_layer_eigenvector",
]


def _spectrum(run: Run, figure: str) -> dict[str, Any]:
    spectrum = run.spectrum()
    if not spectrum or not ({"eigenvalues", "nodes"} & set(spectrum)):
        raise MissingDataError(f"{figure} needs spectrum.npz with 'eigenvalues' or SLQ 'nodes' "
                               f"and 'weights'; {run.path} has none (tracker.spectrum = exact "
                               "or slq)")
    return spectrum


def _descending(eigenvalues: np.ndarray) -> np.ndarray:
    """``(realizations, n)`` eigenvalues, each row descending."""
    values = np.atleast_2d(np.asarray(eigenvalues, dtype=float))
    return -np.sort(-values, axis=1)


def _slq_density(spectrum: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The stored ``grid``/``density``, else the broadened density of the stored quadrature."""
    if "grid" in spectrum and "density" in spectrum:
        return np.asarray(spectrum["grid"], float), np.asarray(spectrum["density"], float)
    nodes = torch.as_tensor(np.asarray(spectrum["nodes"], dtype=float))
    weights = torch.as_tensor(np.asarray(spectrum["weights"], dtype=float))
    sigma = float(spectrum["sigma"]) if "sigma" in spectrum else default_sigma(nodes)
    grid = density_grid(nodes, sigma)
    return grid.numpy(), broadened_density(nodes, weights, grid, sigma).numpy()


def figure_spectrum(run: RunLike, bins: int = 100) -> Figure:
    """Fig. 4: the full Hessian spectrum (histogram of the exact eigenvalues, log count axis),
    the top ``k`` eigenvalues marked and numbered at the right edge; averaged over realizations
    when ``eigenvalues`` is ``(realizations, p)``. With SLQ only: the broadened density.

    Data: ``{"eigenvalues", "counts", "edges", "top"}`` (exact) or ``{"grid", "density"}`` (SLQ).
    """
    run = as_run(run)
    spectrum = _spectrum(run, "Fig. 4 (spectrum)")
    figure, (ax,) = new_figure(1, width=6.0, height=3.6)
    if "eigenvalues" not in spectrum:
        return finish(figure, _draw_slq_density(ax, spectrum))
    values = _descending(spectrum["eigenvalues"])
    counts, edges = np.histogram(values.ravel(), bins=bins)
    counts = counts / values.shape[0]
    top = values.mean(axis=0)[:min(top_k(run), values.shape[1])]
    ax.stairs(counts, edges, fill=True, alpha=0.7, label="eigenvalues")
    ax.set_yscale("log")
    level = counts.max() * 3
    _mark_top(ax, top, level)
    ax.set(xlabel=r"eigenvalue $\lambda$", ylabel="count", ylim=(0.5 / values.shape[0],
                                                                  level * 20),
           title=f"full Hessian spectrum (p = {values.shape[1]})")
    ax.legend(fontsize="small", loc="center right")
    return finish(figure, {"eigenvalues": values, "counts": counts, "edges": edges, "top": top})


def _draw_slq_density(ax: Any, spectrum: dict[str, Any]) -> dict[str, np.ndarray]:
    """Fig. 4 from SLQ nodes and weights: the broadened density on a log axis."""
    grid, density = _slq_density(spectrum)
    ax.plot(grid, density)
    ax.set(yscale="log", xlabel=r"eigenvalue $\lambda$", ylabel="density (SLQ)",
           ylim=(density.max() * 1e-7, density.max() * 3),
           title="Hessian spectral density (stochastic Lanczos quadrature)")
    return {"grid": grid, "density": density}


def _mark_top(ax: Any, top: np.ndarray, level: float) -> None:
    """Triangles at the top eigenvalues at height ``level``, numbered 1, 2, … above them."""
    ax.plot(top, np.full(top.size, level), "v", color="C3", ms=5, label=f"top {top.size}")
    for i, lam in enumerate(top):
        ax.annotate(str(i + 1), (lam, level), xytext=(0, 4 + 8 * (i % 2)),
                    textcoords="offset points", ha="center", fontsize=7, color="C3")


def _slq_top_edge(spectrum: dict[str, Any], n_top: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``log10`` of the positive SLQ nodes and their masses; with ``dimension`` stored, masses
    in eigenvalues and only the nodes holding the top ``n_top`` of them (the top edge)."""
    order = np.argsort(-np.asarray(spectrum["nodes"], float).ravel())
    nodes = np.asarray(spectrum["nodes"], float).ravel()[order]
    mass = np.asarray(spectrum["weights"], float).ravel()[order]
    keep = nodes > 0
    if "dimension" in spectrum:
        mass = mass * float(spectrum["dimension"])
        keep &= np.concatenate([[0.0], np.cumsum(mass)[:-1]]) < n_top
        unit = r"eigenvalues per unit $\log_{10}\lambda$ (SLQ)"
    else:
        unit = r"fraction of the spectrum per unit $\log_{10}\lambda$ (SLQ)"
    return np.log10(nodes[keep]), mass[keep], unit


def _top_edge_sources(runs: list[Run], figure: str) -> dict[str, Any]:
    """The top-edge data of ``runs``: ``lanczos`` and ``exact`` as ``(realizations, n)``
    descending eigenvalues (each run's rows stacked, cut to the shortest), ``slq`` as a list of
    spectra; ``k``: the first run's ``tracker.k``."""
    found: dict[str, Any] = {"lanczos": [], "exact": [], "slq": []}
    for run in runs:
        spectrum = run.spectrum() or {}
        if "top_eigenvalues" in spectrum:
            found["lanczos"].append(_descending(spectrum["top_eigenvalues"]))
        if "eigenvalues" in spectrum:
            found["exact"].append(_descending(spectrum["eigenvalues"]))
        if "nodes" in spectrum and "weights" in spectrum:
            found["slq"].append(spectrum)
    if not any(found.values()):
        raise MissingDataError(f"{figure} needs spectrum.npz with Lanczos 'top_eigenvalues' "
                               "(tracker.spectrum_top), exact 'eigenvalues' or SLQ 'nodes' and "
                               f"'weights'; {', '.join(str(r.path) for r in runs)} stored none")
    for key in ("lanczos", "exact"):
        if found[key]:
            n = min(v.shape[1] for v in found[key])
            found[key] = np.concatenate([v[:, :n] for v in found[key]], axis=0)
    found["k"] = top_k(runs[0])
    return found


def _slq_histogram(spectra: list[dict[str, Any]], n_top: int,
                   edges: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, str]:
    """The SLQ top edge (:func:`_slq_top_edge`) as a density per unit ``log10 λ``, averaged
    over the spectra (realizations)."""
    parts = [_slq_top_edge(spectrum, n_top) for spectrum in spectra]
    logs = np.concatenate([logs for logs, _, _ in parts])
    mass = np.concatenate([mass for _, mass, _ in parts]) / len(parts)
    counts, edges = np.histogram(logs, bins=edges, weights=mass)
    return counts / np.diff(edges), edges, parts[0][2]


def figure_top_edge_density(runs: RunLike | Sequence[RunLike], n_top: int = 1000,
                            bins: int = 60) -> Figure:
    """Fig. 5: density of the top edge of the spectrum on a log-eigenvalue axis, averaged over
    realizations (the paper: "we only computed the top 1000 eigenvalues", 200 realizations).

    Each run is a realization (and each row of a stored ``(realizations, n)`` array). The
    histogram counts eigenvalues per unit of ``log10 λ`` per realization, of the largest
    ``n_top`` positive ones from, in order of preference: Lanczos (``top_eigenvalues`` of
    ``spectrum.npz``, ``tracker.spectrum_top``: the paper's method), the exact spectrum
    (``eigenvalues``), or SLQ (positive nodes weighted by their mass; where ``dimension`` is
    stored, masses count eigenvalues and only the nodes holding the top ``n_top`` are kept).
    With Lanczos or exact values *and* SLQ, the SLQ density is drawn over the histogram, on the
    same bins and ``n_top``. The dotted line marks the mean ``λ_k``.

    Data: ``{"edges", "density", "source" ("lanczos" | "exact" | "slq"), "realizations"}``,
    ``"lambda_k"`` (from eigenvalues) and ``"slq": {"edges", "density"}`` (overlaid SLQ).
    """
    many = [as_run(r) for r in (runs if isinstance(runs, (list, tuple)) else [runs])]
    found = _top_edge_sources(many, "Fig. 5 (top-edge density)")
    figure, (ax,) = new_figure(1, width=5.5, height=3.6)
    data: dict[str, Any] = {}
    source = next(key for key in ("lanczos", "exact", "slq") if len(found[key]))
    if source == "slq":
        density, edges, unit = _slq_histogram(found["slq"], n_top, bins)
        realizations = len(found["slq"])
    else:
        values = found[source][:, :n_top]
        logs = np.log10(values[values > 0])
        if logs.size == 0:
            raise MissingDataError(f"Fig. 5: {', '.join(str(r.path) for r in many)} stored no "
                                   "positive eigenvalue")
        realizations = values.shape[0]
        counts, edges = np.histogram(logs, bins=bins,
                                     weights=np.full(logs.shape, 1.0 / realizations))
        density = counts / np.diff(edges)
        unit = r"eigenvalues per unit $\log_{10}\lambda$ (per realization)"
        data.update(_mark_lambda_k(ax, values, found["k"]))
    label = {"lanczos": "Lanczos top eigenvalues", "exact": "exact eigenvalues",
             "slq": "SLQ"}[source]
    ax.stairs(density, edges, fill=True, alpha=0.7, label=label)
    if source != "slq" and found["slq"]:
        slq, _, _ = _slq_histogram(found["slq"], values.shape[1], edges)
        ax.stairs(slq, edges, color="C1", lw=1.5, label="SLQ (same bins)")
        data["slq"] = {"edges": edges, "density": slq}
    ax.set(xlabel=r"$\log_{10} \lambda$", ylabel=unit,
           title=f"top edge of the Hessian spectrum ({realizations} realization"
                 f"{'s' if realizations != 1 else ''})")
    ax.legend(fontsize="small")
    data.update({"edges": edges, "density": density, "source": source,
                 "realizations": realizations})
    return finish(figure, data)


def _mark_lambda_k(ax: Any, values: np.ndarray, k: int) -> dict[str, float]:
    """A dotted line at the mean ``log10 λ_k`` over realizations, where every ``λ_k`` is
    positive; returns ``{"lambda_k": mean}`` (empty if not drawn)."""
    if k > values.shape[1] or not (values[:, k - 1] > 0).all():
        return {}
    lambda_k = float(np.mean(values[:, k - 1]))
    ax.axvline(np.log10(lambda_k), color="C3", ls=":", label=fr"mean $\lambda_{{{k}}}$")
    ax.legend(fontsize="small")
    return {"lambda_k": lambda_k}


# ------------------------------------------------------------------------ Figs. 6 and 7
def _vector_steps(run: Run, steps: Sequence[int] | None,
                  default: Sequence[int]) -> dict[int, str]:
    """``{saved step: panel title}``, the nearest saved step for each wanted one; a title says
    when it stands in for another step (a file missing, or never saved)."""
    saved = list(run.eigenvector_steps)
    if not saved:
        raise MissingDataError(f"Figs. 6/7 need eigenvectors/step_*.pt files; {run.path} saved "
                               "none (tracker.save_vectors_at)")
    titles: dict[int, str] = {}
    for want in steps if steps is not None else default:
        (step,) = choose_steps(saved, [want])
        titles.setdefault(step, f"step {step}" if step == want else
                          f"step {step} (none saved at {want})")
    return titles


def top_eigenvector(run: Run, step: int) -> tuple[np.ndarray, list[ParameterGroup]]:
    """``v_1`` saved at ``step`` with its sign fixed (largest-magnitude entry positive), and its
    parameter groups (:func:`~tinysubspace.problems.models.anatomy.label_parameters` of the saved
    names and
    shapes)."""
    saved = run.eigenvectors(step)
    v = np.asarray(saved["vectors"][:, 0], dtype=float)
    if v[np.argmax(np.abs(v))] < 0:
        v = -v
    return v, label_parameters(saved["param_names"], saved["param_shapes"])


def _eigenvector_panels(run: Run, titles: dict[int, str], top_layer_only: bool,
                        title: str) -> Figure:
    chosen = list(titles)
    figure, axes = new_figure(len(chosen), width=4.6, height=3.0,
                              rows=2 if len(chosen) > 2 else 1)
    data: dict[int, Any] = {}
    for ax, step, letter in zip(axes, chosen, "abcdefgh", strict=False):
        v, groups = top_eigenvector(run, step)
        if top_layer_only:
            groups = [g for g in groups if g.label.startswith("top layer")]
        entries = {}
        for index, group in enumerate(groups):
            values = v[group.start:group.stop]
            ax.plot(np.arange(group.start, group.stop), values, "-", lw=0.6,
                    marker="o" if values.size <= 200 else None, ms=2,
                    color=f"C{index % 10}", label=group.label)
            entries[group.label] = values
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set(xlabel="parameter index", ylabel="entry of $v_1$",
               title=f"({letter}) {titles[step]}")
        data[step] = {"vector": v, "groups": entries}
    axes[0].legend(fontsize="x-small", ncol=1 if len(data[chosen[0]]["groups"]) <= 6 else 2)
    figure.suptitle(title)
    return finish(figure, data)


def figure_top_eigenvector(run: RunLike, steps: Sequence[int] | None = None) -> Figure:
    """Fig. 6: entries of the top Hessian eigenvector ``v_1`` at chosen steps (default the
    paper's 0, 100, 200, 400, nearest saved ones), coloured by layer: the weights and biases of
    each layer, the last one labelled "top layer". Sign fixed: the largest entry is positive.

    Data: ``{step: {"vector": v_1 (p,), "groups": {label: entries}}}``.
    """
    run = as_run(run)
    chosen = _vector_steps(run, steps, (0, 100, 200, 400))
    return _eigenvector_panels(run, chosen, False, r"top Hessian eigenvector $v_1$ by layer")


def figure_top_layer_eigenvector(run: RunLike, steps: Sequence[int] | None = None) -> Figure:
    """Fig. 7: Fig. 6 zoomed on the top layer's weights and biases (default steps 0 and 400).

    Data: as :func:`figure_top_eigenvector`, ``groups`` holding the top layer only.
    """
    run = as_run(run)
    chosen = _vector_steps(run, steps, (0, 400))
    return _eigenvector_panels(run, chosen, True, r"top eigenvector $v_1$: top layer only")
