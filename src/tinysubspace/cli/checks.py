"""Checks ``tinysubspace run`` makes before a run folder exists, so that a request the run
cannot meet is refused in one line with nothing written (docs/reliability.md).

The tracker solves for the top ``k`` eigenpairs and for the *next* ``k`` (eigenpairs
``k+1 … 2k``, the paper's Fig. 2 (b)); the solver needs ``k + skip = 2k < p``, ``p`` the model's
trainable parameters. :func:`check_tracker_k` builds the model from the data set's known input
shape (no data is read) and compares.
"""

from __future__ import annotations

from types import SimpleNamespace

from tinysubspace.experiments.config import ConfigError, ExperimentConfig

__all__ = ["check_tracker_k", "input_shape_of", "parameter_count"]

# Data sets whose input shape and classes are fixed: name -> (input shape, outputs).
_FIXED_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
_CONV_MODELS = ("convnet", "resnet18")


def input_shape_of(config: ExperimentConfig) -> tuple[tuple[int, ...], int] | None:
    """``(input shape, model outputs)`` of the config's data, known without reading it;
    ``None`` for data whose shape only its files tell (text)."""
    data, conv = config.data, config.model.name in _CONV_MODELS
    if data.name in _FIXED_SHAPES:
        shape, outputs = _FIXED_SHAPES[data.name]
    elif data.name == "digits":
        shape, outputs = ((1, 8, 8) if conv else (64,)), 10
    elif data.name == "gaussian-mixture":
        shape, outputs = (data.dim,), data.classes
    elif data.name == "sine":
        shape, outputs = (1,), 1
    else:
        return None
    return shape, (2 if data.even_odd and outputs > 1 else outputs)


def parameter_count(config: ExperimentConfig) -> int | None:
    """Trainable parameters ``p`` of the config's model (``None``: the data's shape is not
    known before it is read). Builds the model on the CPU; the global RNG is left as it was."""
    from tinysubspace.experiments.build import build_model

    known = input_shape_of(config)
    if known is None:
        return None
    shape, outputs = known
    try:
        model = build_model(config.model, SimpleNamespace(input_shape=shape,
                                                          num_outputs=outputs),
                            seed=config.train.seed)
    except (ValueError, TypeError):  # a bad model option: the run itself says so
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_tracker_k(config: ExperimentConfig) -> None:
    """Refuse a ``tracker.k`` the solver cannot meet: ``k + skip = 2k`` (top k and next k)
    must be smaller than the model's parameter count ``p``.

    Raises:
        ConfigError: ``2k ≥ p``; the message names ``p`` and the largest ``k`` allowed.
    """
    k = config.tracker.k
    if k < 1:
        return  # the config's own check names the bound
    p = parameter_count(config)
    if p is None or 2 * k < p:
        return
    largest = (p - 1) // 2
    raise ConfigError(
        f"tracker.k={k} is too large for this model: the tracker finds the top k and the next "
        f"k eigenpairs (eigenpairs 1 … 2k = {2 * k}), which must be fewer than the model's "
        f"{p:,} trainable parameters; use --set tracker.k=N with N ≤ {largest}")
