"""The paper's networks, built by name, with stable readable parameter names.

================  ==============================================================================
name              what
================  ==============================================================================
``softmax``       softmax regression: flatten, one linear layer (Table 1, "no hidden layer")
``fc``            flatten, fully connected hidden layers ``widths`` (default (100, 100), ReLU;
                  the FC of Figs. 1-3, 6, 7, 11), then the top layer; also for regression
``convnet``       the Keras CIFAR-10 example CNN (Chollet et al. 2015, ``cifar10_cnn.py``):
                  conv32 same, conv32 valid, max-pool, conv64 same, conv64 valid, max-pool,
                  dense 512, top; ReLUs; optional dropout / batch norm / extra dense layer
``resnet18``      ResNet-18, CIFAR variant (see :mod:`tinysubspace.problems.models.resnet`)
``gpt``           decoder-only transformer on token ids (:mod:`tinysubspace.problems.models.gpt`)
================  ==============================================================================

Every model is an ``nn.Module`` whose layers are named children (``hidden1``, ``conv3``, ``top``
…), so ``named_parameters()`` reads ``hidden1.weight``, ``top.bias``;
:func:`tinysubspace.problems.models.anatomy.parameter_groups`
turns those into the labels of Fig. 6 ("layer 1 weights", …, "top layer biases").

Initialisation is seeded (``seed``) without touching the global random state; ``init="torch"``
keeps PyTorch's defaults, ``init="glorot"`` uses Keras's (Glorot-uniform weights, zero biases).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tinysubspace.problems.models.gpt import build_gpt
from tinysubspace.problems.models.resnet import ResNet18
from tinysubspace.problems.registry import check_options, lookup

__all__ = ["build_model", "model_names"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "linear": nn.Identity,
}
INITS = ("torch", "glorot")
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


# ------------------------------------------------------------------------------------ builders
def _softmax(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """``flatten → top`` (logits; the softmax is in the cross-entropy loss)."""
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(),
                                     top=nn.Linear(_numel(input_shape), num_outputs)))


def _fc(input_shape: tuple[int, ...], num_outputs: int, *, widths: Sequence[int] = (100, 100),
        activation: str = "relu") -> nn.Module:
    """``flatten → hidden1 → act1 → … → top``."""
    widths = _positive_ints(widths, "widths", allow_empty=True)
    act = _choice(activation, ACTIVATIONS, "activation")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    fan_in = _numel(input_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"hidden{i}"] = nn.Linear(fan_in, width)
        layers[f"act{i}"] = act()
        fan_in = width
    layers["top"] = nn.Linear(fan_in, num_outputs)
    return nn.Sequential(layers)


def _convnet(input_shape: tuple[int, ...], num_outputs: int, *,
             channels: Sequence[int] = (32, 64), dense: int = 512, dropout: bool = False,
             batchnorm: bool = False, extra_dense: bool = False) -> nn.Module:
    """The Keras CIFAR-10 example CNN; ``dropout`` adds its dropouts (0.25, 0.25, 0.5),
    ``batchnorm`` a BatchNorm after each convolution, ``extra_dense`` a second dense layer."""
    c, h, w = _image_shape(input_shape, "convnet")
    c1, c2 = _positive_ints(channels, "channels", length=2)
    (dense,) = _positive_ints([dense], "dense")
    flags = {"dropout": dropout, "batchnorm": batchnorm, "extra_dense": extra_dense}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if min(h, w) < 10:
        raise ValueError(f"convnet needs images of at least 10×10 (two valid 3×3 convolutions and "
                         f"two 2×2 poolings), got {h}×{w}")
    layers = _conv_stages(c, c1, c2, batchnorm, dropout)
    layers["flatten"] = nn.Flatten()
    size = [((s - 2) // 2 - 2) // 2 for s in (h, w)]  # same, valid, pool, same, valid, pool
    fan_in = c2 * size[0] * size[1]
    for j in range(1, 3 if extra_dense else 2):
        layers[f"dense{j}"] = nn.Linear(fan_in, dense)
        layers[f"relu{4 + j}"] = nn.ReLU()
        if dropout:
            layers[f"drop{2 + j}"] = nn.Dropout(0.5)
        fan_in = dense
    layers["top"] = nn.Linear(fan_in, num_outputs)
    return nn.Sequential(layers)


def _conv_stages(c: int, c1: int, c2: int, batchnorm: bool,
                 dropout: bool) -> OrderedDict[str, nn.Module]:
    """``conv1`` (same) ``conv2`` (valid) ``pool1`` with ``c1`` channels, then ``conv3``
    ``conv4`` ``pool2`` with ``c2``; ReLUs, optional batch norms and dropouts (0.25)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    ins, outs = [c, c1, c1, c2], [c1, c1, c2, c2]
    for i in range(4):
        layers[f"conv{i + 1}"] = nn.Conv2d(ins[i], outs[i], 3, padding=1 if i % 2 == 0 else 0)
        if batchnorm:
            layers[f"bn{i + 1}"] = nn.BatchNorm2d(outs[i])
        layers[f"relu{i + 1}"] = nn.ReLU()
        if i % 2 == 1:
            layers[f"pool{i // 2 + 1}"] = nn.MaxPool2d(2)
            if dropout:
                layers[f"drop{i // 2 + 1}"] = nn.Dropout(0.25)
    return layers


def _resnet18(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64) -> nn.Module:
    """ResNet-18 (CIFAR variant) with ``width, 2·width, 4·width, 8·width`` channels."""
    c, _, _ = _image_shape(input_shape, "resnet18")
    (width,) = _positive_ints([width], "width")
    return ResNet18(c, num_outputs, width=width)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "softmax": _softmax, "fc": _fc, "convnet": _convnet, "resnet18": _resnet18,
    "gpt": build_gpt,
}


def model_names() -> list[str]:
    """The names :func:`build_model` knows."""
    return sorted(_BUILDERS)


def build_model(name: str, input_shape: Sequence[int], num_outputs: int, *, seed: int = 0,
                init: str = "torch", **options: object) -> nn.Module:
    """Build one of the paper's networks (float32, train mode, on the CPU).

    Args:
        name: ``softmax``, ``fc``, ``convnet`` or ``resnet18`` (see the module docstring).
        input_shape: the shape of one input without the batch dimension, e.g. ``(64,)``,
            ``(1, 28, 28)``, ``(3, 32, 32)``.
        num_outputs: classes (logits), or regression outputs.
        seed: seed of the initial weights (the global random state is left as it was).
        init: ``"torch"`` (PyTorch's default initialisation) or ``"glorot"`` (Keras's:
            Glorot-uniform weights of linear and convolution layers, zero biases).
        **options: the model's own options: ``fc``: ``widths``, ``activation`` (relu, softplus,
            tanh, linear); ``convnet``: ``channels``, ``dense``, ``dropout``, ``batchnorm``,
            ``extra_dense``; ``resnet18``: ``width``; ``gpt``: ``n_layer``, ``n_head``,
            ``n_embd``, ``context_length``, ``vocab``, ``bias``, ``tie_weights``.

    Raises:
        ValueError: an unknown name or option (the known ones are listed), or a bad value.
    """
    key, builder = lookup(_BUILDERS, name, "model")
    check_options(options, builder, f"model {key!r}", also_known=("seed", "init"))
    shape = tuple(_positive_ints(input_shape, "input_shape"))
    (num_outputs,) = _positive_ints([num_outputs], "num_outputs")
    _choice(init, dict.fromkeys(INITS), "init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(shape, num_outputs, **options)
        if init == "glorot":
            _glorot_init(model)
    return model


def _glorot_init(model: nn.Module) -> None:
    """Keras defaults: Glorot-uniform weights and zero biases in linear and conv layers."""
    for module in model.modules():
        if isinstance(module, _LAYERS):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------- validation
def _positive_ints(values: object, what: str, length: int | None = None,
                   allow_empty: bool = False) -> list[int]:
    items = list(values) if isinstance(values, (list, tuple, torch.Size)) else None
    ok = items is not None and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                   for v in items)
    if ok and length is not None:
        ok = len(items) == length
    if ok and not allow_empty:
        ok = len(items) > 0
    if not ok:
        count = f"{length} " if length is not None else ""
        raise ValueError(f"{what} must be a tuple of {count}positive integers, got {values!r}")
    return items


def _choice(value: object, known: dict, what: str) -> object:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    return known[value]


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs image inputs (channels, height, width), got "
                         f"input_shape {input_shape}; e.g. load digits with images=True")
    c, h, w = input_shape
    return c, h, w


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())
