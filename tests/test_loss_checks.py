"""One mean-loss rule for the operators and the tracker (issue 24, items 5 and 6).

``curvature/data.check_mean_loss``: the loss of a batch repeated twice equals the loss of the
batch (a mean does not change, a sum doubles), within a tolerance that follows the dtype. Every
operator applies it to the first rows of its first batch when it is built; the tracker's
``check_mean_loss`` uses the same function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

import tinysubspace as ts
from cases import Case
from reference import FlatLoss, reference_hessian, relative_error
from tinysubspace.curvature.data import Batch, check_mean_loss, mean_check_tolerance
from tinysubspace.experiments import tracker_data

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
SUM_MESSAGE = r"mean over the batch \(reduction='mean'\).*x2"
SUM_BF16 = r"mean over the batch \(reduction='mean'\).*\(x(1\.9|2)"  # x1.99 in bfloat16


def _sum_ce(z, y):
    return functional.cross_entropy(z, y, reduction="sum")


@pytest.mark.parametrize("layout", ["tuple", "batches"])
@pytest.mark.parametrize("make", [
    lambda m, d, **k: ts.HessianOperator(m, _sum_ce, d, **k),
    lambda m, d, **k: ts.GGNOperator(m, _sum_ce, d, **k),
    lambda m, d, **k: ts.FisherOperator(m, _sum_ce, d, kind="empirical", **k),
    lambda m, d, **k: ts.FisherOperator(m, _sum_ce, d, kind="true", likelihood="categorical",
                                        **k),
    lambda m, d, **k: ts.GaussNewtonResidual(m, nn.CrossEntropyLoss(reduction="sum"), d, **k),
], ids=["hessian", "ggn", "fisher-empirical", "fisher-true", "residual"])
def test_a_sum_loss_is_refused_by_every_operator(make, layout):
    problem = Case("mlp_relu", "ce", layout).build()
    with pytest.raises(ValueError, match=SUM_MESSAGE):
        make(problem.model, problem.data, dtype=F64, **problem.data_kwargs)


def test_the_mean_of_the_same_loss_is_accepted_and_right(reference_of):
    """No false refusal: the mean loss with uneven batches, a size hook and dict inputs builds
    and its Hessian is the reference's (the check changes no number)."""
    case = Case("mlp_relu", "ce", "batches")
    H, _, _ = reference_of(case)
    problem = case.build()
    op = ts.HessianOperator(problem.model, functional.cross_entropy, problem.data, dtype=F64)
    assert relative_error(op @ torch.eye(op.shape[0], dtype=F64), H) < 1e-10
    hooked = [Batch(X, Y, size=len(Y)) for X, Y in problem.data]
    ts.GGNOperator(problem.model, functional.cross_entropy, hooked, dtype=F64)


def test_a_sum_over_tokens_is_refused_and_the_token_mean_accepted():
    """Per-token losses of a sequence model with -100 padding and ``Batch(size=tokens)``."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7)).double()
    X = torch.randint(7, (4, 6), generator=gen)
    Y = torch.randint(7, (4, 6), generator=gen)
    Y[0, :3] = -100
    batches = [Batch(X, Y, size=int((Y != -100).sum()))]

    def mean_ce(z, y):
        return functional.cross_entropy(z.reshape(-1, 7), y.reshape(-1))

    def sum_ce(z, y):
        return functional.cross_entropy(z.reshape(-1, 7), y.reshape(-1), reduction="sum")

    ts.HessianOperator(model, mean_ce, batches)
    with pytest.raises(ValueError, match=SUM_MESSAGE):
        ts.HessianOperator(model, sum_ce, batches)


def test_the_check_leaves_the_model_untouched():
    problem = Case("cnn_batchnorm", "mse", "tuple").build()
    model = problem.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ts.HessianOperator(model, problem.loss_fn, problem.data, dtype=F64, mode="train")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bf16_problem():
    """A bfloat16 model whose loss on the batch twice differs from the loss on the batch by
    0.65% (2.40625 vs 2.390625): more than the old fixed 1e-3, under one bfloat16 ε."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 10)).to(torch.bfloat16)
    X = torch.randn(8, 16, generator=gen).bfloat16()
    Y = torch.randint(10, (8,), generator=gen)
    return model, X, Y


def test_bf16_mean_is_not_refused_and_a_bf16_sum_is():
    model, X, Y = _bf16_problem()
    with torch.no_grad():
        once = float(functional.cross_entropy(model(X), Y))
        twice = float(functional.cross_entropy(model(torch.cat([X, X])), torch.cat([Y, Y])))
    assert abs(twice / once - 1) > 1e-3  # the old rule refused this mean
    batch = Batch(X, Y, size=8)
    outputs = tracker_data.check_mean_loss(model, functional.cross_entropy, batch)
    assert outputs.dtype == torch.bfloat16 and outputs.shape == (8, 10)
    with pytest.raises(ValueError, match=SUM_BF16):
        tracker_data.check_mean_loss(model, _sum_ce, batch)
    half = model.to(torch.float16)
    tracker_data.check_mean_loss(half, functional.cross_entropy, Batch(X.half(), Y, size=8))
    with pytest.raises(ValueError, match=SUM_BF16):
        tracker_data.check_mean_loss(half, _sum_ce, Batch(X.half(), Y, size=8))


def test_tolerance_follows_the_coarsest_dtype():
    assert mean_check_tolerance(torch.float64) == 1e-3
    assert mean_check_tolerance(torch.float32) == 1e-3
    assert mean_check_tolerance(torch.float16) == pytest.approx(32 * 2.0 ** -10)
    assert mean_check_tolerance(torch.float32, torch.bfloat16) == 0.25
    assert mean_check_tolerance(torch.bfloat16) < 0.5  # a sum (x2) is always refused


def test_the_rule_by_hand():
    """A loss that grows by 1% on the longer batch: refused in float64, accepted in bf16."""
    batch = Batch(torch.ones(4, 2, dtype=F64), torch.zeros(4), size=4)

    def grows(z, y):
        return z.sum() / z.shape[0] * (1 + 0.01 * (z.shape[0] > 4))

    with pytest.raises(ValueError, match=r"x1\.01"):
        check_mean_loss(grows, lambda x: x, batch)
    check_mean_loss(grows, lambda x: x.bfloat16(), Batch(batch.inputs, batch.targets, 4))
    check_mean_loss(lambda z, y: z.mean(), lambda x: x, batch)
    check_mean_loss(lambda z, y: z.sum() * 0, lambda x: x, batch)  # zero: cannot tell, passes


def test_the_sum_loss_hessian_would_have_been_n_times_too_large():
    """Why the refusal matters: with reduction='sum' the Hessian is N times the mean's."""
    problem = Case("mlp_relu", "ce", "tuple").build()
    mean = reference_hessian(FlatLoss(problem.model, problem.loss_fn, problem.inputs,
                                      problem.targets))
    total = reference_hessian(FlatLoss(problem.model, _sum_ce, problem.inputs,
                                       problem.targets))
    assert relative_error(total, len(problem.targets) * mean) < 1e-12


def test_the_tracker_measures_a_bf16_model_and_refuses_a_bf16_sum():
    """End to end: the issue's false refusal was at ``SubspaceTracker(...)``."""
    model, X, Y = _bf16_problem()
    tracker = ts.SubspaceTracker(model, functional.cross_entropy, (X, Y), k=2, dtype="float32")
    row = tracker.on_step(0)
    tracker.close()
    with torch.no_grad():
        expected = float(functional.cross_entropy(model.float()(X.float()), Y))
    assert row["train/loss"] == pytest.approx(expected, rel=1e-5)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=SUM_BF16):
        ts.SubspaceTracker(model, _sum_ce, (X, Y), k=2, dtype="float32")
