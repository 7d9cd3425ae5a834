"""PreconditionedOperator ``P^{-1/2} H P^{-1/2}`` against dense float64 references.

``P`` is checked two independent ways: against the closed form of each optimizer's moments from
the recorded gradients (Adam: ``v_t = (1 − β₂) Σ_s β₂^{t−s} g_s²``), and against the optimizer's
own last step (``Δθ = −η m̂ / P``). The operator then equals ``D H D`` with ``D = diag(P^{-1/2})``
built from the dense Hessian, and its eigenvalues are those of ``P⁻¹ H``.
"""

from __future__ import annotations

import math

import pytest
import torch

import tinysubspace as ts
from cases import Case
from reference import FlatLoss, reference_hessian, relative_error

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
TOL = 1e-10
CASE = Case("mlp_softplus", "ce", "batches")


def _train(problem, make_optimizer, steps: int = 3) -> tuple[torch.optim.Optimizer, list]:
    """``steps`` full-batch steps; returns the optimizer and the flat gradients it saw."""
    model = problem.model.double()
    optimizer = make_optimizer(model.parameters())
    X, Y = problem.inputs.double(), problem.targets
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        problem.loss_fn(model(X), Y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        optimizer.step()
    return optimizer, grads


def _hessian(problem) -> torch.Tensor:
    return reference_hessian(FlatLoss(problem.model, problem.loss_fn, problem.inputs,
                                      problem.targets))


def _operator(problem, **kwargs) -> ts.HessianOperator:
    return ts.HessianOperator(problem.model, problem.loss_fn, problem.data, dtype=F64, **kwargs)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-3),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-4, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-5),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-5,
                                                       centered=True, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, eps=1e-6),
}


def _closed_form(name: str, grads: list[torch.Tensor]) -> torch.Tensor:
    """``P`` from the recorded gradients by each optimizer's definition."""
    t = len(grads)
    if name == "sgd":
        return torch.ones_like(grads[0])
    if name == "adagrad":
        return sum(g.square() for g in grads).sqrt() + 1e-6
    if name.startswith("rmsprop"):
        alpha = 0.9
        s = sum((1 - alpha) * alpha ** (t - 1 - i) * g.square() for i, g in enumerate(grads))
        if name == "rmsprop-centered":
            mean = sum((1 - alpha) * alpha ** (t - 1 - i) * g for i, g in enumerate(grads))
            s = s - mean.square()
        return s.sqrt() + 1e-5
    beta2, eps = (0.95, 1e-3) if name == "adam" else (0.999, 1e-4)
    vs = [sum((1 - beta2) * beta2 ** (j - i) * grads[i].square() for i in range(j + 1))
          for j in range(t)]
    v = torch.stack(vs).amax(0) if name == "adamw-amsgrad" else vs[-1]
    return v.sqrt() / math.sqrt(1 - beta2**t) + eps


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_diagonal_matches_the_closed_form(name):
    problem = CASE.build()
    optimizer, grads = _train(problem, OPTIMIZERS[name])
    P = ts.preconditioner_diagonal(optimizer, _operator(problem))
    assert relative_error(P, _closed_form(name, grads)) < 1e-12


def test_diagonal_is_what_adams_step_divides_by():
    """Adam's last step was ``Δθ = −η m / ((1 − β₁ᵗ) P)``: recover it from the state."""
    problem = CASE.build()
    optimizer, _ = _train(problem, OPTIMIZERS["adam"], steps=2)
    before = torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()]).clone()
    optimizer.zero_grad()
    problem.loss_fn(problem.model(problem.inputs.double()), problem.targets).backward()
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()])
    m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in problem.model.parameters()])
    op = _operator(problem)
    corrected = ts.preconditioner_diagonal(optimizer, op, first_moment_correction=True)
    assert relative_error(after - before, -1e-2 * m / corrected) < 1e-12
    plain = ts.preconditioner_diagonal(optimizer, op)
    assert relative_error(corrected, plain * (1 - 0.8**3)) < 1e-14


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd"])
def test_operator_matches_dense(name):
    problem = CASE.build()
    optimizer, grads = _train(problem, OPTIMIZERS[name])
    H = _hessian(problem)
    D = torch.diag(_closed_form(name, grads).rsqrt())
    op = ts.PreconditionedOperator(_operator(problem), optimizer)
    assert op.shape == H.shape and op.dtype == F64
    expected = D @ H @ D
    assert relative_error(op @ torch.eye(H.shape[0], dtype=F64), expected) < TOL
    eig = ts.top_eigenpairs(op, 2, tol=1e-10)
    P = _closed_form(name, grads)
    top = torch.linalg.eigvals(torch.diag(1 / P) @ H).real.sort(descending=True).values[:2]
    assert relative_error(eig.values, top) < 1e-9  # λ(P^{-1/2} H P^{-1/2}) = λ(P⁻¹ H)


def test_a_parameter_subset_and_a_tensor_diagonal():
    problem = CASE.build()
    optimizer, grads = _train(problem, OPTIMIZERS["adam"])
    names = [n for n, _ in problem.model.named_parameters()]
    sub = _operator(problem, params=names[2:])
    start = sum(p.numel() for p in list(problem.model.parameters())[:2])
    P = _closed_form("adam", grads)[start:]
    assert relative_error(ts.preconditioner_diagonal(optimizer, sub), P) < 1e-12
    H = _hessian(problem)[start:, start:]
    op = ts.PreconditionedOperator(sub, P)
    expected = torch.diag(P.rsqrt()) @ H @ torch.diag(P.rsqrt())
    assert relative_error(op @ torch.eye(len(P), dtype=F64), expected) < TOL
    delta = torch.ones(len(P), dtype=F64)
    assert relative_error(op.to_preconditioned(delta), P.sqrt()) < 1e-15


def test_a_ggn_can_be_preconditioned():
    problem = CASE.build()
    optimizer, grads = _train(problem, OPTIMIZERS["rmsprop"])
    ggn = ts.GGNOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    op = ts.PreconditionedOperator(ggn, optimizer)
    D = torch.diag(_closed_form("rmsprop", grads).rsqrt())
    G = ggn @ torch.eye(ggn.shape[0], dtype=F64)
    assert relative_error(op @ torch.eye(ggn.shape[0], dtype=F64), D @ G @ D) < TOL


# ------------------------------------------------------------------ bad input
def test_a_parameter_the_optimizer_does_not_update_is_refused():
    problem = CASE.build()
    params = list(problem.model.parameters())
    optimizer, _ = _train(problem, lambda ps: torch.optim.Adam(list(ps)[:2]))
    assert len(optimizer.param_groups[0]["params"]) == 2 < len(params)
    with pytest.raises(ValueError, match=r"parameter '2.weight' is measured by the operator but "
                                         r"not updated by the Adam optimizer"):
        ts.PreconditionedOperator(_operator(problem), optimizer)


def test_an_adaptive_optimizer_before_its_first_step_is_refused():
    problem = CASE.build()
    optimizer = torch.optim.Adam(problem.model.parameters())
    with pytest.raises(ValueError, match=r"has no state for parameter '0\.weight': take a step"):
        ts.PreconditionedOperator(_operator(problem), optimizer)


def test_unsupported_optimizers_and_operators_are_refused():
    problem = CASE.build()
    optimizer = torch.optim.Adadelta(problem.model.parameters())
    with pytest.raises(TypeError,
                       match="supports SGD, Adam, AdamW, RMSprop, Adagrad, got Adadelta"):
        ts.PreconditionedOperator(_operator(problem), optimizer)
    dense = ts.DenseOperator(torch.eye(3, dtype=F64))
    with pytest.raises(TypeError, match="no parameter layout and model"):
        ts.PreconditionedOperator(dense, torch.optim.SGD(problem.model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        ts.PreconditionedOperator(dense, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="finite and positive"):
        ts.PreconditionedOperator(dense, torch.tensor([1.0, 0.0, 2.0], dtype=F64))
