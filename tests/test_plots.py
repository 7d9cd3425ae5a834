"""Each figure draws exactly the run's stored numbers, and writes a non-empty image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from run_fixtures import ANCHORS, VECTOR_STEPS, K, P, write_run
from tinysubspace.plots import figures as plots
from tinysubspace.plots.common import choose_steps
from tinysubspace.plots.figures import MissingDataError, plotted_data
from tinysubspace.problems.models import label_parameters
from tinysubspace.results.spectrum import density_arrays
from tinysubspace.results.store import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "fixture")


@pytest.fixture(scope="module")
def metrics(run_dir):
    return pd.read_csv(run_dir / "metrics.csv")  # read here independently of load_run


def assert_png(figure: Figure, path) -> None:
    figure.savefig(path, dpi=50)
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 2000


def line_data(ax, index=0):
    line = ax.get_lines()[index]
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def test_fig1_f_top_loss_accuracy(run_dir, metrics, tmp_path):
    figure = plots.figure_f_top(run_dir)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)["fixture-run"]
    for column in ("step", "hessian/f_top", "train/loss", "train/accuracy"):
        np.testing.assert_array_equal(data[column], metrics[column].to_numpy(float))
    x, y = line_data(figure.axes[0])
    np.testing.assert_array_equal(x, metrics["step"])
    np.testing.assert_array_equal(y, metrics["hessian/f_top"])
    assert figure.axes[0].get_ylabel() == r"$f_{\mathrm{top}}$"


def test_fig12_overlays_variants_and_cuts_at_max_step(tmp_path, metrics):
    a = write_run(tmp_path / "a", name="lr0.1")
    b = write_run(tmp_path / "b", name="lr0.01", seed=3)
    figure = plots.figure_f_top([a, b], max_step=100)
    data = plotted_data(figure)
    assert list(data) == ["lr0.1", "lr0.01"]
    np.testing.assert_array_equal(data["lr0.01"]["step"], np.arange(0, 101, 10))
    assert len(figure.axes[0].get_lines()) == 2


def test_fig2_subspace_overlap_top_and_next(run_dir, metrics, tmp_path):
    figure = plots.figure_subspace_overlap(run_dir)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    assert sorted(data["top"]) == sorted(data["next"]) == list(ANCHORS)
    for kind in ("top", "next"):
        for t1 in ANCHORS:
            rows = metrics[metrics["step"] >= t1]
            np.testing.assert_array_equal(data[kind][t1]["t2"], rows["step"])
            np.testing.assert_array_equal(data[kind][t1]["overlap"],
                                          rows[f"overlap/{kind}/t1={t1}"])
    _, y = line_data(figure.axes[1], index=1)  # next-k panel, t1 = 50
    np.testing.assert_array_equal(y, metrics.loc[metrics["step"] >= 50, "overlap/next/t1=50"])


def test_fig3_mean_overlap_against_dimension_by_hand(run_dir, metrics, tmp_path):
    figure = plots.figure_overlap_vs_dimension(run_dir, average="measurements")
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    for t1 in ANCHORS:
        later = metrics[metrics["step"] > t1]
        expected = [later[f"overlap/d={d}/t1={t1}"].sum() / len(later)
                    for d in range(2, 2 * K + 1)]
        np.testing.assert_array_equal(data[t1]["d"], np.arange(2, 2 * K + 1))
        np.testing.assert_allclose(data[t1]["overlap"], expected, rtol=1e-12)


def test_fig9_panels_per_dimension(run_dir, metrics, tmp_path):
    figure = plots.figure_overlap_by_dimension(run_dir)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    assert sorted(data) == [2, 5]  # the paper's 2, 5, 9, 11, 15, 20 that exist for 2k = 6
    rows = metrics[metrics["step"] >= 100]
    np.testing.assert_array_equal(data[5][100]["overlap"], rows["overlap/d=5/t1=100"])


def test_fig8_lambda_max(run_dir, metrics, tmp_path):
    figure = plots.figure_lambda_max(run_dir, log_y=True)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    np.testing.assert_array_equal(data["hessian/eig_1"], metrics["hessian/eig_1"])
    assert figure.axes[0].get_yscale() == "log"


def test_fig11_c2_bars_and_sums(run_dir, metrics, tmp_path):
    figure = plots.figure_c2(run_dir, steps=(0, 50, 100, 200))
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    assert list(data) == [0, 50, 100, 200]
    row = metrics[metrics["step"] == 50].iloc[0]
    c2 = row[[f"hessian/c2_{i}" for i in range(1, 2 * K + 1)]].to_numpy(float)
    np.testing.assert_array_equal(data[50]["c2"], c2)
    assert data[50]["sum_top"] == pytest.approx(c2[:K].sum())
    heights = [patch.get_height() for patch in figure.axes[1].patches]
    np.testing.assert_allclose(heights, c2)
    text = figure.axes[1].texts[0].get_text()
    assert f"= {c2[:K].sum():.2f}" in text and f"= {c2[K:].sum():.2f}" in text


def test_fig4_spectrum_from_exact_eigenvalues(run_dir, tmp_path):
    figure = plots.figure_spectrum(run_dir)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    stored = np.load(run_dir / "spectrum.npz")["eigenvalues"]
    np.testing.assert_allclose(data["top"], np.sort(stored, axis=1)[:, ::-1].mean(0)[:K])
    np.testing.assert_allclose(data["top"], [8.5, 5.75, 3.75])
    assert data["counts"].sum() == pytest.approx(P)  # per realization


def test_fig5_top_edge_density_integrates_to_the_positive_count(run_dir, tmp_path):
    figure = plots.figure_top_edge_density(run_dir, n_top=10)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    stored = -np.sort(-np.load(run_dir / "spectrum.npz")["eigenvalues"], axis=1)[:, :10]
    mass = float((data["density"] * np.diff(data["edges"])).sum())
    assert mass == pytest.approx((stored > 0).sum() / 2)
    assert data["lambda_k"] == pytest.approx(3.75)


def test_fig4_and_5_from_slq_nodes(tmp_path):
    run_dir = write_run(tmp_path / "slq", spectrum=False)
    nodes = np.array([[0.5, 1.0, 8.0], [0.2, 2.0, 9.0]])
    weights = np.array([[0.3, 0.1, 0.1], [0.3, 0.1, 0.1]])
    np.savez(run_dir / "spectrum.npz", nodes=nodes, weights=weights, dimension=np.array(40))
    data = plotted_data(plots.figure_spectrum(run_dir))
    assert float(np.trapezoid(data["density"], data["grid"])) == pytest.approx(1.0, abs=1e-6)
    data = plotted_data(plots.figure_top_edge_density(run_dir))
    assert float((data["density"] * np.diff(data["edges"])).sum()) == pytest.approx(40.0)
    # the top edge: nodes 9 and 8 (4 eigenvalues each) hold the top 5 eigenvalues
    data = plotted_data(plots.figure_top_edge_density(run_dir, n_top=5))
    assert float((data["density"] * np.diff(data["edges"])).sum()) == pytest.approx(8.0)
    assert data["edges"][0] == pytest.approx(np.log10(8.0))


def test_fig6_top_eigenvector_coloured_by_layer(run_dir, tmp_path):
    figure = plots.figure_top_eigenvector(run_dir)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    assert list(data) == [0, 100, 200]  # the paper's 0, 100, 200, 400, nearest saved
    saved = torch.load(run_dir / "eigenvectors" / "step_00000100.pt")["vectors"][:, 0].double()
    v = data[100]["vector"]
    np.testing.assert_allclose(np.abs(v), saved.abs().numpy(), rtol=1e-6)
    assert v[np.argmax(np.abs(v))] > 0
    groups = data[100]["groups"]
    assert list(groups) == ["layer 1 weights", "layer 1 biases", "top layer weights",
                            "top layer biases"]
    np.testing.assert_array_equal(np.concatenate(list(groups.values())), v)
    assert [line.get_label() for line in figure.axes[0].get_lines()][:4] == list(groups)


def test_fig7_top_layer_only(run_dir, tmp_path):
    figure = plots.figure_top_layer_eigenvector(run_dir, steps=[0, 200])
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    assert list(data) == [0, 200]
    groups = data[200]["groups"]
    assert list(groups) == ["top layer weights", "top layer biases"]
    np.testing.assert_array_equal(groups["top layer weights"], data[200]["vector"][25:40])


def test_overlap_g_Hg_companion(run_dir, metrics, tmp_path):
    figure = plots.figure_overlap_g_Hg(run_dir, last_n=100)
    assert_png(figure, tmp_path / "f.png")
    data = plotted_data(figure)
    minibatch = pd.read_csv(run_dir / "minibatch.csv")
    np.testing.assert_array_equal(data["minibatch"]["overlap"], minibatch["minibatch/overlap_g_Hg"])
    np.testing.assert_array_equal(data["full"]["overlap"], metrics["hessian/overlap_g_Hg"])
    np.testing.assert_array_equal(data["test"]["overlap"], metrics["test/overlap_g_Hg"])


def test_a_loaded_run_is_accepted_too(run_dir):
    data = plotted_data(plots.figure_lambda_max(load_run(run_dir)))
    assert data["step"][-1] == 300


def test_missing_data_is_reported(tmp_path):
    bare = write_run(tmp_path / "bare", vectors=False, spectrum=False)
    with pytest.raises(MissingDataError, match="need eigenvectors/step_"):
        plots.figure_top_eigenvector(bare)
    with pytest.raises(MissingDataError, match=r"needs spectrum\.npz"):
        plots.figure_spectrum(bare)
    with pytest.raises(MissingDataError, match=r"needs spectrum\.npz"):
        plots.figure_top_edge_density(bare)


def test_every_registered_figure_draws(run_dir):
    assert set(plots.DEFAULT_FIGURES) <= set(plots.FIGURES)
    for key in plots.DEFAULT_FIGURES:
        assert isinstance(plots.FIGURES[key].draw(run_dir), Figure)
    assert plots.figure_filename("1") == "fig01_f_top"


def test_choose_steps_and_groups():
    assert choose_steps([0, 10, 50, 120], [0, 50, 100, 200]) == [0, 50, 120]
    assert choose_steps([], [0]) == []
    groups = label_parameters(["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight"],
                              [[2, 1, 3, 3], [2], [2], [2], [10, 2]])
    # a batch norm belongs to the layer before it (as models.parameter_groups labels it)
    assert [g.label for g in groups] == [
        "layer 1 weights", "layer 1 biases", "layer 1 batch-norm scales",
        "layer 1 batch-norm shifts", "top layer weights"]
    assert [(g.start, g.stop) for g in groups] == [(0, 18), (18, 20), (20, 22), (22, 24),
                                                   (24, 44)]
    with pytest.raises(ValueError, match="2 parameter names but 1 shapes"):
        label_parameters(["a.weight", "a.bias"], [[1]])


def test_no_steps_to_draw_is_a_clear_error(run_dir):
    with pytest.raises(ValueError, match="at least one panel"):
        plots.figure_c2(run_dir, steps=())
    with pytest.raises(ValueError, match="at least one panel"):
        plots.figure_top_eigenvector(run_dir, steps=[])


def test_vector_steps_exist():
    assert VECTOR_STEPS == (0, 100, 200)


def test_fig4_reads_what_spectral_density_stores(tmp_path):
    from tinysubspace.linalg.density import spectral_density
    from tinysubspace.operator import DenseOperator

    run_dir = write_run(tmp_path / "stored", spectrum=False)
    A = torch.diag(torch.linspace(0, 1, 30, dtype=torch.float64))
    arrays = density_arrays(spectral_density(DenseOperator(A), steps=10, probes=2), sigma=0.05)
    np.savez(run_dir / "spectrum.npz", **arrays)
    data = plotted_data(plots.figure_spectrum(run_dir))
    np.testing.assert_array_equal(data["grid"], arrays["grid"])
    np.testing.assert_array_equal(data["density"], arrays["density"])


def test_fig11_sums_the_c2_columns_not_f_top(tmp_path):
    """The panel's Σ c_i² comes from the c_i² columns: with f_top set to another value the sums
    do not move (the fixture's f_top equals Σ top-k c_i² by construction, so it cannot tell)."""
    run_dir = write_run(tmp_path / "r", vectors=False, spectrum=False)
    table = pd.read_csv(run_dir / "metrics.csv")
    table["hessian/f_top"] = 0.123
    table.to_csv(run_dir / "metrics.csv", index=False)
    data = plotted_data(plots.figure_c2(run_dir, steps=(50,)))[50]
    c2 = table.loc[table["step"] == 50, [f"hessian/c2_{i}" for i in range(1, 2 * K + 1)]]
    c2 = c2.to_numpy(float)[0]
    assert data["sum_top"] == pytest.approx(c2[:K].sum(), rel=1e-12)
    assert data["sum_next"] == pytest.approx(c2[K:].sum(), rel=1e-12)
    assert abs(data["sum_top"] - 0.123) > 0.1


def test_measured_c2_sum_to_f_top_and_f_next():
    """What Fig. 11 writes on its panels: Σ_{i≤k} c_i² = f_top and Σ_{k<i≤2k} c_i² = f_next
    (eqs. 2 and 12), on a real measurement of a small float64 network."""
    from tinysubspace.experiments.config import TrackerConfig
    from tinysubspace.experiments.tracker import Tracker

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 4, generator=gen, dtype=torch.float64), torch.arange(40) % 3
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    tracker = Tracker(TrackerConfig(k=3, tol=1e-10, anchors=(), save_vectors_at=()),
                      torch.nn.functional.cross_entropy, (X, Y))
    row = tracker.measure(model, 0).row
    c2 = np.array([row[f"hessian/c2_{i}"] for i in range(1, 7)])
    assert c2[:3].sum() == pytest.approx(row["hessian/f_top"], abs=1e-12)
    assert c2[3:].sum() == pytest.approx(row["hessian/f_next"], abs=1e-12)
    assert 0 < row["hessian/f_top"] < 1


@pytest.mark.parametrize("rows", [0, 1])
def test_runs_with_too_few_measurements_get_a_message_not_empty_panels(tmp_path, rows, capsys):
    from tinysubspace.cli.main import main
    from tinysubspace.plots.figures import too_few_measurements
    from tinysubspace.plots.report import render_report

    run_dir = write_run(tmp_path / "r", spectrum=False, minibatch=False)
    table = pd.read_csv(run_dir / "metrics.csv").head(rows)
    table.to_csv(run_dir / "metrics.csv", index=False)
    message = too_few_measurements(load_run(run_dir))
    assert message is not None and ("no measurements" if rows == 0 else
                                    "one measurement (step 0)") in message
    assert "need at least two" in message and "'finished' at step 300" in message
    assert main(["plot", str(run_dir), "--figure", "1"]) == 1
    err = capsys.readouterr().err
    assert "note: " in err and "error: Fig. 1: too few measurements" in err
    assert not (run_dir / "figures" / "fig01_f_top.png").exists()
    assert main(["plot", str(run_dir)]) == 0  # what can be drawn still is (Fig. 6: vectors)
    assert (run_dir / "figures" / "fig06_top_eigenvector.png").exists()
    assert not (run_dir / "figures" / "fig01_f_top.png").exists()
    page = render_report(run_dir, figures=("1", "8"), dpi=20)
    assert "Figures over training are not drawn" in page and "data:image/png" not in page
    assert too_few_measurements(load_run(write_run(tmp_path / "full"))) is None


# ------------------------------------------------------------- issue 16: as the paper measured
def test_fig3_averages_over_the_interval_not_the_schedule(run_dir, metrics, tmp_path):
    """overlap = exp(-(t2 - t1) d / 500) in the fixture: the interval average over [t1, 300] is
    500 / (d (300 - t1)) (1 - exp(-(300 - t1) d / 500)); thinning the late measurements (a
    sparser schedule) leaves it, while the plain mean of the measurements moves."""
    data = plotted_data(plots.figure_overlap_vs_dimension(run_dir))
    dims = np.arange(2, 2 * K + 1)
    for t1 in ANCHORS:
        span = 300 - t1
        exact = 500 / (dims * span) * (1 - np.exp(-span * dims / 500))
        np.testing.assert_allclose(data[t1]["overlap"], exact, rtol=2e-3)
    sparse = write_run(tmp_path / "sparse")
    table = pd.read_csv(sparse / "metrics.csv")
    keep = (table["step"] <= 100) | (table["step"] % 50 == 0)  # every 10, then every 50
    table[keep].to_csv(sparse / "metrics.csv", index=False)
    thinned = plotted_data(plots.figure_overlap_vs_dimension(sparse))
    by_rows = plotted_data(plots.figure_overlap_vs_dimension(sparse, average="measurements"))
    exact = 500 / (dims * 300) * (1 - np.exp(-300 * dims / 500))
    np.testing.assert_allclose(thinned[0]["overlap"], exact, rtol=1e-2)
    assert np.all(np.abs(by_rows[0]["overlap"] - exact) > 0.05)  # weighted by the schedule
    with pytest.raises(ValueError, match="average must be interval or measurements"):
        plots.figure_overlap_vs_dimension(run_dir, average="mean")


def test_interval_mean_by_hand():
    t2 = np.array([100.0, 110.0, 200.0, 400.0])
    values = np.array([1.0, 0.8, 0.6, np.nan])  # the NaN point is left out: [100, 200]
    assert plots.interval_mean(t2, values, 100) == pytest.approx((0.9 * 10 + 0.7 * 90) / 100)
    assert np.isnan(plots.interval_mean(t2[:1], values[:1], 100))  # no interval


def test_fig1_step_axis_is_symlog_for_long_runs(tmp_path):
    short = plots.figure_f_top(write_run(tmp_path / "short", last_step=300))
    long_run = write_run(tmp_path / "long", last_step=1500)
    long = plots.figure_f_top(long_run)
    assert short.axes[0].get_xscale() == "linear"
    assert long.axes[0].get_xscale() == long.axes[1].get_xscale() == "symlog"
    x, _ = line_data(long.axes[0])
    np.testing.assert_array_equal(x, np.arange(0, 1501, 10))  # the data is unchanged
    assert plots.figure_f_top(long_run, x_scale="linear").axes[0].get_xscale() == "linear"
    assert plots.step_scale(1500, "auto") == "symlog" and plots.step_scale(1000) == "linear"
    with pytest.raises(ValueError, match="x_scale must be auto, linear or symlog"):
        plots.step_scale(10, "log")


def _spectrum_run(tmp_path, name, seed=0, **arrays):
    path = write_run(tmp_path / name, spectrum=False, vectors=False, seed=seed)
    np.savez(path / "spectrum.npz", **arrays)
    return path


def test_fig5_from_lanczos_top_eigenvalues_of_several_realizations(tmp_path):
    # two runs (realizations) of 5 Lanczos eigenvalues; per realization 5 eigenvalues in all
    a = _spectrum_run(tmp_path, "a", top_eigenvalues=np.array([10.0, 5.0, 4.0, 0.1, 0.01]))
    b = _spectrum_run(tmp_path, "b", top_eigenvalues=np.array([12.0, 6.0, 2.0, 0.2, 0.02]))
    data = plotted_data(plots.figure_top_edge_density([a, b], bins=10))
    assert data["source"] == "lanczos" and data["realizations"] == 2
    mass = float((data["density"] * np.diff(data["edges"])).sum())
    assert mass == pytest.approx(5.0)  # eigenvalues per realization
    assert data["edges"][0] == pytest.approx(np.log10(0.01))
    assert data["edges"][-1] == pytest.approx(np.log10(12.0))
    assert data["lambda_k"] == pytest.approx((4.0 + 2.0) / 2)  # k = 3: mean λ_3
    top3 = plotted_data(plots.figure_top_edge_density([a, b], n_top=3, bins=10))
    assert float((top3["density"] * np.diff(top3["edges"])).sum()) == pytest.approx(3.0)


def test_fig5_lanczos_with_slq_overlaid_on_the_same_bins(tmp_path):
    nodes = np.array([[0.01, 1.0, 8.0]])
    weights = np.array([[0.9, 0.05, 0.05]])  # dimension 40: 2 eigenvalues near 8, 2 near 1
    run = _spectrum_run(tmp_path, "both", top_eigenvalues=np.array([9.0, 7.0, 1.5, 0.5]),
                        nodes=nodes, weights=weights, dimension=np.array(40))
    data = plotted_data(plots.figure_top_edge_density(run, bins=8))
    assert data["source"] == "lanczos"
    np.testing.assert_array_equal(data["slq"]["edges"], data["edges"])
    slq_mass = float((data["slq"]["density"] * np.diff(data["edges"])).sum())
    assert slq_mass == pytest.approx(4.0)  # the nodes holding the top 4: 8 (2) and 1 (2)
    only_slq = _spectrum_run(tmp_path, "slq", nodes=nodes, weights=weights,
                             dimension=np.array(40))
    assert plotted_data(plots.figure_top_edge_density(only_slq))["source"] == "slq"
    with pytest.raises(MissingDataError, match="Lanczos 'top_eigenvalues'"):
        plots.figure_top_edge_density(write_run(tmp_path / "none", spectrum=False))


def test_overlap_figure_draws_the_every_step_series(tmp_path):
    path = write_run(tmp_path / "every", vectors=False, spectrum=False)
    steps = np.arange(200, 300)
    pd.DataFrame({"step": steps, "full/overlap_g_Hg": 0.9 + 0 * steps,
                  "full/test_overlap_g_Hg": 0.7 + 0 * steps}).to_csv(
        path / "full_overlap.csv", index=False)
    data = plotted_data(plots.figure_overlap_g_Hg(path))
    assert set(data) == {"minibatch", "full", "full_every", "test", "test_every"}
    np.testing.assert_array_equal(data["full_every"]["step"], steps)
    np.testing.assert_array_equal(data["test_every"]["overlap"], np.full(100, 0.7))


def test_a_run_stores_lanczos_top_eigenvalues_equal_to_the_exact_spectrum(tmp_path):
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.training import run_experiment

    config = tiny_config(tracker__spectrum="exact", tracker__spectrum_top=6, train__steps=8)
    assert run_experiment(config, tmp_path / "run").state == "finished"
    stored = np.load(tmp_path / "run" / "spectrum.npz")
    exact = np.sort(stored["eigenvalues"])[::-1][:6]
    np.testing.assert_allclose(stored["top_eigenvalues"], exact, rtol=1e-6,
                               atol=1e-9 * exact[0])
    data = plotted_data(plots.figure_top_edge_density(tmp_path / "run"))
    assert data["source"] == "lanczos" and data["realizations"] == 1


# ------------------------------------------------------------------- issue 24, item 7
def _immutable(path) -> bool:
    """``chattr +i path`` (binds root too); ``False`` where that is not possible."""
    import shutil
    import subprocess

    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_plot_of_a_read_only_run_folder_says_use_out(tmp_path, capsys, monkeypatch):
    """Was: a 15-line OSError traceback. A real immutable folder where possible, and a write
    refused by the file system (EACCES) everywhere."""
    import errno
    import subprocess

    from tinysubspace.cli.main import main

    run = write_run(tmp_path / "ro")
    if _immutable(run):
        try:
            assert main(["plot", str(run), "--figure", "1"]) == 2
            err = capsys.readouterr().err
            assert f"cannot write the figures in {run / 'figures'}" in err
            assert "use --out DIR to write them in another folder" in err
            assert "Traceback" not in err and not (run / "figures").exists()
        finally:
            subprocess.run(["chattr", "-i", str(run)], check=True)

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(args[0]))

    monkeypatch.setattr(Figure, "savefig", refused)
    for argv in (["plot", str(run), "--figure", "2"], ["plot", str(run), str(run), "--overlay"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "(Permission denied); use --out DIR to write them in another folder" in err
    monkeypatch.undo()

    def no_write(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(run), "write_text", no_write)
    assert main(["report", str(run), "--dpi", "20"]) == 2
    assert "use --out FILE to write it elsewhere" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["plot", str(run), "--figure", "2", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "fig02_subspace_overlap.png").exists()


def test_sharpness_threshold_is_drawn_over_steps_not_at_its_last_value(tmp_path):
    """Was: one flat line at threshold[-1]; with a cosine schedule the real 2/η threshold went
    from 12,667 to 132,647. The dashed line now passes through every recorded threshold."""
    import math

    from tinysubspace.plots.eos import figure_sharpness
    from tinysubspace.results.store import RunStore

    steps, lr0, total = list(range(0, 100, 10)), 1.5e-4, 100
    lrs = [lr0 * (0.55 + 0.45 * math.cos(math.pi * s / total)) for s in steps]  # cosine
    store = RunStore(tmp_path / "cos", ["step", "train/loss", "sharpness/lambda_1",
                                        "sharpness/lambda_2", "sharpness/threshold"])
    store.create({"name": "cosine", "tracker": {"k": 2}})
    for step, lr in zip(steps, lrs, strict=True):
        store.append_metrics({"step": step, "train/loss": 1 / (1 + step),
                              "sharpness/lambda_1": 1e4 + step, "sharpness/lambda_2": 5e3,
                              "sharpness/threshold": 2 / lr})
    figure = figure_sharpness(tmp_path / "cos", labels=["x"])
    data = plotted_data(figure)["x"]
    expected = np.array([2 / lr for lr in lrs])
    (line,) = [ln for ln in figure.axes[1].get_lines()
               if str(ln.get_label()).startswith("threshold")]
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-15)
    assert expected[-1] / expected[0] > 1.5  # the schedule moved it: a flat line would be wrong
    assert line.get_label() == f"threshold {expected[0]:.4g} → {expected[-1]:.4g}"
    assert data["threshold"] == expected[-1]
    assert_png(figure, tmp_path / "sharpness.png")


def test_block_densities_have_axis_labels(tmp_path):
    """Was: panels without axis labels. Stored arrays written by hand (two blocks)."""
    from tinysubspace.plots.blocks import figure_block_densities

    run = write_run(tmp_path / "blocks", vectors=False, spectrum=False)
    (run / "blocks").mkdir()
    np.savez(run / "blocks" / "step_00000000.npz", names=np.array(["a", "b"]),
             sizes=np.array([4, 6]), nodes=np.array([0.0, 1.0, 2.0, 0.5, 3.0]),
             weights=np.array([0.5, 0.25, 0.25, 0.5, 0.5]), offsets=np.array([0, 3, 5]),
             heterogeneity=np.array(0.3))
    figure = figure_block_densities(run, columns=4)
    first, second = figure.axes[:2]
    assert first.get_xlabel() == second.get_xlabel() == (
        r"eigenvalue $\lambda$ of the block's Hessian")
    assert first.get_ylabel() == "spectral density (log)" and second.get_ylabel() == ""
    assert_png(figure, tmp_path / "blocks.png")


def test_fig2_leaves_out_anchors_the_run_never_reached(tmp_path):
    """Was: the legend listed t1 = 400 on a 250-step run (a column of NaN)."""
    run = write_run(tmp_path / "short")
    table = pd.read_csv(run / "metrics.csv")
    table["overlap/top/t1=400"] = np.nan
    table["overlap/next/t1=400"] = np.nan
    table.to_csv(run / "metrics.csv", index=False)
    figure = plots.figure_subspace_overlap(run)
    labels = figure.legends[0].get_texts()
    assert [t.get_text() for t in labels] == [f"$t_1$ = {t1}" for t1 in ANCHORS]
    assert set(plotted_data(figure)["top"]) == set(ANCHORS)
    nine = plots.figure_overlap_by_dimension(run)
    assert all(400 not in per_t1 for per_t1 in plotted_data(nine).values())


def test_compare_title_promises_a_test_curve_only_with_a_test_set(tmp_path):
    from tinysubspace.plots.projected import figure_compare

    with_test = write_run(tmp_path / "t", vectors=False, spectrum=False)
    without = write_run(tmp_path / "n", vectors=False, spectrum=False)
    table = pd.read_csv(without / "metrics.csv").drop(columns=["test/accuracy", "test/loss"])
    table.to_csv(without / "metrics.csv", index=False)
    assert figure_compare([without]).axes[1].get_title() == (
        "training accuracy (no test set measured)")
    assert figure_compare([with_test, without]).axes[1].get_title() == (
        "training accuracy (test: dashed)")
