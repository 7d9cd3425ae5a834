"""Where the outliers come from: spectra of the Hessian and the Gauss–Newton matrix, and the
overlaps of their top subspaces with each other and with the class means, from run folders.

Reads what :mod:`tinysubspace.experiments.outliers` writes (``metrics.csv`` columns
``hessian/eig_*``, ``ggn/eig_*``, ``overlap/*``; ``spectrum.npz`` keys ``hessian`` and ``ggn``
when the run computed full spectra). Never trains or computes a Hessian.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tinysubspace.plots.common import finish, new_figure, series
from tinysubspace.results.store import MissingDataError, Run, RunLike, as_run, run_label

__all__ = ["OVERLAPS", "figure_outliers"]

OVERLAPS = {
    "overlap/hessian_ggn": "top-k of H vs top-k of G",
    "overlap/classmeans_hessian": "class-mean span vs top-k of H",
    "overlap/papyan_hessian": "Papyan's M (top-k) vs top-k of H",
    "overlap/classmeans_ggn": "class-mean span vs top-k of G",
}
"""Columns drawn in the overlap panel, with their legend labels."""


def _eigen_columns(run: Run, name: str) -> list[str]:
    cols = [c for c in run.metrics.columns if str(c).startswith(f"{name}/eig_")]
    return sorted(cols, key=lambda c: int(str(c).rsplit("_", 1)[1]))


def _top_values(run: Run, spectrum: dict | None, name: str, count: int) -> np.ndarray:
    """The top ``count`` eigenvalues: the full spectrum if saved, else the last measurement."""
    if spectrum is not None and name in spectrum:
        return np.sort(np.asarray(spectrum[name], float))[::-1][:count]
    cols = _eigen_columns(run, name)
    if not cols:
        raise MissingDataError(f"{run.path} has no {name}/eig_* columns; run an outliers "
                               "config (tinysubspace run ggn-fc-digits)")
    return run.metrics[cols].dropna().iloc[-1].to_numpy(float)[:count]


def figure_outliers(run: RunLike, top: int = 40, bins: int = 80) -> Figure:
    """Three panels: the top eigenvalues of ``H`` and ``G`` by index (log scale; the full spectra
    if saved, else the last measurement's ``2k``), their histograms (if the full spectra were
    saved; else ``λ_1`` of both over steps), and the overlaps (eq. 5) over steps.

    Data: ``{"hessian_top", "ggn_top", "spectra": bool, "hessian", "ggn"`` (full spectra, if
    saved), ``"step", OVERLAPS keys…}``.

    Raises:
        MissingDataError: the run has no outliers measurements.
    """
    run = as_run(run)
    spectrum = run.spectrum()
    spectra = spectrum is not None and {"hessian", "ggn"} <= set(spectrum)
    figure, (ax_top, ax_hist, ax_overlap) = new_figure(3, width=4.4)
    data: dict[str, Any] = {"spectra": spectra}
    for name, color in (("hessian", "C0"), ("ggn", "C1")):
        values = _top_values(run, spectrum, name, top)
        data[f"{name}_top"] = values
        positive = values > 0
        ax_top.semilogy(np.arange(1, len(values) + 1)[positive], values[positive], "o", ms=3,
                        color=color, mfc="none" if name == "ggn" else color,
                        label="Hessian H" if name == "hessian" else "Gauss–Newton G")
    k = int((run.config.get("tracker") or {}).get("k") or 0)
    if k:
        ax_top.axvline(k + 0.5, color="k", ls=":", lw=1)
    ax_top.set(xlabel="index i", ylabel=r"$\lambda_i$",
               title=f"top eigenvalues{' (final)' if spectra else ' (last measurement)'}")
    ax_top.legend(fontsize="small")
    if spectra:
        _histograms(ax_hist, spectrum, bins, data)
    else:
        for name, color in (("hessian", "C0"), ("ggn", "C1")):
            steps, lam = series(run, f"{name}/eig_1")
            ax_hist.plot(steps, lam, "o-", ms=3, color=color, label=name)
        ax_hist.set(xlabel="step", ylabel=r"$\lambda_1$", title=r"$\lambda_1$ of H and G")
        ax_hist.legend(fontsize="small")
    _overlaps(ax_overlap, run, data)
    return finish(figure, data)


def _histograms(ax, spectrum: dict, bins: int, data: dict[str, Any]) -> None:
    h, g = (np.asarray(spectrum[n], float) for n in ("hessian", "ggn"))
    data["hessian"], data["ggn"] = h, g
    edges = np.linspace(min(h.min(), g.min()), max(h.max(), g.max()), bins + 1)
    negative = int((h < -1e-6 * np.abs(h).max()).sum())
    ax.hist(h, bins=edges, histtype="step", color="C0", label=f"H ({negative} below −1e-6 λ₁)")
    ax.hist(g, bins=edges, histtype="step", color="C1", ls="--", label="G")
    ax.set(yscale="log", xlabel=r"$\lambda$", ylabel="count", title="full spectra (final)")
    ax.legend(fontsize="small")


def _overlaps(ax, run: Run, data: dict[str, Any]) -> None:
    drawn = 0
    for index, (column, label) in enumerate(OVERLAPS.items()):
        if column not in run.metrics:
            continue
        steps, values = series(run, column)
        data["step"], data[column] = steps, values
        ax.plot(steps, values, "o-" if "ggn" not in column or "hessian" in column else "s--",
                ms=3, color=f"C{index + 2}", label=label)
        drawn += 1
    if not drawn:
        raise MissingDataError(f"{run.path} has none of the overlap columns {list(OVERLAPS)}")
    ax.set(xlabel="step", ylabel="overlap (eq. 5)", ylim=(-0.02, 1.02),
           title=f"subspace overlaps — {run_label(run)}")
    ax.legend(fontsize="small", loc="lower right")
