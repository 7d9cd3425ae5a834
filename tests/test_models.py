"""The paper's networks: shapes, parameter counts worked by hand, readable parameter groups, and
exact Hessian-vector products against a dense float64 reference Hessian (itself checked against
central finite differences of the gradient)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional

from tinysubspace import HessianOperator
from tinysubspace.problems.models import (
    build_model,
    label_parameters,
    model_names,
    parameter_group_slices,
    parameter_groups,
)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def conv(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


# ------------------------------------------------------------------------- parameter counts
def test_fc_parameter_count_matches_hand_computation():
    model = build_model("fc", (64,), 10)
    # 64·100 + 100 + 100·100 + 100 + 100·10 + 10
    assert count(model) == 6400 + 100 + 10000 + 100 + 1000 + 10 == 17_610


def test_softmax_and_fc_counts_for_mnist_shapes():
    assert count(build_model("softmax", (1, 28, 28), 10)) == dense(784, 10) == 7850
    fc = build_model("fc", (1, 28, 28), 10, widths=(32, 32), activation="softplus")
    assert count(fc) == dense(784, 32) + dense(32, 32) + dense(32, 10)


def test_convnet_counts_match_the_keras_example():
    # Keras cifar10_cnn.py summary: 896 + 9248 + 18496 + 36928 + 1180160 + 5130 = 1,250,858
    keras = conv(3, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + dense(64 * 6 * 6, 512) \
        + dense(512, 10)
    assert keras == 1_250_858
    assert count(build_model("convnet", (3, 32, 32), 10)) == keras
    # 28×28: 28 → 28 → 26 → 13 → 13 → 11 → 5
    mnist = conv(1, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + dense(64 * 5 * 5, 512) \
        + dense(512, 10)
    assert count(build_model("convnet", (1, 28, 28), 10)) == mnist
    full = build_model("convnet", (3, 32, 32), 10, dropout=True, batchnorm=True, extra_dense=True)
    assert count(full) == keras + 2 * (32 + 32 + 64 + 64) + dense(512, 512)
    kinds = [type(m).__name__ for m in full]
    assert kinds.count("Dropout") == 4 and kinds.count("BatchNorm2d") == 4
    assert [m.p for m in full if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25, 0.5, 0.5]


def test_resnet18_count_matches_hand_computation():
    def block(c_in: int, c_out: int) -> int:
        shortcut = conv(c_in, c_out, 1, bias=False) + 2 * c_out if c_in != c_out else 0
        return conv(c_in, c_out, bias=False) + conv(c_out, c_out, bias=False) + 4 * c_out \
            + shortcut

    def resnet(width: int, classes: int) -> int:
        total, c = conv(3, width, bias=False) + 2 * width, width
        for multiple in (1, 2, 4, 8):
            total += block(c, width * multiple) + block(width * multiple, width * multiple)
            c = width * multiple
        return total + dense(c, classes)

    assert resnet(64, 10) == 11_173_962  # the usual CIFAR ResNet-18
    assert count(build_model("resnet18", (3, 32, 32), 10)) == 11_173_962
    assert count(build_model("resnet18", (3, 32, 32), 10, width=1)) == resnet(1, 10)


@pytest.mark.parametrize(("name", "shape", "options"), [
    ("softmax", (64,), {}),
    ("fc", (1, 28, 28), {"widths": (8, 8), "activation": "tanh"}),
    ("convnet", (1, 28, 28), {"channels": (4, 8), "dense": 16}),
    ("convnet", (3, 32, 32), {"channels": (4, 8), "dense": 16, "dropout": True,
                              "batchnorm": True, "extra_dense": True}),
    ("resnet18", (3, 32, 32), {"width": 2}),
    ("resnet18", (1, 28, 28), {"width": 2}),
])
def test_forward_shapes(name, shape, options):
    model = build_model(name, shape, 7, **options).eval()
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_regression_fc_has_one_output():
    model = build_model("fc", (1,), 1, widths=(16, 16))
    assert model(torch.zeros(5, 1)).shape == (5, 1)


# ---------------------------------------------------------------------------- construction
def test_seeded_initialisation_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("fc", (10,), 3, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("fc", (10,), 3, seed=4)
    c = build_model("fc", (10,), 3, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.hidden1.weight, c.hidden1.weight)


def test_glorot_init_zero_biases_and_bounded_weights():
    model = build_model("convnet", (3, 12, 12), 4, channels=(3, 5), dense=6, init="glorot")
    for module in model:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert torch.count_nonzero(module.bias) == 0
            receptive = module.weight[0, 0].numel() if module.weight.ndim == 4 else 1
            fan_in, fan_out = module.weight.shape[1] * receptive, module.weight.shape[0] * receptive
            assert module.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5


def test_model_names():
    assert model_names() == ["convnet", "fc", "gpt", "resnet18", "softmax"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: build_model("vgg", (3, 32, 32), 10), r"unknown model 'vgg'; known: convnet, fc"),
    (lambda: build_model("fc", (64,), 10, width=3), r"unknown option\(s\) width .*widths"),
    (lambda: build_model("fc", (64,), 10, activation="gelu"), r"unknown activation 'gelu'"),
    (lambda: build_model("fc", (64,), 10, widths=(10, 0)), r"widths must be a tuple of posi"),
    (lambda: build_model("convnet", (64,), 10), r"convnet needs image inputs"),
    (lambda: build_model("convnet", (1, 8, 8), 10), r"at least 10×10 .*got 8×8"),
    (lambda: build_model("convnet", (1, 28, 28), 10, dropout=0.5), r"dropout must be True or"),
    (lambda: build_model("resnet18", (3, 32, 32), 10, width=0), r"width must be a tuple"),
    (lambda: build_model("softmax", (64,), 0), r"num_outputs must be"),
    (lambda: build_model("softmax", (64,), 3, init="he"), r"unknown init 'he'"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------ parameter groups
def test_fc_parameter_groups_are_figure_6_labels():
    model = build_model("fc", (64,), 10)
    assert parameter_groups(model) == [
        ("layer 1 weights", ["hidden1.weight"]), ("layer 1 biases", ["hidden1.bias"]),
        ("layer 2 weights", ["hidden2.weight"]), ("layer 2 biases", ["hidden2.bias"]),
        ("top layer weights", ["top.weight"]), ("top layer biases", ["top.bias"]),
    ]
    slices = dict(parameter_group_slices(model))
    assert slices["layer 1 weights"] == slice(0, 6400)
    assert slices["top layer biases"] == slice(17_600, 17_610)


@pytest.mark.parametrize(("name", "shape", "options"), [
    ("softmax", (5,), {}),
    ("convnet", (1, 10, 10), {"channels": (2, 3), "dense": 4, "batchnorm": True,
                              "extra_dense": True}),
    ("resnet18", (3, 8, 8), {"width": 1}),
])
def test_groups_tile_the_parameters_in_order(name, shape, options):
    model = build_model(name, shape, 3, **options)
    names = [n for _, group in parameter_groups(model) for n in group]
    assert names == [n for n, _ in model.named_parameters()]
    labels = [label for label, _ in parameter_groups(model)]
    assert len(set(labels)) == len(labels)
    assert labels[-2:] == ["top layer weights", "top layer biases"]
    slices = [s for _, s in parameter_group_slices(model)]
    assert slices[0].start == 0 and slices[-1].stop == count(model)
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))


def test_groups_skip_frozen_parameters():
    model = build_model("convnet", (1, 10, 10), 3, channels=(2, 3), dense=4, batchnorm=True)
    assert ("layer 1 batch-norm scales", ["bn1.weight"]) in parameter_groups(model)
    model.conv1.weight.requires_grad_(False)
    groups = parameter_groups(model)
    assert groups[0] == ("layer 1 biases", ["conv1.bias"])
    assert len(parameter_groups(model, trainable_only=False)) == len(groups) + 1


@pytest.mark.parametrize(("name", "shape", "options"), [
    ("fc", (7,), {"widths": (6, 5)}),
    ("convnet", (1, 10, 10), {"channels": (2, 3), "dense": 4, "batchnorm": True}),
    ("resnet18", (3, 8, 8), {"width": 1}),
])
def test_saved_names_and_shapes_give_the_models_labels(name, shape, options):
    """Fig. 6 from an eigenvector file (names and shapes only) labels as the model does."""
    model = build_model(name, shape, 3, **options)
    named = list(model.named_parameters())
    groups = label_parameters([n for n, _ in named], [list(p.shape) for _, p in named])
    assert [(g.label, [g.name]) for g in groups] == parameter_groups(model)
    assert [slice(g.start, g.stop) for g in groups] == [s for _, s in
                                                        parameter_group_slices(model)]


def test_other_normalisations_and_modules_are_named_by_kind():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2))
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(())))
    labels = [label for label, _ in parameter_groups(model)]
    assert labels == ["scale", "layer 1 weights", "layer 1 biases", "layer 1 LayerNorm scales",
                      "layer 1 LayerNorm shifts", "top layer weights", "top layer biases"]


def test_tied_parameters_are_labelled_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight
    groups = parameter_groups(model)
    assert [n for _, names in groups for n in names] == [n for n, _ in model.named_parameters()]
    assert parameter_group_slices(model)[-1][1].stop == count(model)


# --------------------------------------------------------------------- Hessian-vector products
@dataclass(frozen=True)
class Case:
    """A tiny instance of a model with its data and loss."""

    name: str
    shape: tuple[int, ...]
    outputs: int = 3
    options: dict = field(default_factory=dict)
    regression: bool = False


CASES = {
    "softmax": Case("softmax", (1, 4, 4)),
    "fc-relu": Case("fc", (7,), options={"widths": (6, 5)}),
    "fc-softplus": Case("fc", (7,), options={"widths": (6, 5), "activation": "softplus"}),
    "fc-tanh": Case("fc", (7,), options={"widths": (6, 5), "activation": "tanh"}),
    "fc-regression": Case("fc", (1,), 1, {"widths": (8, 8), "activation": "tanh"}, True),
    "convnet": Case("convnet", (1, 10, 10), options={"channels": (2, 3), "dense": 4}),
    "convnet-regularised": Case("convnet", (3, 10, 10), options={
        "channels": (2, 3), "dense": 4, "dropout": True, "batchnorm": True, "extra_dense": True}),
    "resnet18": Case("resnet18", (3, 4, 4), options={"width": 1}),
}


def instance(case: Case, n: int = 6, seed: int = 0):
    """A float64 eval-mode model (batch-norm statistics and affine parameters randomised, so
    eval-mode batch norm is not the identity), data and loss."""
    model = build_model(case.name, case.shape, case.outputs, seed=seed, **case.options)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                module.bias.copy_(0.3 * torch.randn(c, generator=gen))
    model = model.double().eval()
    X = torch.randn(n, *case.shape, generator=gen, dtype=torch.float64)
    if case.regression:
        Y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        return model, X, Y, functional.mse_loss
    return model, X, torch.randint(0, case.outputs, (n,), generator=gen), functional.cross_entropy


def flat_loss(model, X, Y, loss_fn, names=None):
    """The loss as a function of a flat vector of (the named) parameters; and that vector."""
    chosen = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters() if names and n not in names}
    fixed.update(dict(model.named_buffers()))

    def loss(flat: torch.Tensor) -> torch.Tensor:
        state, start = dict(fixed), 0
        for name, p in chosen:
            state[name] = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
        return loss_fn(functional_call(model, state, (X,)), Y)

    return loss, torch.cat([p.detach().reshape(-1) for _, p in chosen])


def dense_hessian(model, X, Y, loss_fn, names=None) -> torch.Tensor:
    loss, theta = flat_loss(model, X, Y, loss_fn, names)
    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_block(p: int, columns: int = 3, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, columns, generator=gen, dtype=torch.float64)


FAST = [name for name in CASES if name != "resnet18"]


@pytest.mark.parametrize("case", FAST)
def test_hessian_operator_matches_dense_reference(case):
    model, X, Y, loss_fn = instance(CASES[case])
    H = dense_hessian(model, X, Y, loss_fn)
    assert relative(H, H.T) < 1e-12
    op = HessianOperator(copy.deepcopy(model).float().train(), loss_fn, (X, Y),
                         dtype=torch.float64)  # the operator measures in eval mode
    V = random_block(H.shape[0])
    assert relative(op @ V, H @ V) < 1e-9


@pytest.mark.parametrize("case", FAST)
def test_dense_reference_agrees_with_finite_differences(case):
    model, X, Y, loss_fn = instance(CASES[case])
    loss, theta = flat_loss(model, X, Y, loss_fn)
    H = dense_hessian(model, X, Y, loss_fn)
    v = random_block(theta.numel(), 1)[:, 0]
    eps = 1e-5
    grad = [torch.autograd.functional.jacobian(loss, theta + s * eps * v) for s in (1, -1)]
    assert relative((grad[0] - grad[1]) / (2 * eps), H @ v) < 1e-6


def test_resnet18_block_of_parameters_matches_dense_reference():
    """ResNet-18 (width 1): the Hessian with respect to parameters spread over the network
    (stem batch norm, a strided block's convolution and shortcut, the last block, the top)."""
    model, X, Y, loss_fn = instance(CASES["resnet18"])
    names = ["stem.bn.weight", "stage2.block1.conv1.weight", "stage2.block1.shortcut.conv.weight",
             "stage4.block2.bn2.bias", "stage4.block2.conv2.weight", "top.weight", "top.bias"]
    H = dense_hessian(model, X, Y, loss_fn, names)
    op = HessianOperator(model, loss_fn, (X, Y), params=names)
    assert op.shape[0] == H.shape[0] > 50
    V = random_block(H.shape[0])
    assert relative(op @ V, H @ V) < 1e-9


@pytest.mark.slow
def test_resnet18_full_hessian_matches_dense_reference():
    model, X, Y, loss_fn = instance(CASES["resnet18"], n=4)
    H = dense_hessian(model, X, Y, loss_fn)  # p = 2,928: about 20 s on one core
    op = HessianOperator(model, loss_fn, (X, Y), batch_size=3)  # batches of unequal size
    V = random_block(H.shape[0])
    assert relative(op @ V, H @ V) < 1e-9
