"""Per-block curvature (issue 14): block spectra against ``eigh`` of the dense diagonal blocks,
Hutchinson traces against exact traces, the heterogeneity score on synthetic block-diagonal
operators with known spectra (identical blocks give 0; Gaussians far apart give 1; in between
against an independent numerical integral), and the model-facing blocks of a GPT, an encoder
layer, an FC net and a ConvNet."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.stats
import torch
from torch import nn

import tinysubspace as ts
from test_transformers import encoder_problem, gpt_problem, reference
from tinysubspace.linalg.blocks import (
    RestrictedOperator,
    block_heterogeneity,
    block_spectrum,
    density_trace,
    heterogeneity_matrix,
    hutchinson_trace,
    js_distance,
)
from tinysubspace.problems.models.blocks import BlockPart, parameter_blocks

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]


def _block_diagonal(spectra: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
    mats = [Q @ torch.diag(d) @ Q.T for d, Q in
            zip(spectra, [_orthogonal(len(d), s) for d, s in zip(spectra, seeds, strict=True)],
                strict=True)]
    return torch.block_diag(*mats)


def _ranges(sizes: list[int]) -> list[torch.Tensor]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [torch.arange(a, a + n) for a, n in zip(starts, sizes, strict=True)]


# ------------------------------------------------------------------- the pure block maths
def test_restricted_operator_is_the_diagonal_block():
    A = _block_diagonal([torch.linspace(-1, 3, 7, dtype=F64)], [0])
    idx = torch.tensor([5, 0, 2])
    R = RestrictedOperator(ts.DenseOperator(A), idx)
    assert R.shape == (3, 3)
    assert torch.allclose(R @ torch.eye(3, dtype=F64), A[idx][:, idx], atol=1e-15)
    with pytest.raises(ValueError, match=r"indices in \[0, 7\)"):
        RestrictedOperator(ts.DenseOperator(A), [7])
    with pytest.raises(ValueError, match="must not repeat"):
        RestrictedOperator(ts.DenseOperator(A), [1, 1])


@pytest.mark.parametrize("exact_size", [0, 1000])
def test_block_eigenvalues_and_traces_of_a_block_diagonal_operator(exact_size):
    spectra = [torch.linspace(0.1, 5.0, 80, dtype=F64), torch.logspace(-3, 1, 90, dtype=F64),
               torch.cat([torch.tensor([20.0, 7.0], dtype=F64), torch.zeros(68, dtype=F64)])]
    A = _block_diagonal(spectra, [1, 2, 3])
    op = ts.DenseOperator(A)
    for d, idx in zip(spectra, _ranges([80, 90, 70]), strict=True):
        block = RestrictedOperator(op, idx)
        result = block_spectrum(block, k=4, steps=40, probes=30, seed=5, tol=1e-10,
                                exact_size=exact_size)
        expected = torch.sort(d, descending=True).values[:4]
        assert torch.allclose(result.values, expected, rtol=1e-8, atol=1e-10)
        true_trace = float(d.sum())
        if exact_size:  # formed: exact
            assert result.trace.value == pytest.approx(true_trace, rel=1e-12)
            assert result.trace.stderr == 0 and result.density.probe == "exact"
        else:  # the SLQ probes' Hutchinson samples are those of hutchinson_trace
            direct = hutchinson_trace(ts.DenseOperator(A[idx][:, idx]), probes=30, seed=5)
            assert torch.allclose(result.trace.samples, direct.samples, rtol=1e-9)
            assert abs(result.trace.value - true_trace) < 5 * result.trace.stderr
            assert result.trace.stderr > 0


def test_hutchinson_trace_statistics():
    A = _block_diagonal([torch.linspace(-2, 4, 50, dtype=F64)], [7])
    est = hutchinson_trace(ts.DenseOperator(A), probes=400, seed=1)
    # Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for Rademacher z
    var = 2 * float(A.square().sum() - A.diagonal().square().sum())
    assert est.stderr == pytest.approx(math.sqrt(var / 400), rel=0.15)
    assert abs(est.value - float(A.trace())) < 4 * est.stderr
    assert math.isnan(hutchinson_trace(ts.DenseOperator(A), probes=1).stderr)
    with pytest.raises(ValueError, match="probes must be at least 1"):
        hutchinson_trace(ts.DenseOperator(A), probes=0)


def test_density_trace_of_an_exact_density_is_the_trace():
    d = torch.tensor([3.0, -1.0, 0.5], dtype=F64)
    result = block_spectrum(ts.DenseOperator(torch.diag(d)), k=2)
    assert density_trace(result.density).value == pytest.approx(2.5, rel=1e-14)
    assert result.values.tolist() == pytest.approx([3.0, 0.5])
    assert result.eigenvalues is result.values  # the old name still reads


@pytest.mark.parametrize("exact_size", [0, 1000])
def test_identical_blocks_have_zero_heterogeneity(exact_size):
    d = torch.logspace(-2, 1, 60, dtype=F64)
    A = torch.block_diag(*[_block_diagonal([d], [4])] * 3)  # three copies, same basis
    op = ts.DenseOperator(A)
    densities = [block_spectrum(RestrictedOperator(op, idx), k=2, steps=30, probes=3, seed=0,
                                exact_size=exact_size).density for idx in _ranges([60] * 3)]
    assert block_heterogeneity(densities) < 1e-12  # (the big product rounds a little apart)
    same = [block_spectrum(ts.DenseOperator(A[:60, :60]), k=2, steps=30, probes=3, seed=0,
                           exact_size=exact_size).density for _ in range(3)]
    assert block_heterogeneity(same) == 0.0
    if exact_size:  # exact densities depend on the spectrum only, not on the basis
        other = _block_diagonal([d], [9])
        twin = block_spectrum(ts.DenseOperator(other), exact_size=exact_size).density
        assert block_heterogeneity([densities[0], twin]) < 1e-12


def _gaussian_js(delta: float, sigma: float) -> float:
    """JS distance (base 2) of N(0, σ²) and N(δ, σ²), by numerical integration (scipy)."""
    p = scipy.stats.norm(0, sigma).pdf
    q = scipy.stats.norm(delta, sigma).pdf

    def integrand(t: float) -> float:
        a, b = p(t), q(t)
        m = (a + b) / 2
        return sum(0.5 * x * math.log2(x / m) for x in (a, b) if x > 0)

    value, _ = scipy.integrate.quad(integrand, -12 * sigma, delta + 12 * sigma, limit=200)
    return math.sqrt(value)


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.5])
def test_heterogeneity_of_two_point_spectra_matches_an_integral(delta):
    """Blocks with all eigenvalues at 0 and at ``δ``: their broadened densities are two
    Gaussians, whose JS distance is integrated independently."""
    sigma = 0.4
    blocks = [block_spectrum(ts.DenseOperator(torch.full((3,), x, dtype=F64).diag())).density
              for x in (0.0, delta)]
    matrix = heterogeneity_matrix(blocks, points=4000, sigma=sigma)
    assert float(matrix[0, 1]) == pytest.approx(_gaussian_js(delta, sigma), rel=1e-3)
    assert matrix[0, 0] == 0 and matrix[1, 0] == matrix[0, 1]


def test_heterogeneity_is_the_mean_over_pairs():
    dens = [block_spectrum(ts.DenseOperator(torch.diag(torch.tensor(v, dtype=F64)))).density
            for v in ([0.0, 1.0], [0.0, 1.0], [50.0, 60.0])]
    matrix = heterogeneity_matrix(dens)
    assert float(matrix[0, 1]) == 0.0
    assert float(matrix[0, 2]) == pytest.approx(1.0, abs=1e-9)  # far apart: disjoint supports
    assert block_heterogeneity(dens) == pytest.approx((0 + 1 + 1) / 3, abs=1e-9)
    with pytest.raises(ValueError, match="need at least 2, got 1"):
        block_heterogeneity(dens[:1])


def test_js_distance():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    m = (p + q) / 2
    kl = sum(0.5 * float(a * math.log2(a / b)) for a, b in zip(p, m, strict=True) if a > 0)
    assert js_distance(p, q) == pytest.approx(math.sqrt(2 * kl), rel=1e-12)
    assert js_distance(p, 3 * p) == 0.0
    with pytest.raises(ValueError, match="different shapes"):
        js_distance(p, q[:2])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        js_distance(p, -q)


# ------------------------------------------------------------------------ model blocks
def _gpt():
    return gpt_problem().model


def test_gpt_blocks_by_module_layer_and_type():
    model = _gpt()
    auto = parameter_blocks(model, "auto")
    assert list(auto)[:4] == ["wte", "wpe", "h.0.ln_1", "h.0.attn.query"]
    assert [p.name for p in auto["h.0.attn.query"]] == ["h.0.attn.query.weight",
                                                        "h.0.attn.query.bias"]
    layers = parameter_blocks(model, "layers")
    assert list(layers) == ["wte", "wpe", "h.0", "ln_f"]
    types = parameter_blocks(model, "types")
    assert list(types) == ["embeddings", "query_key", "value_output", "mlp", "norms"]
    assert {p.name for p in types["value_output"]} == {
        "h.0.attn.value.weight", "h.0.attn.value.bias", "h.0.attn.proj.weight",
        "h.0.attn.proj.bias"}
    every = [p.name for parts in types.values() for p in parts]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())


def test_fused_attention_projection_is_split_by_rows():
    layer = encoder_problem().model
    auto = parameter_blocks(layer, "auto")
    assert auto["self_attn.key"] == (BlockPart("self_attn.in_proj_weight", (4, 8)),
                                     BlockPart("self_attn.in_proj_bias", (4, 8)))
    types = parameter_blocks(layer, "types")
    assert [p.rows for p in types["query_key"]] == [(0, 4), (4, 8), (0, 4), (4, 8)]
    assert types["value_output"][0] == BlockPart("self_attn.in_proj_weight", (8, 12))
    assert "self_attn.out_proj.weight" in {p.name for p in types["value_output"]}


def test_fc_and_convnet_blocks():
    fc = ts.build_model("fc", (64,), 10)
    assert list(parameter_blocks(fc)) == ["hidden1", "hidden2", "top"]
    assert list(parameter_blocks(fc, "types")) == ["mlp"]
    cnn = ts.build_model("convnet", (1, 12, 12), 10, batchnorm=True)
    assert list(parameter_blocks(cnn, "types")) == ["mlp", "convolutions", "norms"]


def test_explicit_blocks_are_validated():
    model = _gpt()
    blocks = parameter_blocks(model, {"e": ["wte.weight"], "q": [("h.0.attn.query.weight",
                                                                   (0, 2))]})
    assert blocks["q"] == (BlockPart("h.0.attn.query.weight", (0, 2)),)
    with pytest.raises(ValueError, match=r"unknown parameter 'lm_head\.weight'"):
        parameter_blocks(model, {"head": ["lm_head.weight"]})  # tied: listed as wte.weight
    with pytest.raises(ValueError, match="already in another block"):
        parameter_blocks(model, {"a": ["wte.weight"], "b": ["wte.weight"]})
    with pytest.raises(ValueError, match="without '/'"):
        parameter_blocks(model, {"query/key": ["wte.weight"]})
    with pytest.raises(ValueError, match=r"rows \(3, 9\) outside"):
        parameter_blocks(model, {"q": [("h.0.attn.query.weight", (3, 9))]})
    with pytest.raises(ValueError, match="blocks must be one of"):
        parameter_blocks(model, "heads")


def _dense_block(name: str, model, blocks) -> dict[str, torch.Tensor]:
    """The dense diagonal sub-blocks of the reference Hessian of problem ``name``."""
    f, H = reference(name)
    offsets, start = {}, 0
    for pname, shape in zip(f.names, f.shapes, strict=True):
        offsets[pname] = (start, shape)
        start += shape.numel()
    out = {}
    for key, parts in parameter_blocks(model, blocks).items():
        idx = []
        for part in parts:
            a, shape = offsets[part.name]
            per_row = math.prod(shape[1:])
            lo, hi = part.rows or (0, shape[0])
            idx.append(torch.arange(a + lo * per_row, a + hi * per_row))
        idx = torch.cat(idx)
        out[key] = H[idx][:, idx]
    return out


@pytest.mark.parametrize(("problem", "blocks"), [("gpt", "auto"), ("gpt", "types"),
                                                 ("encoder", "types")])
@pytest.mark.slow
def test_block_spectra_match_eigh_of_the_dense_diagonal_blocks(problem, blocks):
    built = {"gpt": gpt_problem, "encoder": encoder_problem}[problem]()
    result = ts.block_spectra(built.model, built.loss_fn, built.data, blocks, k=3, steps=12,
                              probes=3, tol=1e-10, exact_size=20)
    dense = _dense_block(problem, built.model, blocks)
    assert list(result.blocks) == list(dense)
    for key, Hbb in dense.items():
        got = result.blocks[key]
        expected = torch.linalg.eigvalsh(Hbb).flip(0)[:3]
        assert got.size == Hbb.shape[0]
        assert torch.allclose(got.values, expected, rtol=1e-7, atol=1e-9), key
        if got.density.probe == "exact":
            assert got.trace.value == pytest.approx(float(Hbb.trace()), rel=1e-10, abs=1e-12)
        else:  # the Hutchinson samples of the same probes on the dense block
            direct = hutchinson_trace(ts.DenseOperator(Hbb), probes=3, seed=0)
            assert torch.allclose(got.trace.samples, direct.samples, rtol=1e-8, atol=1e-10)
    B = len(dense)
    assert result.heterogeneity == pytest.approx(float(result.distances.sum()) / (B * (B - 1)))
    assert 0 < result.heterogeneity <= 1 and 0 < result.normalized_heterogeneity <= 1


def test_block_measurements_are_flat_columns():
    built = gpt_problem()
    row = ts.block_measurements(built.model, built.loss_fn, built.data, "layers", k=2,
                                steps=8, probes=2, exact_size=40)
    dense = _dense_block("gpt", built.model, "layers")
    for key, Hbb in dense.items():
        top = torch.linalg.eigvalsh(Hbb).flip(0)
        assert row[f"block/{key}/eig_1"] == pytest.approx(float(top[0]), rel=1e-6)
        assert row[f"block/{key}/size"] == Hbb.shape[0]
        assert f"block/{key}/trace" in row and f"block/{key}/trace_se" in row
    assert 0 < row["blocks/heterogeneity"] <= 1
    assert 0 < row["blocks/heterogeneity_normalized"] <= 1
    single = ts.block_spectra(built.model, built.loss_fn, built.data, {"all": ["wte.weight"]},
                              k=1, exact_size=40)
    assert math.isnan(single.heterogeneity)


def test_block_spectra_leave_the_model_unchanged():
    with torch.random.fork_rng():
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).train()
    before = [p.detach().clone() for p in model.parameters()]
    X = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    Y = torch.randint(2, (10,), generator=torch.Generator().manual_seed(1))
    ts.block_spectra(model, nn.functional.cross_entropy, (X, Y), k=1)
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                                    strict=True))


# --------------------------------------------------------- a run's blocks, stored and drawn
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A tiny GPT run on pydoc-chars (seconds), with its block spectra at init and final."""
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.block_runs import measure_run_blocks
    from tinysubspace.experiments.training import run_experiment

    config = tiny_config(**{"data.name": "pydoc-chars", "data.n_train": None,
                            "data.block_size": 8, "data.max_chars": 161, "model.name": "gpt",
                            "model.n_layer": 1, "model.n_embd": 8, "train.loss":
                            "token_cross_entropy", "optim.name": "adam", "optim.lr": 0.01,
                            "optim.batch_size": 4, "train.steps": 8, "tracker.k": 2,
                            "tracker.tol": 1e-6, "tracker.anchors": "0",
                            "tracker.save_vectors_at": "0"})
    path = tmp_path_factory.mktemp("runs") / "gpt"
    with torch.random.fork_rng():
        assert run_experiment(config, path).state == "finished"
    files = measure_run_blocks(path, ("init", "final", 4), blocks="types", k=2, steps=6,
                               probes=2, exact_size=20)
    return path, config, files


@pytest.mark.slow
def test_run_blocks_are_those_of_the_runs_models(gpt_run):
    from tinysubspace.experiments.build import build_problem
    from tinysubspace.plots.blocks import block_steps, load_blocks

    path, config, files = gpt_run
    assert [f.name for f in files] == ["step_00000000.npz", "step_00000008.npz",
                                       "step_00000004.npz"]
    assert block_steps(path) == [0, 4, 8]
    problem = build_problem(config)
    X, Y = problem.tensors("train")
    assert X.shape == (20, 8)
    for step in (0, 8):
        if step == 8:
            state = torch.load(path / "checkpoint.pt", weights_only=False)["model"]
            problem.model.load_state_dict(state)
        direct = ts.block_spectra(problem.model, problem.loss_fn, (X, Y), "types", k=2,
                                  steps=6, probes=2, exact_size=20, dtype=F64, batch_size=4096)
        stored = load_blocks(path, step)
        assert list(stored["names"]) == direct.names
        for i, spectrum in enumerate(direct.blocks.values()):
            assert stored["eigenvalues"][i].tolist() == pytest.approx(
                spectrum.values.tolist(), rel=1e-9)
            assert stored["trace"][i] == pytest.approx(spectrum.trace.value, rel=1e-9)
            nodes, weights = stored["densities"][i]
            assert np.allclose(nodes, spectrum.density.nodes.reshape(-1).numpy())
            assert weights.sum() == pytest.approx(1.0)
        assert float(stored["heterogeneity"]) == pytest.approx(direct.heterogeneity, rel=1e-9)
    table = pd.read_csv(path / "blocks.csv")
    assert table["step"].tolist() == [0, 4, 8]
    assert table["block/embeddings/eig_1"].tolist() == pytest.approx(
        [float(load_blocks(path, s)["eigenvalues"][0, 0]) for s in (0, 4, 8)])


def test_retraining_reproduces_the_runs_model(gpt_run):
    """An intermediate step is reached by training again: to the last step, that is the run's
    own checkpoint, to the last digit."""
    from tinysubspace.experiments.block_runs import _retrain
    from tinysubspace.experiments.build import build_problem

    path, config, _ = gpt_run
    model = build_problem(config).model
    with torch.random.fork_rng():
        assert _retrain(config, 8, model, None) == 8
    saved = torch.load(path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[name], value) for name, value in model.state_dict().items())


def test_block_figures_draw_the_stored_arrays(gpt_run):
    from tinysubspace.plots.blocks import (
        figure_block_densities,
        figure_block_heterogeneity,
        figure_block_sharpness,
        load_blocks,
        plotted_data,
        stored_heterogeneity,
    )

    path, _, _ = gpt_run
    densities = plotted_data(figure_block_densities(path))
    assert set(densities) == {(n, s) for n in ts.parameter_blocks(gpt_problem().model, "types")
                              for s in (0, 4, 8)}
    grid, values = densities[("mlp", 8)]
    assert float(np.sum(values) * (grid[1] - grid[0])) == pytest.approx(1.0, rel=1e-3)
    sharp = plotted_data(figure_block_sharpness(path))
    assert sharp["norms"][0].tolist() == [0, 4, 8]
    assert sharp["norms"][1][2] == pytest.approx(float(load_blocks(path, 8)["eigenvalues"][4, 0]))
    bars = plotted_data(figure_block_heterogeneity([path, path], labels=["a", "b"]))
    stored = load_blocks(path, 0)
    assert bars["raw"]["a"][0] == pytest.approx(float(stored["heterogeneity"]))
    assert bars["normalized"]["b"][0] == pytest.approx(float(stored["heterogeneity_normalized"]))
    old = {k: v for k, v in stored.items() if not k.startswith("heterogeneity")}
    assert stored_heterogeneity(old) == pytest.approx(float(stored["heterogeneity"]), rel=1e-9)
    assert stored_heterogeneity(old, normalized=True) == pytest.approx(
        float(stored["heterogeneity_normalized"]), rel=1e-9)


def test_run_blocks_errors(tmp_path, gpt_run):
    from tinysubspace.experiments.block_runs import measure_run_blocks
    from tinysubspace.plots.blocks import figure_block_densities, load_blocks
    from tinysubspace.plots.common import MissingDataError
    from tinysubspace.results.store import RunStoreError

    with pytest.raises(RunStoreError, match="holds no run"):
        measure_run_blocks(tmp_path)
    with pytest.raises(ValueError, match="at must hold 'init', 'final' or step numbers"):
        measure_run_blocks(gpt_run[0], at=("middle",))
    with pytest.raises(MissingDataError, match="no block spectra at step 3"):
        load_blocks(gpt_run[0], 3)
    from run_fixtures import write_run

    plain = write_run(tmp_path / "plain")
    with pytest.raises(MissingDataError, match="tinysubspace blocks"):
        figure_block_densities(plain)


def test_blocks_command(gpt_run, capsys):
    from tinysubspace.cli.main import main

    assert main(["blocks", str(gpt_run[0]), "--at", "init", "--blocks", "layers", "--k", "1",
                 "--steps", "4", "--probes", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 0, heterogeneity" in out and "h.0:" in out


@pytest.mark.slow
def test_plot_command_draws_the_block_figures(gpt_run, tmp_path, capsys):
    from run_fixtures import write_run
    from tinysubspace.cli.main import main

    path = gpt_run[0]
    assert main(["plot", str(path), "--figure", "blocks", "--figure", "block-sharpness",
                 "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["block_densities.png",
                                                                  "block_sharpness.png"]
    assert main(["plot", str(path), "--out", str(tmp_path / "b")]) == 0  # default: with them
    assert {"block_densities.png", "block_sharpness.png"} <= {p.name for p in
                                                              (tmp_path / "b").iterdir()}
    assert main(["plot", str(path), str(path), "--heterogeneity", "--out",
                 str(tmp_path / "c")]) == 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["blocks_heterogeneity.png"]
    plain = write_run(tmp_path / "plain")
    capsys.readouterr()
    assert main(["plot", str(plain), "--figure", "blocks", "--out", str(tmp_path / "d")]) == 1
    assert "has no block spectra" in capsys.readouterr().err
    assert main(["plot", str(plain), "--heterogeneity", "--out", str(tmp_path / "d")]) == 1
    assert main(["plot", str(plain), "--out", str(tmp_path / "e")]) == 0
    assert not any("block" in p.name for p in (tmp_path / "e").iterdir())


def test_block_measurements_on_a_seeded_subset():
    from tinysubspace.experiments.block_runs import _examples

    X, Y = torch.arange(20).reshape(10, 2), torch.arange(10)
    Xs, Ys = _examples((X, Y), 4, seed=3)
    assert len(Ys.unique()) == 4 and torch.equal(Xs[:, 0] // 2, Ys)  # rows kept together
    assert torch.equal(_examples((X, Y), 4, seed=3)[1], Ys)
    assert _examples((X, Y), None, 0)[1] is Y and _examples((X, Y), 50, 0)[1] is Y
    with pytest.raises(ValueError, match="examples must be a positive number, got 0"):
        _examples((X, Y), 0, 0)


def test_normalized_heterogeneity_compares_shapes_not_sizes():
    """Blocks A and 3A: their spectra differ in size only, so the normalised score is 0 while
    the raw one is large; a block without curvature keeps its scale."""
    from tinysubspace.linalg.blocks import top_scales

    d = torch.logspace(-2, 0, 40, dtype=F64)
    A = _block_diagonal([d], [6])
    dens = [block_spectrum(ts.DenseOperator(c * A), k=1, steps=20, probes=2, seed=0,
                           exact_size=0) for c in (1.0, 3.0)]
    scales = top_scales([float(s.values[0]) for s in dens])
    assert scales == pytest.approx([1.0, 3.0], rel=1e-6)
    assert block_heterogeneity([s.density for s in dens], scales=scales) < 1e-6
    assert block_heterogeneity([s.density for s in dens]) > 0.3
    assert top_scales([2.0, 0.0, 1e-12]) == [2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="scales must be positive"):
        block_heterogeneity([s.density for s in dens], scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="2 scales for 3 blocks"):
        block_heterogeneity([dens[0].density] * 3, scales=[1.0, 1.0])
