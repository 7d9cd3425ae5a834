"""A network's anatomy: each parameter labelled by layer and kind ("layer 1 weights", "layer 2
batch-norm scales", "top layer biases"), with its range in the flat parameter vector.

Fig. 6 colours an eigenvector's entries by these labels, and per-layer curvature groups the
parameters by them; they are read off the module tree (:func:`parameter_groups`) or, for a saved
run, off the parameter names and shapes alone (:func:`label_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["ParameterGroup", "label_parameters", "parameter_group_slices", "parameter_groups"]

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ParameterGroup:
    """One parameter's label and its range in the flat parameter vector.

    Attributes:
        label: e.g. ``"layer 1 weights"``, ``"layer 2 batch-norm scales"``, ``"top layer biases"``.
        name: the parameter's name, e.g. ``"hidden1.weight"``.
        start, stop: its range ``[start, stop)`` in the flat vector of the parameters labelled.
    """

    label: str
    name: str
    start: int
    stop: int


LAYER, OTHER = "layer", "other"
_LAYER_KINDS = {"weight": "weights", "bias": "biases"}
_NORM_KINDS = {"weight": "scales", "bias": "shifts"}


def label_parameters(names: Sequence[str], shapes: Sequence[Sequence[int]],
                     kinds: Mapping[str, str] | None = None) -> list[ParameterGroup]:
    """Label each parameter by layer (Fig. 6's colours), from its name and shape.

    A parameter's *module* is its name up to the last dot (``""`` at the top level). Each module
    is a *layer* (linear or convolution), a *normalisation* or *other*: as ``kinds`` says
    (``{module: "layer" | "other" | a normalisation's label such as "batch-norm"}``), or, for
    modules it does not name, from the shapes: a ``weight`` of two or more dimensions makes a
    layer; 1-D parameters named ``weight`` and ``bias`` only make a batch norm (the only
    normalisation of the paper's networks; pass ``kinds`` for others); the rest is other.

    Layers are numbered 1, 2, … in order and the last is the "top layer": its parameters are
    "layer i weights" / "layer i biases" or "top layer weights" / "top layer biases". A
    normalisation's are "layer i batch-norm scales" / "… shifts" (``i``: the layer before it);
    any other parameter keeps its name.

    Args:
        names: parameter names in ``named_parameters()`` order, e.g. a ``HessianOperator``'s.
        shapes: their shapes.
        kinds: the kind of some or all modules (:func:`parameter_groups` passes the exact ones).

    Returns:
        one :class:`ParameterGroup` per parameter, in order, tiling ``[0, Σ sizes)``.

    Raises:
        ValueError: ``names`` and ``shapes`` of different lengths.

    >>> [g.label for g in label_parameters(
    ...     ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight"],
    ...     [[2, 1, 3, 3], [2], [2], [2], [10, 2]])]  # doctest: +NORMALIZE_WHITESPACE
    ['layer 1 weights', 'layer 1 biases', 'layer 1 batch-norm scales',
     'layer 1 batch-norm shifts', 'top layer weights']
    """
    if len(names) != len(shapes):
        raise ValueError(f"{len(names)} parameter names but {len(shapes)} shapes")
    modules = [name.rpartition(".")[0] for name in names]
    kind_of = _module_kinds(names, shapes, modules, kinds or {})
    layers = [m for m in kind_of if kind_of[m] == LAYER]
    numbers = {m: i for i, m in enumerate(layers, start=1)}
    top = layers[-1] if layers else None
    groups: list[ParameterGroup] = []
    start, number = 0, 0
    for name, module, shape in zip(names, modules, shapes, strict=True):
        number = numbers.get(module, number)  # a normalisation takes the layer before it
        label = _label(name.rpartition(".")[2], module, kind_of[module], number, top)
        groups.append(ParameterGroup(label, name, start, start + math.prod(map(int, shape))))
        start = groups[-1].stop
    return groups


def _module_kinds(names: Sequence[str], shapes: Sequence[Sequence[int]], modules: list[str],
                  kinds: Mapping[str, str]) -> dict[str, str]:
    """``{module: kind}`` in order of appearance: from ``kinds``, else inferred from shapes."""
    dims: dict[str, dict[str, int]] = {}
    for name, module, shape in zip(names, modules, shapes, strict=True):
        dims.setdefault(module, {})[name.rpartition(".")[2]] = len(shape)
    found = {}
    for module, ndim in dims.items():
        if module in kinds:
            found[module] = kinds[module]
        elif ndim.get("weight", 0) >= 2:
            found[module] = LAYER
        elif "weight" in ndim and set(ndim) <= {"weight", "bias"} and max(ndim.values()) == 1:
            found[module] = "batch-norm"
        else:
            found[module] = OTHER
    return found


def _label(leaf: str, module: str, kind: str, number: int, top: str | None) -> str:
    """The label of parameter ``module.leaf`` of a module of ``kind`` after layer ``number``."""
    if kind == LAYER:
        base, words = ("top layer" if module == top else f"layer {number}"), _LAYER_KINDS
    elif kind == OTHER:
        base, words = module, {}
    else:
        base, words = f"layer {number} {kind}", _NORM_KINDS
    word = words.get(leaf, leaf)
    return f"{base} {word}" if base else word


def parameter_groups(model: nn.Module, trainable_only: bool = True
                     ) -> list[tuple[str, list[str]]]:
    """Human labels for the parameters, in ``named_parameters()`` order (Fig. 6's colours).

    :func:`label_parameters` with the modules' exact kinds: linear and convolution layers are
    numbered in the order they are defined, the last one is the "top layer"; batch norm is
    "batch-norm", other normalisations go by their class name (``LayerNorm``, ``GroupNorm``).
    Frozen parameters count for the numbering even when they are left out.

    Args:
        model: the network.
        trainable_only: only parameters that require grad (the default parameters of a
            ``HessianOperator``, so the groups tile its vectors).

    Returns:
        ``[(label, [parameter names]), …]``; each name appears once, in order.

    >>> model = build_model("fc", (4,), 3, widths=(5,))
    >>> [label for label, _ in parameter_groups(model)]
    ['layer 1 weights', 'layer 1 biases', 'top layer weights', 'top layer biases']
    """
    named = list(model.named_parameters())
    groups = label_parameters([n for n, _ in named], [tuple(p.shape) for _, p in named],
                              _exact_kinds(model))
    return [(group.label, [group.name]) for group, (_, param) in zip(groups, named, strict=True)
            if param.requires_grad or not trainable_only]


def _exact_kinds(model: nn.Module) -> dict[str, str]:
    """``{module prefix: kind}`` of the modules holding parameters, from their classes."""
    kinds = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _LAYERS):
            kinds[prefix] = LAYER
        elif isinstance(module, _NORMS):
            batch = isinstance(module, nn.modules.batchnorm._BatchNorm)
            kinds[prefix] = "batch-norm" if batch else type(module).__name__
        else:
            kinds[prefix] = OTHER
    return kinds


def parameter_group_slices(model: nn.Module) -> list[tuple[str, slice]]:
    """Each group of :func:`parameter_groups` as a slice of the flat vector of the trainable
    parameters (``named_parameters()`` order: a ``HessianOperator``'s eigenvectors)."""
    sizes = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    slices, start = [], 0
    for label, names in parameter_groups(model):
        stop = start + sum(sizes[name] for name in names)
        slices.append((label, slice(start, stop)))
        start = stop
    return slices
