"""HessianOperator against a dense float64 reference Hessian (itself checked by finite differences).

Every case of ``cases.CASES``: H·v (vector and block) to 1e-10 relative, loss and gradient, the
parameter subset, the dtype and train/eval handling, the caller's model left untouched,
determinism checks, the matvec counter and the scipy adapter.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import tinysubspace as ts
from cases import CASES, LOSSES, MODELS, Case, CountingData, build_model, make_inputs
from reference import (
    FlatLoss,
    finite_difference_gradient,
    finite_difference_hessian,
    reference_gradient,
    reference_hessian,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
MODEL_LOSS = sorted({(case.model, case.loss) for case in CASES})


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ the reference itself
@pytest.mark.parametrize(("model", "loss"), MODEL_LOSS, ids=[f"{m}-{l}" for m, l in MODEL_LOSS])
def test_reference_agrees_with_finite_differences(model, loss):
    problem = Case(model, loss, "tuple").build()
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    H = reference_hessian(f)
    assert relative_error(H.T, H) < 1e-14
    assert relative_error(finite_difference_hessian(f), H) < 1e-7
    assert relative_error(finite_difference_gradient(f), reference_gradient(f)) < 1e-8


def test_unequal_batches_would_be_caught():
    """Weighting unequal batches equally (a plausible bug) is far outside the 1e-10 tolerance."""
    problem = Case("mlp_softplus", "ce", "batches").build()
    per_batch = []
    for X, Y in problem.data:
        f = FlatLoss(problem.model, problem.loss_fn, X, Y)
        per_batch.append(reference_hessian(f))
    unweighted = sum(per_batch) / len(per_batch)
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    assert relative_error(unweighted, reference_hessian(f)) > 1e-3


# ------------------------------------------------------------------ products, loss, gradient
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_products_match_reference(case, reference_of):
    H, _, _ = reference_of(case)
    op = case.build().operator(dtype=F64)
    p = H.shape[0]
    assert op.shape == (p, p) and op.dtype == F64
    dense = op @ torch.eye(p, dtype=F64)  # the whole matrix as one block
    assert relative_error(dense, H) < 1e-10
    v = _randn(p, seed=1)
    Hv = op @ v
    assert Hv.shape == (p,)
    assert relative_error(Hv, H @ v) < 1e-10
    V = _randn(p, 3, seed=2)
    HV = op @ V
    assert HV.shape == (p, 3)
    assert relative_error(HV, H @ V) < 1e-10
    assert op.matvecs == p + 1 + 3


@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss_and_gradient_match_reference(case, reference_of):
    _, g_ref, loss_ref = reference_of(case)
    op = case.build().operator(dtype=F64)
    loss, g = op.loss_and_gradient()
    assert isinstance(loss, float)
    assert g.shape == g_ref.shape and g.dtype == F64
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    assert relative_error(g, g_ref) < 1e-10
    assert op.num_examples == case.build().inputs.shape[0]
    assert op.matvecs == 0  # a gradient is not a Hessian product


def test_one_data_pass_per_block():
    """Without kept graphs (``graph_memory=0``); with them: tests/test_graph_reuse.py."""
    problem = Case("mlp_relu", "ce", "batches").build()
    data = CountingData(problem.data)
    op = ts.HessianOperator(problem.model, problem.loss_fn, data, dtype=F64, graph_memory=0)
    before = data.passes
    op @ _randn(op.shape[0], 5)
    assert data.passes - before == 1
    op @ _randn(op.shape[0])
    assert data.passes - before == 2
    op.loss_and_gradient()
    assert data.passes - before == 3


def test_float32_operator_within_float32_tolerance(reference_of):
    case = Case("mlp_layernorm", "ce", "loader")
    H, g_ref, _ = reference_of(case)
    op = case.build().operator()  # the float32 model's own dtype
    assert op.dtype == torch.float32
    V = _randn(H.shape[0], 4, seed=3)
    HV = op @ V.float()
    assert HV.dtype == torch.float32
    assert relative_error(HV, H @ V.float().double()) < 1e-5
    assert relative_error(op.loss_and_gradient()[1], g_ref) < 1e-5


def test_float64_model_measured_in_its_own_dtype(reference_of):
    case = Case("cnn_batchnorm", "mse", "tuple")
    problem = case.build()
    H, _, _ = reference_of(case)
    model64 = copy.deepcopy(problem.model).double()
    op = ts.HessianOperator(model64, problem.loss_fn, (problem.inputs, problem.targets))
    assert op.dtype == F64
    assert relative_error(op @ torch.eye(H.shape[0], dtype=F64), H) < 1e-10


# ------------------------------------------------------------------ parameter subsets
def test_parameter_subset_by_name_and_by_tensor(reference_of):
    case = Case("mlp_layernorm", "mse", "batches")
    problem = case.build()
    H, g, _ = reference_of(case)
    names = [name for name, _ in problem.model.named_parameters()]
    chosen = ["1.weight", "3.bias"]  # LayerNorm weight, last bias
    index = torch.cat([torch.arange(start, start + param.numel())
                       for name, param, start in _offsets(problem.model) if name in chosen])
    by_name = problem.operator(params=chosen, dtype=F64)
    by_tensor = problem.operator(params=[dict(problem.model.named_parameters())[n]
                                         for n in reversed(chosen)], dtype=F64)
    for op in (by_name, by_tensor):
        assert op.layout.names == tuple(n for n in names if n in chosen)  # model order
        p = index.numel()
        assert op.shape == (p, p)
        assert relative_error(op @ torch.eye(p, dtype=F64), H[index][:, index]) < 1e-10
        assert relative_error(op.loss_and_gradient()[1], g[index]) < 1e-10


def _offsets(model: nn.Module):
    start = 0
    for name, param in model.named_parameters():
        yield name, param, start
        start += param.numel()


def test_subset_with_frozen_parameter_measures_it_anyway():
    problem = Case("mlp_softplus", "ce", "tuple").build()
    problem.model[0].weight.requires_grad_(False)
    default = problem.operator(dtype=F64)
    assert "0.weight" not in default.layout.names  # None: only what requires grad
    named = problem.operator(params=["0.weight"], dtype=F64)
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets,
                 names=["0.weight"])
    assert relative_error(named @ torch.eye(24, dtype=F64), reference_hessian(f)) < 1e-10
    assert not problem.model[0].weight.requires_grad


# ------------------------------------------------------------------ the caller's model
def _state_of(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: (p.dtype, p.requires_grad, None if p.grad is None else p.grad.clone())
             for name, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _assert_same_state(model: nn.Module, saved) -> None:
    tensors, params, flags = _state_of(model)
    assert tensors.keys() == saved[0].keys()
    for key, value in tensors.items():
        assert value.dtype == saved[0][key].dtype and torch.equal(value, saved[0][key]), key
    for name, (dtype, requires_grad, grad) in params.items():
        old_dtype, old_requires, old_grad = saved[1][name]
        assert dtype == old_dtype and requires_grad == old_requires, name
        assert (grad is None) == (old_grad is None), name
        assert grad is None or torch.equal(grad, old_grad), name
    assert flags == saved[2]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_caller_model_untouched(mode):
    problem = Case("cnn_batchnorm", "ce", "batches").build()
    model = problem.model
    model.train()
    model[1].eval()  # a mixed set of flags must come back exactly
    model[4].weight.grad = torch.ones_like(model[4].weight)  # an existing .grad must survive
    saved = _state_of(model)
    op = problem.operator(dtype=F64, mode=mode)
    op @ _randn(op.shape[0], 2)
    op.loss_and_gradient()
    op.check_deterministic()
    ts.top_eigenpairs(op, k=1, tol=1e-4)
    _assert_same_state(model, saved)
    assert model[0].weight.dtype == torch.float32


def test_operator_is_a_snapshot():
    problem = Case("mlp_relu", "mse", "tuple").build()
    op = problem.operator(dtype=F64)
    v = _randn(op.shape[0])
    before = op @ v
    with torch.no_grad():
        for param in problem.model.parameters():
            param.add_(1.0)
    assert torch.equal(op @ v, before)


def test_eval_mode_by_default_with_dropout(reference_of):
    """Default mode: dropout off, batch norm on running statistics, whatever the caller's mode."""
    case = Case("mlp_softplus", "ce", "loader")
    problem = case.build()
    H, _, _ = reference_of(case)
    with_dropout = nn.Sequential(problem.model[0], problem.model[1], nn.Dropout(0.5),
                                 problem.model[2]).train()
    op = ts.HessianOperator(with_dropout, problem.loss_fn, problem.data, dtype=F64)
    assert op.mode == "eval"
    assert relative_error(op @ torch.eye(H.shape[0], dtype=F64), H) < 1e-10
    op.check_deterministic()
    assert with_dropout.training and with_dropout[2].training


def test_train_mode_uses_batch_statistics():
    """mode='train': batch norm normalises by each batch's statistics (one batch here)."""
    problem = Case("cnn_batchnorm", "ce", "tuple").build()
    running = problem.model[1].running_mean.clone()
    op = problem.operator(dtype=F64, mode="train", batch_size=None)  # the whole set, one batch
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets, train=True)
    H_train = reference_hessian(f)
    assert relative_error(op @ torch.eye(op.shape[0], dtype=F64), H_train) < 1e-10
    assert op.loss_and_gradient()[0] == pytest.approx(float(f(f.theta0)), rel=1e-12)
    eval_f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    assert relative_error(reference_hessian(eval_f), H_train) > 1e-2  # the modes do differ
    assert torch.equal(problem.model[1].running_mean, running)
    op.check_deterministic()  # fixed batches: batch statistics are deterministic


# ------------------------------------------------------------------ determinism checks
def test_check_deterministic_names_dropout_in_train_mode():
    problem = Case("mlp_relu", "ce", "tuple").build()
    model = nn.Sequential(problem.model[0], nn.Dropout(0.5), problem.model[1], problem.model[2])
    op = ts.HessianOperator(model, problem.loss_fn, problem.data, mode="train", dtype=F64)
    with torch.random.fork_rng(), pytest.raises(ts.NonDeterministicError, match="Dropout"):
        op.check_deterministic()


def test_check_deterministic_names_train_mode_batch_norm():
    """Train-mode batch norm under a shuffling loader: batch statistics change every pass."""
    problem = Case("cnn_batchnorm", "ce", "tuple").build()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(problem.inputs, problem.targets), batch_size=8,
        shuffle=True, generator=torch.Generator().manual_seed(0))
    op = ts.HessianOperator(problem.model, problem.loss_fn, loader, mode="train", dtype=F64)
    with pytest.raises(ts.NonDeterministicError, match=r"mode='train' with BatchNorm2d"):
        op.check_deterministic()
    # the same loader in eval mode is deterministic: the mean over all examples is unchanged
    ts.HessianOperator(problem.model, problem.loss_fn, loader, dtype=F64).check_deterministic()


def test_check_deterministic_names_shuffling_with_drop_last():
    problem = Case("mlp_softplus", "mse", "tuple").build()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(problem.inputs, problem.targets), batch_size=5,
        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    op = ts.HessianOperator(problem.model, problem.loss_fn, loader, dtype=F64)
    with pytest.raises(ts.NonDeterministicError, match="drop_last=True"):
        op.check_deterministic()


@pytest.mark.parametrize("case", [c for c in CASES if c.seed == 0 and c.data == "loader"],
                         ids=str)
def test_check_deterministic_passes_for_every_case(case):
    case.build().operator(dtype=F64).check_deterministic()


# ------------------------------------------------------------------ interop and counting
def test_matvec_counter_counts_columns():
    op = Case("softmax_regression", "ce", "batches").build().operator(dtype=F64)
    p = op.shape[0]
    assert op.matvecs == 0
    op @ _randn(p)
    op @ _randn(p, 4)
    op @ _randn(p, 0)
    assert op.matvecs == 5


def test_to_scipy_linear_operator(reference_of):
    case = Case("mlp_softplus", "mse", "loader")
    H, _, _ = reference_of(case)
    op = case.build().operator(dtype=F64)
    lin = op.to_scipy()
    assert lin.shape == op.shape and lin.dtype == np.float64
    x = np.linspace(-1, 1, op.shape[0])
    np.testing.assert_allclose(lin @ x, H.numpy() @ x, rtol=1e-10, atol=1e-12)
    X = np.stack([x, x**2], 1)
    np.testing.assert_allclose(lin.matmat(X), H.numpy() @ X, rtol=1e-10, atol=1e-12)
    values = scipy.sparse.linalg.eigsh(lin, k=3, which="LA", tol=1e-12, return_eigenvectors=False,
                                       v0=np.ones(op.shape[0]))
    np.testing.assert_allclose(np.sort(values)[::-1], torch.linalg.eigvalsh(H).flip(0)[:3],
                               rtol=1e-8)
    assert op.matvecs > 3


def test_dense_operator():
    A = _randn(6, 6)
    A = A + A.T
    op = ts.DenseOperator(A)
    assert op.shape == (6, 6) and op.dtype == F64 and op.device == A.device
    v = _randn(6, seed=4)
    assert torch.allclose(op @ v, A @ v, rtol=0, atol=1e-14)
    assert torch.allclose(op @ v[:, None], (A @ v)[:, None], rtol=0, atol=1e-14)
    assert torch.allclose(op @ v.float(), A @ v.float().double(), rtol=0, atol=1e-14)
    assert op.matvecs == 3


def test_models_and_losses_cover_the_issue():
    """The shared cases hold what the issue names (guards against the list shrinking)."""
    assert {"mlp_relu", "mlp_softplus", "mlp_layernorm", "cnn_batchnorm",
            "softmax_regression"} <= set(MODELS)
    assert {"ce", "mse"} <= set(LOSSES)
    assert {c.data for c in CASES} == {"tuple", "batches", "loader"}
    model = build_model("cnn_batchnorm", 0)
    assert not model.training and model[1].running_mean.abs().sum() > 0
    X, _ = make_inputs("cnn_batchnorm", "ce", 0)
    assert X.shape[1:] == (1, 5, 5)


# ------------------------------------------------------------------ chunk_size and its old name
def test_chunk_size_splits_the_data_and_keeps_the_reference(reference_of):
    """``chunk_size`` cuts an ``(X, Y)`` pair into passes of that many examples (the last one
    shorter); the mean over the data set, so the Hessian, does not change. ``batch_size`` is the
    old name and gives the same operator."""
    case = Case("mlp_softplus", "mse", "tuple")
    H, _, _ = reference_of(case)
    problem = case.build()
    data = (problem.inputs, problem.targets)
    n, p = problem.inputs.shape[0], H.shape[0]
    new = ts.HessianOperator(problem.model, problem.loss_fn, data, dtype=F64, chunk_size=3)
    old = ts.HessianOperator(problem.model, problem.loss_fn, data, dtype=F64, batch_size=3)
    assert [b.size for b in new.batches] == [b.size for b in old.batches]
    assert len(list(new.batches)) == -(-n // 3) and n % 3 != 0  # uneven chunks are weighted
    eye = torch.eye(p, dtype=F64)
    assert relative_error(new @ eye, H) < 1e-10
    assert relative_error(old @ eye, H) < 1e-10
    fisher = ts.FisherOperator(problem.model, problem.loss_fn, data, dtype=F64, batch_size=3)
    assert len(list(fisher.batches)) == len(list(new.batches))


def test_chunk_size_given_twice_is_refused():
    problem = Case("mlp_softplus", "mse", "tuple").build()
    data = (problem.inputs, problem.targets)
    with pytest.raises(TypeError, match=r"chunk_size=3 and its old name batch_size=4 both"):
        ts.HessianOperator(problem.model, problem.loss_fn, data, chunk_size=3, batch_size=4)
    with pytest.raises(TypeError, match=r"chunk_size=3 and its old name batch_size=3 both"):
        ts.FisherOperator(problem.model, problem.loss_fn, data, chunk_size=3, batch_size=3)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        ts.HessianOperator(problem.model, problem.loss_fn, data, chunk_size=0)
