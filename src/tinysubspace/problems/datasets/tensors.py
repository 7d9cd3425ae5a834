"""One split of a data set in memory (:class:`TensorData`) and the transforms of Table 1 and
Appendix B: a seeded subset, random labels, even/odd labels, standardisation.

Every transform returns a new :class:`TensorData` (the argument is left as it was) and every
random one takes a ``seed``; nothing touches the global random state. Loading by name lives in
:mod:`tinysubspace.problems.datasets.catalog`, which re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorData", "even_odd", "random_labels", "standardize", "subset"]


@dataclass(frozen=True, eq=False)
class TensorData:
    """One split of a data set, in memory.

    Attributes:
        inputs: floating tensor ``(n, ...)``: ``(n, 64)`` digits, ``(n, 1, 28, 28)`` MNIST,
            ``(n, 3, 32, 32)`` CIFAR.
        targets: int64 class labels ``(n,)``, or floating ``(n, m)`` regression targets.
        num_classes: the number of classes, ``None`` for regression.
        name: a short description, e.g. ``"mnist-train"``.

    Raises:
        ValueError: mismatched lengths, wrong dtypes, or labels outside ``[0, num_classes)``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int | None
    name: str

    def __post_init__(self) -> None:
        if not self.inputs.is_floating_point() or self.inputs.ndim < 2:
            raise ValueError(f"{self.name}: inputs must be a floating tensor (n, ...), got "
                             f"{self.inputs.dtype} of shape {tuple(self.inputs.shape)}")
        if self.targets.shape[:1] != self.inputs.shape[:1]:
            raise ValueError(f"{self.name}: {self.inputs.shape[0]} inputs but targets of shape "
                             f"{tuple(self.targets.shape)}")
        if self.num_classes is None:
            if not self.targets.is_floating_point() or self.targets.ndim != 2:
                raise ValueError(f"{self.name}: regression targets must be floating (n, m), got "
                                 f"{self.targets.dtype} of shape {tuple(self.targets.shape)}")
            return
        if self.targets.dtype != torch.int64 or self.targets.ndim != 1:
            raise ValueError(f"{self.name}: class labels must be int64 of shape (n,), got "
                             f"{self.targets.dtype} of shape {tuple(self.targets.shape)}")
        if len(self) and not 0 <= int(self.targets.min()) <= int(self.targets.max()) < \
                self.num_classes:
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(self.targets.min())}, {int(self.targets.max())}]")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, e.g. the ``data`` of a ``HessianOperator``."""
        return self.inputs, self.targets

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.inputs.shape[1:])

    @property
    def num_outputs(self) -> int:
        """The model outputs this data needs: the classes, or the regression targets' width."""
        return self.num_classes if self.num_classes is not None else int(self.targets.shape[1])


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def subset(data: TensorData, n: int, seed: int) -> TensorData:
    """``n`` examples drawn without replacement (seeded; nested: a smaller ``n`` with the same
    seed gives the first examples of a larger one).

    Raises:
        ValueError: ``n`` not in ``[1, len(data)]``.
    """
    if not 1 <= n <= len(data):
        raise ValueError(f"subset size must lie in [1, {len(data)}] for {data.name}, got {n}")
    index = _permutation(len(data), seed)[:n]
    return TensorData(data.inputs[index], data.targets[index], data.num_classes,
                      f"{data.name}[{n} of {len(data)}, seed {seed}]")


def random_labels(data: TensorData, seed: int) -> TensorData:
    """The targets shuffled among the examples (a seeded permutation: the label counts are kept,
    their link to the inputs is lost; Table 1 "random labels", after Zhang et al. 2016)."""
    index = _permutation(len(data), seed)
    return TensorData(data.inputs, data.targets[index], data.num_classes,
                      f"{data.name}[random labels, seed {seed}]")


def even_odd(data: TensorData) -> TensorData:
    """Two classes, ``label mod 2`` (Appendix B: MNIST labelled even/odd has a 2-dim top space).

    Raises:
        ValueError: regression data.
    """
    if data.num_classes is None:
        raise ValueError(f"even_odd needs class labels; {data.name} is a regression set")
    return TensorData(data.inputs, data.targets % 2, 2, f"{data.name}[even/odd]")


def standardize(train: TensorData, *others: TensorData) -> tuple[TensorData, ...]:
    """Subtract the training inputs' per-feature mean and divide by their per-feature standard
    deviation (population; features constant on the training set are only centred), applied to
    ``train`` and every other split alike.

    Returns:
        ``(train, *others)`` standardised, in that order.

    Raises:
        ValueError: an empty training set, or an input shape that differs from the training one.
    """
    if len(train) == 0:
        raise ValueError(f"{train.name} has no examples to take statistics from")
    x = train.inputs.to(torch.float64)
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    result = []
    for data in (train, *others):
        if data.input_shape != train.input_shape:
            raise ValueError(f"{data.name} has inputs {data.input_shape}, but the statistics "
                             f"are of {train.name}'s {train.input_shape}")
        inputs = ((data.inputs.to(torch.float64) - mean) / std).to(data.inputs.dtype)
        result.append(TensorData(inputs, data.targets, data.num_classes,
                                 f"{data.name}[standardized]"))
    return tuple(result)
