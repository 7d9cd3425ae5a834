"""Block sharpness over training in one run (issue 14): ``tracker.blocks=...`` adds
``block/NAME/eig_i``, ``block/NAME/trace`` (and ``trace_se``, ``size``, the heterogeneity scores)
to every measurement of ``metrics.csv``. Checked against ``eigvalsh`` of the diagonal blocks of a
dense float64 Hessian of the run's models (at initialisation and at the last step), itself checked
by central finite differences of the gradient; bad settings are refused before training."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import tinysubspace as ts
from experiment_fixtures import tiny_config
from test_transformers import AttentionProblem, FlatFunction
from tinysubspace.experiments.config import ConfigError, apply_overrides
from tinysubspace.linalg.blocks import hutchinson_trace
from tinysubspace.problems.models.blocks import parameter_blocks

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
GPT = {"data.name": "pydoc-chars", "data.n_train": None, "data.context_length": 8,
       "data.max_chars": 121, "model.name": "gpt", "model.n_layer": 1, "model.n_embd": 8,
       "train.loss": "token_cross_entropy", "optim.name": "adam", "optim.lr": 0.01,
       "optim.batch_size": 4, "train.steps": 8, "tracker.k": 2, "tracker.tol": 1e-9,
       "tracker.dense_until": 8, "tracker.dense_every": 4, "tracker.anchors": "0",
       "tracker.save_vectors_at": "0", "tracker.blocks": "types", "tracker.blocks_k": 2,
       "tracker.blocks_probes": 3, "tracker.blocks_steps": 6}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny GPT run measuring its blocks at steps 0, 4 and 8 (seconds)."""
    from tinysubspace.experiments.training import run_experiment

    config = tiny_config(**GPT)
    path = tmp_path_factory.mktemp("runs") / "gpt-blocks"
    with torch.random.fork_rng():
        assert run_experiment(config, path).state == "finished"
    return path, config


def _dense_blocks(model, loss_fn, X, Y) -> tuple[dict[str, torch.Tensor], FlatFunction]:
    """Diagonal blocks (``types``) of the float64 Hessian of the mean token loss, by
    ``torch.autograd.functional.hessian``; also returns the flat loss for the FD check."""
    f = FlatFunction(AttentionProblem(model, loss_fn, (X, Y),
                                      lambda call: loss_fn(call(X), Y)))
    H = f.hessian()
    ranges, start = {}, 0
    for name, shape in zip(f.names, f.shapes, strict=True):
        ranges[name] = torch.arange(start, start + shape.numel())
        start += shape.numel()
    blocks = {}
    for key, parts in parameter_blocks(model, "types").items():
        index = torch.cat([ranges[part.name] for part in parts])
        blocks[key] = H[index][:, index]
    return blocks, f


@pytest.mark.slow
def test_block_columns_are_the_dense_diagonal_blocks_at_every_measurement(tracked_run):
    from tinysubspace.experiments.build import build_problem

    path, config = tracked_run
    metrics = pd.read_csv(path / "metrics.csv").set_index("step")
    assert metrics.index.tolist() == [0, 4, 8]
    problem = build_problem(config)
    X, Y = problem.tensors("train")
    names = list(parameter_blocks(problem.model, "types"))
    assert names == ["embeddings", "query_key", "value_output", "mlp", "norms"]
    for step in (0, 8):
        if step == 8:
            problem.model.load_state_dict(
                torch.load(path / "checkpoint.pt", weights_only=True)["model"])
        blocks, f = _dense_blocks(problem.model, problem.loss_fn, X, Y)
        if step == 0:  # the reference itself, against finite differences of the gradient
            H = f.hessian()
            error = (f.finite_difference_hessian() - H).norm() / H.norm()
            assert error < 1e-6
        row = metrics.loc[step]
        for key, Hbb in blocks.items():
            top = torch.linalg.eigvalsh(Hbb).flip(0)[:2]
            got = [row[f"block/{key}/eig_1"], row[f"block/{key}/eig_2"]]
            assert got == pytest.approx(top.tolist(), rel=1e-6, abs=1e-9), (step, key)
            assert row[f"block/{key}/size"] == Hbb.shape[0]
            if Hbb.shape[0] <= 64:  # formed and diagonalised: the exact trace
                assert row[f"block/{key}/trace"] == pytest.approx(float(Hbb.trace()), rel=1e-8)
            else:  # Hutchinson with the tracker's seed, on the dense block
                direct = hutchinson_trace(ts.DenseOperator(Hbb), probes=3, seed=0)
                assert row[f"block/{key}/trace"] == pytest.approx(direct.value, rel=1e-8)
                assert row[f"block/{key}/trace_se"] == pytest.approx(direct.stderr, rel=1e-6)
        assert 0 < row["blocks/heterogeneity"] <= 1
        assert 0 < row["blocks/heterogeneity_normalized"] <= 1
    assert metrics.filter(like="block/").notna().all().all()  # step 4 too


def test_block_sharpness_figure_reads_the_tracker_columns(tracked_run):
    from tinysubspace.plots.blocks import figure_block_sharpness, plotted_data

    path, _ = tracked_run
    metrics = pd.read_csv(path / "metrics.csv")
    data = plotted_data(figure_block_sharpness(path))
    assert list(data) == ["embeddings", "query_key", "value_output", "mlp", "norms"]
    for name, (steps, values) in data.items():
        assert steps.tolist() == [0, 4, 8]
        assert values.tolist() == metrics[f"block/{name}/eig_1"].tolist()


def test_subspace_tracker_takes_blocks_and_refuses_bad_settings():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 2))
    X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    Y = torch.randint(2, (12,), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy
    tracker = ts.SubspaceTracker(model, loss, (X, Y), k=1, schedule=[0], blocks="layers",
                                 block_options={"k": 2})
    row = tracker.on_step(0)
    for name in ("0", "2"):
        assert {f"block/{name}/eig_1", f"block/{name}/eig_2", f"block/{name}/trace"} <= set(row)
        assert f"block/{name}/eig_1" in tracker.columns
    assert "block/0/eig_1" not in ts.SubspaceTracker(model, loss, (X, Y), k=1).columns
    with pytest.raises(ValueError, match="blocks must be 'none', 'auto', 'layers' or 'types', "
                                         "got 'heads'"):
        ts.SubspaceTracker(model, loss, (X, Y), k=1, blocks="heads")
    with pytest.raises(ValueError, match=r"block_options takes \['k', 'probes', 'steps'\], "
                                         r"got \['probe'\]"):
        ts.SubspaceTracker(model, loss, (X, Y), k=1, blocks="auto", block_options={"probe": 2})
    with pytest.raises(ValueError, match=r"block_options\['k'\] must be an integer >= 1, got 0"):
        ts.SubspaceTracker(model, loss, (X, Y), k=1, blocks="auto", block_options={"k": 0})
    with pytest.raises(ConfigError, match=r"tracker\.blocks must be one of none, auto, layers, "
                                          r"types, got 'heads'"):
        apply_overrides(tiny_config(), {"tracker.blocks": "heads"})
    with pytest.raises(ConfigError, match=r"tracker\.blocks_probes must be at least 1, got 0"):
        apply_overrides(tiny_config(), {"tracker.blocks_probes": 0})
