"""From an :class:`ExperimentConfig` to the objects a run needs: data, model, loss, optimizer.

This is the experiment layer: it knows the registries of data sets, models and optimizers, and
nothing about Lanczos.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

from tinysubspace.experiments.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig
from tinysubspace.problems.models.gpt import token_cross_entropy

__all__ = ["LOSSES", "Problem", "build_optimizer", "build_problem", "resolve_device"]

CONV_MODELS = ("convnet", "resnet18")
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": functional.cross_entropy,
    "mse": functional.mse_loss,
    "token_cross_entropy": token_cross_entropy,  # logits (B, T, V), targets (B, T): token mean
}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device.

    Raises:
        ValueError: a CUDA device is named but CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here; use "
                         "train.device=cpu or auto")
    return device


@dataclass
class Problem:
    """Everything a training run trains and measures."""

    train: Any  # tinysubspace.problems.datasets.catalog.TensorData
    test: Any | None
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device

    @property
    def classification(self) -> bool:  # (per-example labels; token sequences: no accuracy)
        return self.train.num_classes is not None and self.train.targets.ndim == 1

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor] | None:
        data = self.train if split == "train" else self.test
        if data is None:
            return None
        return data.inputs.to(self.device), data.targets.to(self.device)


def load_data(config: DataConfig, data_root: str | None = None, images: bool = False):
    """Training and (if asked) test split, with the config's transforms applied.

    ``images``: give digits as ``(n, 1, 8, 8)`` images (for convolutional models).
    """
    from tinysubspace.problems.datasets import catalog as datasets
    from tinysubspace.problems.registry import lookup

    name, _ = lookup(datasets._REGISTRY, config.name, "data set")
    options: dict[str, Any] = {}
    if name == "gaussian-mixture":
        options = {"k": config.classes, "d": config.dim, "sigma": config.sigma, "n": config.n,
                   "seed": config.seed}
    elif name == "sine":
        options = {"n": config.n, "seed": config.seed}
    elif name == "digits":
        options = {"seed": config.seed, "images": images}
    elif name in ("pydoc-chars", "text"):
        options = {"context_length": config.context_length, "max_chars": config.max_chars}
        options.update({"path": config.path} if name == "text" else {})
    elif config.fallback_to_test:
        options = {"fallback_to_test": True}
    root = config.root or data_root
    train = datasets.load_dataset(name, root=root, split="train", **options)
    test = None
    if config.test_set:  # the synthetic sets draw other samples (same means) for "test"
        test = datasets.load_dataset(name, root=root, split="test", **options)
    return _transform(config, train, test)


def _transform(config: DataConfig, train, test):
    from tinysubspace.problems.datasets import catalog as datasets

    if config.n_train is not None:
        train = datasets.subset(train, config.n_train, seed=config.seed)
    if test is not None and config.n_test is not None:
        test = datasets.subset(test, config.n_test, seed=config.seed)
    if config.even_odd:
        train = datasets.even_odd(train)
        test = datasets.even_odd(test) if test is not None else None
    if config.random_labels:
        train = datasets.random_labels(train, seed=config.seed)
    if config.standardize:
        if test is not None:
            train, test = datasets.standardize(train, test)
        else:
            (train,) = datasets.standardize(train)
    return train, test


def build_model(config: ModelConfig, train, seed: int) -> torch.nn.Module:
    from tinysubspace.problems.models import networks as models
    from tinysubspace.problems.registry import lookup

    name, _ = lookup(models._BUILDERS, config.name, "model")
    options: dict[str, Any] = {}
    if name == "fc":
        options = {"widths": config.widths, "activation": config.activation}
    elif name == "convnet":
        options = {"dropout": config.dropout, "batchnorm": config.batchnorm,
                   "extra_dense": config.extra_dense}
    elif name == "resnet18":
        options = {"width": config.width}
    elif name == "gpt":
        options = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                   "tie_weights": config.tie_weights}
    return models.build_model(name, train.input_shape, train.num_outputs, seed=seed, **options)


def build_problem(config: ExperimentConfig, data_root: str | None = None) -> Problem:
    """Load data and build the model (initialised from ``config.train.seed``; the global RNG
    state is left as it was)."""
    if config.train.loss not in LOSSES:
        raise ValueError(f"unknown train.loss {config.train.loss!r}; known: {', '.join(LOSSES)}")
    device = resolve_device(config.train.device)
    train, test = load_data(config.data, data_root, images=config.model.name in CONV_MODELS)
    model = build_model(config.model, train, seed=config.train.seed).to(device)
    return Problem(train, test, model, LOSSES[config.train.loss], device)


def build_optimizer(config: OptimConfig, model: torch.nn.Module,
                    context: dict[str, Any]) -> torch.optim.Optimizer:
    """``sgd``, ``adam``, or a projected optimizer registered in
    ``tinysubspace.optim.subspace_sgd``.

    ``context`` carries what a projected optimizer needs (the problem, a Hessian-operator
    factory); plain optimizers ignore it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                weight_decay=config.weight_decay)
    registry = _projected_registry()
    if config.name not in registry:
        known = ["sgd", "adam", *registry]
        raise ValueError(f"unknown optim.name {config.name!r}; known: {', '.join(known)}")
    return registry[config.name](model, config, context)


def _projected_registry() -> dict[str, Callable[..., torch.optim.Optimizer]]:
    try:
        module = importlib.import_module("tinysubspace.experiments.optimizers")
    except ModuleNotFoundError:
        return {}
    return dict(getattr(module, "OPTIMIZERS", {}))


def with_steps_from_epochs(config: ExperimentConfig, n: int) -> ExperimentConfig:
    """``train.steps`` derived from ``train.epochs`` (``ceil(epochs · n / batch_size)``), if set."""
    if config.train.epochs is None:
        return config
    if not config.train.epochs > 0:
        raise ValueError(f"train.epochs must be positive, got {config.train.epochs}")
    steps = math.ceil(config.train.epochs * n / config.optim.batch_size)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Example indices of the mini-batch used at ``step``: epoch ``e`` visits a permutation
    drawn from ``(seed, e)``, so any step's batch is known without replaying the run."""
    per_epoch = -(-n // batch_size)
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    return order[index * batch_size:(index + 1) * batch_size]


def epochs_of(step: int, n: int, batch_size: int) -> float:
    """Fractional epoch at ``step``."""
    return step * batch_size / n
