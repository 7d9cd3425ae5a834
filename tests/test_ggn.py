"""GGNOperator and the Gauss–Newton residual H − G against dense float64 references.

References (``reference_outputs.py``): ``G = Jᵀ ∇²_z L J`` with ``J`` from
``torch.autograd.functional.jacobian`` and ``∇²_z L`` in closed form, itself checked against
autograd; ``H`` from ``torch.autograd.functional.hessian`` (``reference.py``). Every case of
``cases.CASES`` (unequal batches in every layout) to 1e-10 relative, one data pass per block,
the residual's closed form for a linear model, parameter subsets, train-mode batch norm, the
caller's model untouched, distributed against single-process, and bad input.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tinysubspace as ts
from cases import CASES, Case, CountingData
from distributed_workers import launch
from reference import FlatLoss, reference_hessian, relative_error
from reference_outputs import (
    closed_form_output_hessian,
    output_hessian,
    reference_ggn,
)

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
MODEL_LOSS = sorted({(case.model, case.loss) for case in CASES})
TOL = 1e-10


def _flat(problem, train: bool = False) -> FlatLoss:
    return FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets, train=train)


def _dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=F64)


# ------------------------------------------------------------------ the references themselves
@pytest.mark.parametrize(("model", "loss"), MODEL_LOSS, ids=[f"{m}-{l}" for m, l in MODEL_LOSS])
def test_closed_form_output_hessian_agrees_with_autograd(model, loss):
    f = _flat(Case(model, loss, "tuple").build())
    assert relative_error(closed_form_output_hessian(f, loss), output_hessian(f)) < 1e-13


def test_reference_ggn_is_the_hessian_for_a_linear_model_and_psd():
    """Softmax regression is linear in θ: ∇²z = 0, so H = G exactly; G ⪰ 0 always (convex ℓ)."""
    f = _flat(Case("softmax_regression", "ce", "tuple").build())
    assert relative_error(reference_ggn(f, "ce"), reference_hessian(f)) < 1e-13
    f = _flat(Case("mlp_softplus", "ce", "tuple").build())
    G, H = reference_ggn(f, "ce"), reference_hessian(f)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12 * float(G.norm())
    assert relative_error(G, H) > 1e-2  # the nonlinear net has a residual: the test can fail


# ------------------------------------------------------------------ products
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ggn_matches_reference(case):
    problem = case.build()
    G = reference_ggn(_flat(problem), case.loss)
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                        **problem.data_kwargs)
    assert op.shape == G.shape and op.dtype == F64
    dense = _dense(op)
    assert relative_error(dense, G) < TOL
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    assert relative_error(op @ v, G @ v) < TOL
    assert op.matvecs == G.shape[0] + 1


@pytest.mark.parametrize("case", [c for c in CASES if c.seed == 0 and c.data == "batches"],
                         ids=str)
@pytest.mark.slow
def test_residual_is_hessian_minus_ggn(case):
    problem = case.build()
    f = _flat(problem)
    H, G = reference_hessian(f), reference_ggn(f, case.loss)
    kwargs = {"dtype": F64, **problem.data_kwargs}
    one_pass = ts.GaussNewtonResidual(problem.model, problem.loss_fn, problem.data, **kwargs)
    arithmetic = (ts.HessianOperator(problem.model, problem.loss_fn, problem.data, **kwargs)
                  - ts.GGNOperator(problem.model, problem.loss_fn, problem.data, **kwargs))
    assert isinstance(arithmetic, ts.DifferenceOperator)
    scale = float(H.norm())
    for op in (one_pass, arithmetic):
        assert float((_dense(op) - (H - G)).norm()) < TOL * scale


def test_residual_vanishes_for_a_linear_model():
    problem = Case("softmax_regression", "ce", "batches").build()
    op = ts.GaussNewtonResidual(problem.model, problem.loss_fn, problem.data, dtype=F64)
    H = reference_hessian(_flat(problem))
    assert float(_dense(op).norm()) < 1e-13 * float(H.norm())


def test_a_block_takes_one_pass_over_the_data():
    problem = Case("mlp_relu", "ce", "batches").build()
    data = CountingData(list(problem.data))
    op = ts.GGNOperator(problem.model, problem.loss_fn, data, dtype=F64)
    passes = data.passes  # construction counts the examples once
    op @ torch.ones(op.shape[0], 6, dtype=F64)
    assert data.passes == passes + 1


def test_unequal_batches_are_weighted_by_size():
    """Averaging the per-batch GGNs with equal weights (a plausible bug) is far off."""
    problem = Case("mlp_softplus", "mse", "batches").build()
    per_batch = [reference_ggn(FlatLoss(problem.model, problem.loss_fn, X, Y), "mse")
                 for X, Y in problem.data]
    G = reference_ggn(_flat(problem), "mse")
    assert relative_error(sum(per_batch) / len(per_batch), G) > 1e-3
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    assert relative_error(_dense(op), G) < TOL


def test_parameter_subset_is_the_principal_submatrix():
    problem = Case("mlp_layernorm", "ce", "loader").build()
    G = reference_ggn(_flat(problem), "ce")
    names = [name for name, _ in problem.model.named_parameters()]
    chosen = [names[0], names[-1]]
    sizes = [p.numel() for p in problem.model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    index = torch.cat([torch.arange(starts[0], starts[0] + sizes[0]),
                       torch.arange(starts[-1], starts[-1] + sizes[-1])])
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, params=chosen, dtype=F64)
    assert relative_error(_dense(op), G[index][:, index]) < TOL


def test_train_mode_batch_norm_with_one_batch():
    """Train-mode batch norm: the GGN of the batch-statistics network (one batch = reference)."""
    problem = Case("cnn_batchnorm", "ce", "tuple").build()
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}
    op = ts.GGNOperator(problem.model, problem.loss_fn, (problem.inputs, problem.targets),
                        dtype=F64, mode="train")
    G = reference_ggn(_flat(problem, train=True), "ce")
    assert relative_error(_dense(op), G) < TOL
    assert relative_error(G, reference_ggn(_flat(problem), "ce")) > 1e-3  # modes differ
    after = problem.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert not problem.model.training


def test_float32_model_is_measured_in_float64_and_left_untouched():
    problem = Case("mlp_softplus", "ce", "tuple").build()
    snapshot = copy.deepcopy(problem.model.state_dict())
    problem.model.train()
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                        **problem.data_kwargs)
    with torch.no_grad():  # later training does not change the snapshot
        for p in problem.model.parameters():
            p.add_(1.0)
    problem.model.load_state_dict(snapshot)
    dense = _dense(op)
    assert dense.dtype == F64 and problem.model.training
    assert next(problem.model.parameters()).dtype == torch.float32
    assert all(p.grad is None for p in problem.model.parameters())
    assert relative_error(dense, reference_ggn(_flat(problem), "ce")) < TOL
    f32 = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, **problem.data_kwargs)
    assert f32.dtype == torch.float32
    assert relative_error(_dense_f32(f32), dense) < 1e-5


def _dense_f32(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=torch.float32)


def test_eigenpairs_of_the_ggn():
    problem = Case("mlp_relu", "mse", "batches", 1).build()
    G = reference_ggn(_flat(problem), "mse")
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    eig = ts.top_eigenpairs(op, 3, tol=1e-10)
    expected = torch.linalg.eigvalsh(G).flip(0)[:3]
    assert relative_error(eig.values, expected) < 1e-9


# ------------------------------------------------------------------ bad input
class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x), x


def test_a_model_without_tensor_outputs_is_refused():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(5, 4, generator=gen), torch.randint(3, (5,), generator=gen)
    with torch.random.fork_rng():
        model = _TupleModel()
    op = ts.GGNOperator(model, nn.CrossEntropyLoss(), (X, Y))
    with pytest.raises(TypeError, match="returns a tensor with a batch dimension, got tuple"):
        op @ torch.ones(op.shape[0])


def test_a_loss_that_is_not_mean_reduced_is_refused():
    problem = Case("mlp_relu", "ce", "tuple").build()
    op = ts.GGNOperator(problem.model, nn.CrossEntropyLoss(reduction="none"), problem.data)
    with pytest.raises(ValueError, match=r"scalar \(mean-reduced\)"):
        op @ torch.ones(op.shape[0])


def test_a_non_finite_loss_is_reported():
    problem = Case("mlp_relu", "mse", "tuple").build()
    X = problem.inputs.clone()
    X[2] = float("nan")
    op = ts.GGNOperator(problem.model, problem.loss_fn, (X, problem.targets))
    with pytest.raises(ts.NonFiniteError, match="the loss of batch 0"):
        op @ torch.ones(op.shape[0])


def test_difference_of_mismatched_operators_is_refused():
    a, b = ts.DenseOperator(torch.eye(3)), ts.DenseOperator(torch.eye(4))
    with pytest.raises(ValueError, match="different shapes"):
        a - b
    with pytest.raises(TypeError, match="needs two SymmetricOperators"):
        ts.DifferenceOperator(a, torch.eye(3))
    assert torch.equal((a - a) @ torch.ones(3), torch.zeros(3))


# ------------------------------------------------------------------ distributed
BOUNDS = (0, 7, 23)  # rank 0 holds 7 examples, rank 1 16 (of 23)
DIST_CASE = Case("mlp_layernorm", "ce", "tuple")


def _ggn_worker(rank: int, world: int, folder: Path) -> dict:
    problem = DIST_CASE.build()
    part = slice(BOUNDS[rank], BOUNDS[rank + 1])
    data = (problem.inputs[part], problem.targets[part])
    out = {}
    for name, cls in (("ggn", ts.GGNOperator), ("residual", ts.GaussNewtonResidual)):
        op = cls(problem.model, problem.loss_fn, data, dtype=F64, batch_size=4)
        out[name] = (op.distributed, op.num_examples, _dense(op))
    return out


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="needs gloo")
@pytest.mark.slow
def test_distributed_ggn_equals_the_single_process_one(tmp_path):
    results = launch(_ggn_worker, tmp_path, timeout_s=10)
    problem = DIST_CASE.build()
    f = _flat(problem)
    G = reference_ggn(f, "ce")
    R = reference_hessian(f) - G
    for result in results:
        assert "ok" in result, result.get("error")
        (dist_g, n, dense_g), (_, _, dense_r) = result["ok"]["ggn"], result["ok"]["residual"]
        assert dist_g and n == 23
        assert relative_error(dense_g, G) < TOL
        assert float((dense_r - R).norm()) < TOL * float((R + G).norm())
    assert torch.equal(results[0]["ok"]["ggn"][2], results[1]["ok"]["ggn"][2])


# ------------------------------------------------------------------ class means (Papyan)
def test_class_means_match_per_example_gradients():
    from reference_outputs import per_example_gradients
    from tinysubspace.curvature.class_means import class_gradient_means

    problem = Case("mlp_layernorm", "ce", "batches").build()
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    means = class_gradient_means(op, 3)
    f, labels = _flat(problem), problem.targets
    for c2 in range(3):
        grads = per_example_gradients(f, torch.full_like(labels, c2))
        for c in range(3):
            assert relative_error(means.means[c, c2], grads[labels == c].mean(0)) < 1e-12
    assert torch.equal(means.counts, torch.bincount(labels, minlength=3).to(F64))
    assert abs(float(means.weights.sum()) - 1) < 1e-14
    from reference import reference_gradient  # the true-label means average to the gradient
    mean_gradient = means.true_label_means @ (means.counts / len(labels))
    assert relative_error(mean_gradient, reference_gradient(f)) < 1e-12
    diagonal_only = class_gradient_means(op, 3, cross_class=False)
    assert torch.equal(diagonal_only.true_label_means, means.true_label_means)
    assert diagonal_only.backward_passes * 3 == means.backward_passes


def test_papyan_matrix_is_the_ggn_when_classes_are_points():
    """If every example of a class has the same input, δ_{i,c'} = δ_{c,c'}: then M = G."""
    from tinysubspace.curvature.class_means import class_gradient_means, papyan_basis

    problem = Case("mlp_softplus", "ce", "tuple").build()
    centres = problem.inputs[:3]
    Y = torch.arange(12) % 3
    X = centres[Y]
    op = ts.GGNOperator(problem.model, problem.loss_fn, (X, Y), dtype=F64, batch_size=5)
    values, vectors = papyan_basis(class_gradient_means(op, 3), 6)
    G = _dense(op)
    exact = torch.linalg.eigvalsh(G).flip(0)[:6]
    assert relative_error(values, exact) < 1e-10
    M = vectors @ torch.diag(values) @ vectors.T
    assert relative_error(M, G) < 1e-10  # G has rank ≤ C(C − 1) = 6 here


def test_class_means_bad_input():
    from tinysubspace.curvature.class_means import class_gradient_means, papyan_basis

    problem = Case("mlp_relu", "ce", "tuple").build()
    op = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, 4\)"):
        class_gradient_means(op, 4)
    means = class_gradient_means(op, 3, cross_class=False)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        papyan_basis(means, 10)


# ------------------------------------------------------------------ the outliers experiment
OUTLIER_TINY = {"data.name": "gaussian-mixture", "data.classes": 3, "data.dim": 4, "data.n": 40,
                "data.sigma": 1.0, "model.widths": "6", "optim.batch_size": 16,
                "optim.lr": 0.5, "train.steps": 8, "tracker.k": 3, "tracker.tol": 1e-10,
                "tracker.dense_until": 8, "tracker.dense_every": 4, "tracker.sparse_every": 8}


def test_outliers_run_matches_dense_references(tmp_path):
    from reference_outputs import per_example_gradients
    from tinysubspace.experiments.build import build_optimizer, build_problem
    from tinysubspace.experiments.catalog import load_experiment
    from tinysubspace.experiments.config import apply_overrides
    from tinysubspace.experiments.experiment_groups import train_step
    from tinysubspace.experiments.outliers import outlier_columns, run_outliers
    from tinysubspace.plots.common import plotted_data
    from tinysubspace.plots.ggn import figure_outliers
    from tinysubspace.results.store import load_run

    config = apply_overrides(load_experiment("ggn-fc-digits"), OUTLIER_TINY)
    rows = run_outliers(config, tmp_path / "run")
    assert [row["step"] for row in rows] == [0, 4, 8]
    run = load_run(tmp_path / "run")
    assert list(run.metrics.columns) == outlier_columns(3)
    problem = build_problem(config)  # replay the training to the last measurement
    with torch.random.fork_rng():
        torch.manual_seed(config.train.seed)
        optimizer = build_optimizer(config.optim, problem.model, {})
        for step in range(8):
            train_step(problem, optimizer, 16, config.train.seed, step)
    X, labels = problem.tensors("train")
    f = FlatLoss(problem.model, problem.loss_fn, X, labels)
    H, G = reference_hessian(f), reference_ggn(f, "ce")
    (h_values, h_vectors), (g_values, g_vectors) = torch.linalg.eigh(H), torch.linalg.eigh(G)
    last = rows[-1]
    for name, values in (("hessian", h_values), ("ggn", g_values)):
        measured = torch.tensor([last[f"{name}/eig_{i}"] for i in range(1, 7)], dtype=F64)
        assert relative_error(measured, values.flip(0)[:6]) < 1e-8
    VH, VG = h_vectors[:, -3:], g_vectors[:, -3:]
    assert last["overlap/hessian_ggn"] == pytest.approx(ts.subspace_overlap(VH, VG), abs=1e-7)
    means = torch.stack([per_example_gradients(f)[labels == c].mean(0) for c in range(3)], 1)
    span = torch.linalg.qr(means)[0]
    assert last["overlap/classmeans_hessian"] == pytest.approx(ts.subspace_overlap(span, VH),
                                                               abs=1e-7)
    spectra = run.spectrum()
    assert relative_error(torch.as_tensor(spectra["hessian"]), h_values.flip(0)) < 1e-10
    assert relative_error(torch.as_tensor(spectra["ggn"]), g_values.flip(0)) < 1e-10
    data = plotted_data(figure_outliers(tmp_path / "run", top=5))
    assert data["spectra"] and np.allclose(data["hessian_top"], spectra["hessian"][:5])
    np.testing.assert_array_equal(data["overlap/hessian_ggn"],
                                  run.metrics["overlap/hessian_ggn"].to_numpy(float))
