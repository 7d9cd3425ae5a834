"""FisherOperator (empirical, Monte Carlo, true) against dense float64 references.

Empirical: ``(1/N) Σ_i g_i g_iᵀ`` from per-example gradients (``torch.autograd.functional.jacobian``
of the per-example losses). Monte Carlo: the same with the operator's sampled targets, and its
convergence to the true Fisher. True: equal to the GGN for cross-entropy and MSE (canonical
links), whose reference is ``Jᵀ ∇²_z L J``. Unequal batches in every layout, to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

import tinysubspace as ts
from cases import CASES, Case
from reference import FlatLoss, reference_gradient, relative_error
from reference_outputs import outputs, per_example_gradients, reference_ggn

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
TOL = 1e-10
SOME_CASES = [c for c in CASES if c.seed == 0]


def _flat(problem) -> FlatLoss:
    return FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)


def _fisher(problem, **kwargs) -> ts.FisherOperator:
    return ts.FisherOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                             **{**problem.data_kwargs, **kwargs})


def _dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=F64)


def test_per_example_gradients_average_to_the_gradient():
    """The reference's per-example gradients are right: their mean is the full gradient."""
    for loss in ("ce", "mse"):
        f = _flat(Case("mlp_softplus", loss, "tuple").build())
        assert relative_error(per_example_gradients(f).mean(0), reference_gradient(f)) < 1e-13


@pytest.mark.slow
@pytest.mark.parametrize("case", SOME_CASES, ids=str)
def test_empirical_fisher_matches_reference(case):
    problem = case.build()
    grads = per_example_gradients(_flat(problem))
    expected = grads.T @ grads / len(grads)
    assert relative_error(_dense(_fisher(problem, kind="empirical")), expected) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("case", SOME_CASES, ids=str)
def test_true_fisher_is_the_ggn(case):
    problem = case.build()
    expected = reference_ggn(_flat(problem), case.loss)
    assert relative_error(_dense(_fisher(problem, kind="true")), expected) < TOL


@pytest.mark.parametrize("case", [Case("mlp_layernorm", "ce", "batches"),
                                  Case("cnn_batchnorm", "mse", "loader")], ids=str)
def test_monte_carlo_fisher_matches_reference_with_the_same_targets(case):
    problem = case.build()
    op = _fisher(problem, kind="mc", mc_samples=3, seed=7)
    f = _flat(problem)
    z = outputs(f).detach()
    sizes = [len(y) for _, y in problem.data]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    draws = torch.cat([op.sample_targets(z[a:a + n], index)
                       for index, (a, n) in enumerate(zip(starts, sizes, strict=True))], dim=1)
    expected = sum(g.T @ g for g in (per_example_gradients(f, y) for y in draws))
    expected = expected / (len(draws) * len(z))
    assert relative_error(_dense(op), expected) < TOL
    again = _fisher(problem, kind="mc", mc_samples=3, seed=7)
    assert torch.equal(_dense(again), _dense(op))  # seeded: the same products
    other = _fisher(problem, kind="mc", mc_samples=3, seed=8)
    assert relative_error(_dense(other), expected) > 1e-3  # the seed matters


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_monte_carlo_fisher_converges_to_the_true_fisher(loss):
    """Error ∝ S^{-1/2}: 400 samples are within 15%, 4 samples are not within 5% (seeded)."""
    problem = Case("mlp_softplus", loss, "tuple").build()
    true = _dense(_fisher(problem, kind="true"))
    many = _dense(_fisher(problem, kind="mc", mc_samples=400, seed=1))
    few = _dense(_fisher(problem, kind="mc", mc_samples=4, seed=1))
    assert relative_error(many, true) < 0.15
    assert relative_error(few, true) > 0.05
    assert relative_error(many, true) < relative_error(few, true) / 3


def test_empirical_and_true_fisher_differ():
    """Kunstner et al.: the empirical Fisher is not the Fisher (away from a perfect fit)."""
    problem = Case("mlp_relu", "ce", "batches").build()
    assert relative_error(_dense(_fisher(problem, kind="empirical")),
                          _dense(_fisher(problem, kind="true"))) > 1e-2


def test_functional_losses_are_recognised():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 4, generator=gen, dtype=F64), torch.randint(3, (6,), generator=gen)
    with torch.random.fork_rng():
        model = nn.Linear(4, 3).double()
    ce = ts.FisherOperator(model, functional.cross_entropy, (X, Y), kind="true")
    assert ce.likelihood == "categorical"
    module = ts.FisherOperator(model, nn.CrossEntropyLoss(), (X, Y), kind="true")
    assert torch.equal(_dense(ce), _dense(module))
    mse = ts.FisherOperator(model, functional.mse_loss, (X, torch.zeros(6, 3, dtype=F64)),
                            kind="true")
    assert mse.likelihood == "gaussian"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"kind": "observed"}, ValueError, "kind must be one of"),
    ({"kind": "true", "likelihood": "poisson"}, ValueError, "likelihood must be one of"),
    ({"kind": "mc", "mc_samples": 0}, ValueError, "mc_samples must be a positive integer"),
    ({"kind": "true", "loss_fn": lambda z, y: (z - y).abs().mean()}, ValueError,
     "cannot tell the likelihood"),
    ({"kind": "mc", "loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1)}, ValueError,
     "label smoothing"),
    ({"kind": "true", "loss_fn": nn.MSELoss(reduction="sum")}, ValueError, "mean-reduced"),
])
def test_bad_arguments_are_refused(kwargs, error, message):
    problem = Case("mlp_relu", "ce", "tuple").build()
    loss_fn = kwargs.pop("loss_fn", problem.loss_fn)
    with pytest.raises(error, match=message):
        ts.FisherOperator(problem.model, loss_fn, problem.data, **kwargs)


def test_an_unknown_loss_works_for_the_empirical_fisher():
    problem = Case("mlp_relu", "mse", "tuple").build()
    op = ts.FisherOperator(problem.model, lambda z, y: ((z - y) ** 2).mean(), problem.data,
                           dtype=F64)
    reference = _dense(_fisher(problem, kind="empirical"))
    assert relative_error(_dense(op), reference) < TOL


def test_categorical_outputs_must_be_a_matrix():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 4, 2, generator=gen), torch.randint(3, (6, 2), generator=gen)
    with torch.random.fork_rng():
        model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Unflatten(1, (3, 2)))
    op = ts.FisherOperator(model, nn.CrossEntropyLoss(), (X, Y), kind="true")
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, classes\), got shape"):
        op @ torch.ones(op.shape[0])


# ----------------------------------------------------------------------------- torchrun
BOUNDS = (0, 7, 23)  # rank 0 holds 7 examples, rank 1 16 (of 23): uneven shards


def _fisher_worker(rank: int, world: int, folder) -> dict:
    problem = Case("mlp_layernorm", "ce", "tuple").build()
    part = slice(BOUNDS[rank], BOUNDS[rank + 1])
    data = (problem.inputs[part], problem.targets[part])
    out = {}
    for kind in ("empirical", "true", "mc"):
        op = ts.FisherOperator(problem.model, problem.loss_fn, data, kind=kind, dtype=F64,
                               batch_size=4, mc_samples=3, seed=5)
        out[kind] = (op.distributed, op.num_examples, _dense(op))
    return out


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="needs gloo")
@pytest.mark.slow
def test_distributed_fisher_equals_the_single_process_one(tmp_path):
    """Empirical and true Fisher of two uneven shards equal the whole set's references; the MC
    Fisher (targets drawn per rank and batch) is the same matrix on both ranks and PSD."""
    from distributed_workers import launch

    results = launch(_fisher_worker, tmp_path, timeout_s=10)
    problem = Case("mlp_layernorm", "ce", "tuple").build()
    f = _flat(problem)
    grads = per_example_gradients(f)
    expected = {"empirical": grads.T @ grads / len(grads), "true": reference_ggn(f, "ce")}
    for result in results:
        assert "ok" in result, result.get("error")
        for kind, reference in expected.items():
            dist, n, dense = result["ok"][kind]
            assert dist and n == 23
            assert relative_error(dense, reference) < TOL, kind
        mc = result["ok"]["mc"][2]
        assert float(torch.linalg.eigvalsh((mc + mc.T) / 2).min()) > -1e-12
    assert torch.equal(results[0]["ok"]["mc"][2], results[1]["ok"]["mc"][2])
