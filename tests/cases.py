"""The one shared list of test cases: models × losses × data layouts × seeds (STYLE.md point 5).

Every curvature test and every solver test draws its problems from here, so a new model or data
layout is added once and checked by every suite. Import it from any test module::

    from cases import CASES, Case

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_something(case):
        problem = case.build()
        op = problem.operator(dtype=torch.float64)

A case is cheap to build (tens of examples, tens of parameters) so that a dense float64 reference
Hessian (``reference.py``) is a fraction of a second. Models are built in float32, as users build
them; measure in float64 with ``problem.operator(dtype=torch.float64)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import tinysubspace as ts

__all__ = [
    "CASES",
    "DATA_LAYOUTS",
    "LOSSES",
    "MODELS",
    "NUM_CLASSES",
    "NUM_EXAMPLES",
    "Case",
    "CountingData",
    "Problem",
    "build_model",
    "make_inputs",
    "ten_class_problem",
]

NUM_EXAMPLES = 23  # odd, so that every split below has batches of unequal size
NUM_CLASSES = 3
IN_FEATURES = 4
IMAGE = (1, 5, 5)  # channels, height, width of the CNN's inputs
BATCH_SIZES = (5, 11, 7)  # the "batches" layout: a list of unequal batches
LOADER_BATCH = 10  # the "loader" layout: batches 10, 10, 3
TUPLE_CHUNK = 9  # the "tuple" layout: (X, Y) split by the operator into 9, 9, 5


def _randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Give affine norm layers and batch-norm running statistics non-trivial values."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                sub.weight.copy_(1 + 0.5 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.5 * torch.randn(sub.bias.shape, generator=generator))
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.copy_(0.3 * torch.randn(sub.running_mean.shape,
                                                         generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape,
                                                       generator=generator))


def _mlp(activation: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_FEATURES, 6), activation, nn.Linear(6, NUM_CLASSES))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp_relu": lambda: _mlp(nn.ReLU()),
    "mlp_softplus": lambda: _mlp(nn.Softplus()),
    "mlp_layernorm": lambda: nn.Sequential(nn.Linear(IN_FEATURES, 6), nn.LayerNorm(6), nn.Tanh(),
                                           nn.Linear(6, NUM_CLASSES)),
    "cnn_batchnorm": lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(2 * 3 * 3, NUM_CLASSES)),
    "softmax_regression": lambda: nn.Linear(IN_FEATURES, NUM_CLASSES),
}
"""Model builders (float32, eval-mode-safe); the CNN's batch norm has random running statistics."""

LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "ce": nn.CrossEntropyLoss(),  # integer class targets
    "mse": nn.MSELoss(),  # float targets of shape (N, NUM_CLASSES)
}

DATA_LAYOUTS = ("tuple", "batches", "loader")


def build_model(name: str, seed: int) -> nn.Module:
    """Model ``name`` with weights drawn from ``seed`` (global RNG untouched)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # nn.Module's default initialisation draws from the global RNG
        model = MODELS[name]()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.6 * torch.randn(param.shape, generator=generator))
    _randomize_(model, generator)
    return model.eval()


def make_inputs(model_name: str, loss_name: str, seed: int,
                num_examples: int = NUM_EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set ``(X, Y)`` of a case (float32 inputs; long or float targets)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    shape = IMAGE if model_name.startswith("cnn") else (IN_FEATURES,)
    X = torch.randn(num_examples, *shape, generator=generator)
    if loss_name == "ce":
        Y = torch.randint(NUM_CLASSES, (num_examples,), generator=generator)
    else:
        Y = torch.randn(num_examples, NUM_CLASSES, generator=generator)
    return X, Y


class CountingData:
    """A re-iterable list of batches that counts the passes made over it."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@dataclass(frozen=True)
class Problem:
    """A model, a loss and a data set, laid out as the case says.

    Attributes:
        model: the float32 model (in eval mode).
        loss_fn: mean-reduced loss ``loss_fn(outputs, targets)``.
        data: the data as :class:`tinysubspace.HessianOperator` takes it.
        inputs, targets: the whole data set in one tensor each (for references).
        data_kwargs: extra keyword arguments the operator needs for this layout.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    data: Any
    inputs: torch.Tensor
    targets: torch.Tensor
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    def operator(self, **kwargs: Any) -> ts.HessianOperator:
        """``HessianOperator(model, loss_fn, data, **kwargs)`` for this problem."""
        return ts.HessianOperator(self.model, self.loss_fn, self.data,
                                  **{**self.data_kwargs, **kwargs})


def _layout(kind: str, X: torch.Tensor, Y: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    if kind == "tuple":
        return (X, Y), {"batch_size": TUPLE_CHUNK}
    if kind == "batches":
        bounds = list(itertools.accumulate(BATCH_SIZES, initial=0))
        assert bounds[-1] == X.shape[0]
        return [(X[a:b], Y[a:b]) for a, b in itertools.pairwise(bounds)], {}
    if kind == "loader":
        dataset = torch.utils.data.TensorDataset(X, Y)
        # a generator of its own: a DataLoader otherwise draws its base seed from the global RNG
        loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, shuffle=False,
                                             generator=torch.Generator().manual_seed(0))
        return loader, {}
    raise ValueError(f"unknown data layout {kind!r}; known: {DATA_LAYOUTS}")


@dataclass(frozen=True)
class Case:
    """One test case: which model, loss, data layout and seed."""

    model: str
    loss: str
    data: str
    seed: int = 0

    def __str__(self) -> str:
        return f"{self.model}-{self.loss}-{self.data}-s{self.seed}"

    def build(self) -> Problem:
        """A fresh model and data set for this case (deterministic, global RNG untouched)."""
        model = build_model(self.model, self.seed)
        X, Y = make_inputs(self.model, self.loss, self.seed)
        data, kwargs = _layout(self.data, X, Y)
        return Problem(model, LOSSES[self.loss], data, X, Y, kwargs)


SEEDS = (0, 1)

CASES: list[Case] = [Case(model, loss, data, seed)
                     for model, loss, data, seed in itertools.product(MODELS, LOSSES,
                                                                      DATA_LAYOUTS, SEEDS)]
"""Every model × loss × data layout × seed."""


def ten_class_problem(num_examples: int = 200, seed: int = 5, steps: int = 100) -> Problem:
    """A 10-class cross-entropy MLP (8 → 16 → 10, p = 314) after ``steps`` of full-batch GD.

    Clustered Gaussian inputs, one ``(X, Y)`` batch. After training, the Hessian's tenth
    eigenvalue sits at the edge of the bulk (defaults: ``λ10 / λ11 ≈ 1.006``, ``λ9 / λ10 ≈ 1.10``):
    the hard case for a top-10 eigensolver. Trained in float64, returned in float32 (eval mode).
    """
    generator = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(10, 8, generator=generator, dtype=torch.float64)
    Y = torch.arange(num_examples) % 10
    X = means[Y] + torch.randn(num_examples, 8, generator=generator, dtype=torch.float64)
    with torch.random.fork_rng():
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return Problem(model.float().eval(), nn.CrossEntropyLoss(), (X.float(), Y), X.float(), Y)
