"""Bad input gets an exception that says what was expected and what arrived (STYLE.md point 9):
exact types and messages for the operator, the data, the parameters, the loss and the solver."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinysubspace as ts
from cases import Case
from reference import FlatLoss, reference_hessian, relative_error

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


@pytest.fixture
def problem():
    return Case("mlp_relu", "ce", "tuple").build()


@pytest.fixture
def op(problem):
    return problem.operator(dtype=F64)


# ------------------------------------------------------------------ products
@pytest.mark.parametrize("shape", [(3,), (52,), (50, 2), (51, 2, 1), ()])
def test_block_of_wrong_shape(op, shape):
    with pytest.raises(ValueError, match=r"expected a vector of shape \(51,\) or a block of shape "
                                         r"\(51, b\), got shape " + str(shape).replace("(", r"\(")
                                         .replace(")", r"\)")):
        op @ torch.ones(shape, dtype=F64)
    assert op.matvecs == 0


def test_block_that_is_not_a_tensor(op):
    with pytest.raises(TypeError, match=r"expected a torch.Tensor of shape \(51,\) or \(51, b\), "
                                        "got list"):
        op @ [1.0] * 51


def test_dense_operator_rejects_bad_matrices():
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        ts.DenseOperator(torch.ones(2, 3))
    with pytest.raises(ValueError,
                       match=r"symmetric matrix; max \|A - A\^T\| / max\|A\| = 1.00e\+00"):
        ts.DenseOperator(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="finite matrix; it has NaN or infinite entries"):
        ts.DenseOperator(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    asymmetric = ts.DenseOperator(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), check_symmetric=False)
    assert asymmetric.shape == (2, 2)


# ------------------------------------------------------------------ the solver's arguments
def test_k_not_below_p():
    A = ts.DenseOperator(torch.eye(6, dtype=F64))
    with pytest.raises(ValueError, match=r"k \+ skip = 6 must be smaller than the operator's "
                                         r"dimension p = 6"):
        ts.top_eigenpairs(A, k=6)
    with pytest.raises(ValueError, match=r"k \+ skip = 7 must be smaller .* p = 6"):
        ts.top_eigenpairs(A, k=7)
    with pytest.raises(ValueError, match=r"k \+ skip = 6 must be smaller .* p = 6"):
        ts.top_eigenpairs(A, k=3, skip=3)
    assert ts.top_eigenpairs(A, k=3, skip=2).values.shape == (3,)  # k + skip = p - 1 is fine


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "k must be a positive integer, got 0"),
    ({"k": 2.0}, "k must be a positive integer, got 2.0"),
    ({"k": 2, "skip": -1}, "skip must be a non-negative integer, got -1"),
    ({"k": 2, "tol": 0.0}, "tol must be positive, got 0.0"),
    ({"k": 2, "tol": -1e-6}, "tol must be positive, got -1e-06"),
    ({"k": 2, "tol": float("nan")}, "tol must be positive, got nan"),
    ({"k": 2, "block_size": 0}, "block_size must be at least 1, got 0"),
    ({"k": 2, "skip": 1, "basis_size": 3}, r"basis_size must exceed k \+ skip = 3, got 3"),
    ({"k": 2, "skip": 1, "max_matvecs": 2}, r"max_matvecs must be at least k \+ skip = 3 .* "
                                            r"got 2 \(needs 3\)"),
    ({"k": 2, "init": torch.ones(10, 4, dtype=F64), "max_matvecs": 3},
     r"at least the number of columns of init; got 3 \(needs 4\)"),
    ({"k": 2, "init": torch.ones(9, dtype=F64)}, r"init must have shape \(10,\) or \(10, m\), "
                                                 r"got \(9,\)"),
    ({"k": 2, "init": torch.ones(10, 2, 1, dtype=F64)},
     r"init must have shape .* got \(10, 2, 1\)"),
    ({"k": 2, "init": torch.full((10,), float("nan"), dtype=F64)}, "init has non-finite entries"),
])
def test_solver_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ts.top_eigenpairs(ts.DenseOperator(torch.eye(10, dtype=F64)), **kwargs)


def test_solver_stops_on_a_non_finite_operator():
    class Exploding(ts.DenseOperator):
        def _matmat(self, block):
            return super()._matmat(block) / 0.0

    with pytest.raises(FloatingPointError, match=r"operator returned non-finite values \(after 1 "
                                                 r"products\)"):
        ts.top_eigenpairs(Exploding(torch.eye(10, dtype=F64)), k=2)


def test_zero_init_is_replaced_by_a_random_start():
    A = torch.diag(torch.arange(10.0, 0.0, -1.0, dtype=F64))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=2, init=torch.zeros(10, dtype=F64),
                               tol=1e-10)
    assert torch.allclose(result.values, torch.tensor([10.0, 9.0], dtype=F64), atol=1e-9)


# ------------------------------------------------------------------ data
def test_empty_data_set(problem):
    X, Y = problem.inputs, problem.targets
    empty_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:0], Y[:0]),
                                               batch_size=4, generator=torch.Generator())
    for data in [(X[:0], Y[:0]), [], [(X[:0], Y[:0])], empty_loader]:
        with pytest.raises(ValueError, match="the data set is empty: the mean loss and its "
                                             "Hessian are undefined"):
            ts.HessianOperator(problem.model, problem.loss_fn, data)


def test_generator_as_data(problem):
    batches = ((x, y) for x, y in [(problem.inputs, problem.targets)])
    with pytest.raises(TypeError, match=r"data is a one-shot iterator \(e.g. a generator\)"):
        ts.HessianOperator(problem.model, problem.loss_fn, batches)
    with pytest.raises(TypeError, match="one-shot iterator"):
        ts.HessianOperator(problem.model, problem.loss_fn, iter([(problem.inputs,
                                                                  problem.targets)]))


def test_data_of_the_wrong_kind(problem):
    X, Y = problem.inputs, problem.targets
    with pytest.raises(TypeError, match=r"data must be a DataLoader, a re-iterable of .* got int"):
        ts.HessianOperator(problem.model, problem.loss_fn, 5)
    with pytest.raises(TypeError, match=r"batch 0 of data is not an \(inputs, targets\) pair "
                                        r"\(got Tensor\)"):
        ts.HessianOperator(problem.model, problem.loss_fn, [X])
    with pytest.raises(TypeError, match=r"batch 1 of data is not an \(inputs, targets\) pair "
                                        r"\(got tuple\)"):
        ts.HessianOperator(problem.model, problem.loss_fn, [(X, Y), (X, Y, Y)])
    with pytest.raises(ValueError, match=r"\(X, Y\) must have the same number of examples, got "
                                         "23 inputs and 22 targets"):
        ts.HessianOperator(problem.model, problem.loss_fn, (X, Y[:-1]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        ts.HessianOperator(problem.model, problem.loss_fn, (X, Y), batch_size=0)


def test_bad_mode(problem):
    with pytest.raises(ValueError, match="mode must be 'eval' or 'train', got 'test'"):
        problem.operator(mode="test")


# ------------------------------------------------------------------ parameters
def test_bad_parameter_selections(problem):
    model = problem.model
    with pytest.raises(ValueError, match="params is empty; pass None"):
        problem.operator(params=[])
    with pytest.raises(ValueError, match=r"unknown parameter name 'nope'; the model has: "
                                         r"0\.weight, 0\.bias, 2\.weight, 2\.bias"):
        problem.operator(params=["nope"])
    with pytest.raises(ValueError, match=r"a tensor of shape \(3,\) in params is not a parameter"):
        problem.operator(params=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"parameter '0\.bias' is named twice in params"):
        problem.operator(params=["0.bias", model[0].bias])
    with pytest.raises(TypeError, match="params must hold parameter names or tensors, got int"):
        problem.operator(params=[3])
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no parameter that requires grad"):
        problem.operator()


def test_single_name_or_tensor_as_params(problem):
    by_name = problem.operator(params="2.bias", dtype=F64)
    by_tensor = problem.operator(params=problem.model[0].weight, dtype=F64)
    assert by_name.layout.names == ("2.bias",) and by_name.shape == (3, 3)
    assert by_tensor.layout.names == ("0.weight",) and by_tensor.shape == (24, 24)


class WithUnused(nn.Module):
    """An MLP with a layer the loss never sees, and a frozen scale (requires_grad=False)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.unused = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor([1.5]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.mlp(x)


@pytest.mark.parametrize("method", ["product", "solver"])
def test_unused_and_frozen_parameters(problem, method):
    with torch.random.fork_rng():
        model = WithUnused(problem.model)
    op = ts.HessianOperator(model, problem.loss_fn, problem.data, dtype=F64,
                            **problem.data_kwargs)
    assert op.layout.names == ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                               "unused.weight", "unused.bias")  # frozen scale left out
    p = op.shape[0]
    assert p == 51 + 8
    H = op @ torch.eye(p, dtype=F64)
    assert torch.count_nonzero(H[51:]) == 0 and torch.count_nonzero(H[:, 51:]) == 0
    f = FlatLoss(model, problem.loss_fn, problem.inputs, problem.targets, names=op.layout.names)
    assert relative_error(H, reference_hessian(f)) < 1e-10
    _, g = op.loss_and_gradient()
    assert torch.count_nonzero(g[51:]) == 0 and torch.count_nonzero(g[:51]) > 0
    if method == "solver":  # no crash on the zero directions
        result = ts.top_eigenpairs(op, k=2, tol=1e-8)
        assert result.converged and torch.all(result.vectors[51:].abs() < 1e-6)
    with_frozen = ts.HessianOperator(model, problem.loss_fn, problem.data, dtype=F64,
                                     params=["scale", "unused.bias"])
    H2 = with_frozen @ torch.eye(3, dtype=F64)
    assert float(H2[0, 0]) > 0 and torch.count_nonzero(H2[1:]) == 0


# ------------------------------------------------------------------ the loss
def test_loss_that_is_not_a_scalar(problem):
    op = ts.HessianOperator(problem.model, nn.CrossEntropyLoss(reduction="none"), problem.data)
    message = (r"loss_fn must return a scalar \(mean-reduced\) tensor, got \(23,\); "
               "use reduction='mean'")
    with pytest.raises(ValueError, match=message):
        op.loss_and_gradient()
    with pytest.raises(ValueError, match=message):
        op @ torch.ones(op.shape[0])
    as_float = ts.HessianOperator(problem.model, lambda out, y: 1.0, problem.data)
    with pytest.raises(ValueError, match=r"scalar .* got float"):
        as_float.loss_and_gradient()


class Power(nn.Module):
    """``linear(x) + |w|^1.5`` at ``w = 0``: finite loss and gradient, infinite curvature."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.w.abs() ** 1.5


class Sqrt(nn.Module):
    """``linear(x) + sqrt|s x_0|``: its gradient in ``s`` is infinite where ``x_0 = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x[:, :1] * self.scale).abs().sqrt()


def _regression_batches(bad_batch: int | None = None, value: float = 0.0):
    X, Y = torch.ones(9, 2, dtype=F64), torch.zeros(9, 1, dtype=F64)
    if bad_batch is not None:
        X[3 * bad_batch + 1, 0] = value
    return [(X[i:i + 3], Y[i:i + 3]) for i in (0, 3, 6)]


def _model(cls: type[nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        return cls().double()


def test_non_finite_loss_names_the_batch():
    op = ts.HessianOperator(_model(Sqrt), nn.MSELoss(), _regression_batches(2, float("inf")))
    with pytest.raises(ts.NonFiniteError, match=r"the loss of batch 2 is (inf|nan) \(not finite\)"):
        op.loss_and_gradient()
    with pytest.raises(ts.NonFiniteError, match="the loss of batch 2"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_non_finite_gradient_names_batch_and_parameter():
    op = ts.HessianOperator(_model(Sqrt), nn.MSELoss(), _regression_batches(1))
    with pytest.raises(ts.NonFiniteError, match="the gradient of batch 1 is not finite in "
                                                "parameter 'scale'"):
        op.loss_and_gradient()


def test_non_finite_hessian_vector_product_names_the_parameter():
    op = ts.HessianOperator(_model(Power), nn.MSELoss(), _regression_batches())
    _, g = op.loss_and_gradient()  # loss and gradient are finite
    assert torch.isfinite(g).all()
    with pytest.raises(ts.NonFiniteError, match="the Hessian-vector product is not finite in "
                                                "parameter 'w'"):
        op @ torch.ones(op.shape[0], dtype=F64)
    with pytest.raises(ts.NonFiniteError):
        ts.top_eigenpairs(op, k=1)
    assert issubclass(ts.NonFiniteError, FloatingPointError)


def test_unknown_hvp_method_is_rejected_at_construction():
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws from the global RNG
        model = torch.nn.Linear(3, 2)
    data = (torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="hvp_method must be one of"):
        ts.HessianOperator(model, torch.nn.functional.cross_entropy, data, hvp_method="magic")
    op = ts.HessianOperator(model, torch.nn.functional.cross_entropy, data, hvp_method="jvp",
                            dtype=torch.float64)
    reference = ts.HessianOperator(model, torch.nn.functional.cross_entropy, data,
                                   dtype=torch.float64)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=gen)
    assert torch.allclose(op @ v, reference @ v, rtol=1e-12, atol=1e-14)


def test_dict_batches_for_a_model_that_takes_one_tensor_say_how_they_are_called():
    """Was: torch's `forward() got an unexpected keyword argument 'image'` from inside the
    operator. Now: how dict batches are called and how to adapt; the pairs it suggests work."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3))
    loader = torch.utils.data.DataLoader(
        [{"image": x, "labels": y} for x, y in zip(X, Y, strict=True)], batch_size=5,
        generator=torch.Generator().manual_seed(0))  # (its base seed leaves the global RNG)
    op = ts.HessianOperator(model, nn.functional.cross_entropy, loader, dtype=F64)
    with pytest.raises(TypeError, match=r"a batch that is a dict is called as model\(\*\*batch\), "
                                        r"its keys \('image', 'labels'\) as keyword arguments, "
                                        r"with batch\['labels'\] as the targets; the model does "
                                        r"not take them \(.*unexpected keyword argument 'image'"
                                        r".*\(inputs, targets\) pairs"):
        op.loss_and_gradient()
    pairs = [(b["image"], b["labels"]) for b in loader]  # the advice, as written
    dense = reference_hessian(FlatLoss(model, nn.functional.cross_entropy, X, Y))
    op = ts.HessianOperator(model, nn.functional.cross_entropy, pairs, dtype=F64)
    eye = torch.eye(op.shape[0], dtype=F64)
    assert relative_error(op @ eye, dense) < 1e-10
