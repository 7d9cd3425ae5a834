"""Experiments as data: a frozen dataclass tree, overridable with ``section.key=value``.

Each paper setting is a small TOML file of differences from these defaults
(``tinysubspace/experiments/*.toml``); ``--set optim.lr=0.01`` overrides further; unknown keys
are rejected with the list of known ones (STYLE.md point 12). The resolved config is saved with
every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RENAMED_KEYS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "TrackerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "parse_assignment",
    "validate_config",
]


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in an experiment config."""


@dataclass(frozen=True)
class DataConfig:
    """Which data set, which split and which transforms (Table 1's variants live here)."""

    name: str = "digits"
    root: str | None = None  # folder with the files (MNIST IDX, CIFAR batches); None: the default
    n_train: int | None = None  # use a seeded subset of this many training examples
    n_test: int | None = None
    test_set: bool = False  # also load the test split (for test/... metrics)
    random_labels: bool = False  # Table 1: labels replaced by a seeded permutation
    even_odd: bool = False  # Appendix B: two classes, label % 2
    standardize: bool = False
    fallback_to_test: bool = False  # use the test split if the training files are missing
    classes: int = 10  # gaussian-mixture: number of classes
    dim: int = 100  # gaussian-mixture: dimension
    sigma: float = 0.1  # gaussian-mixture: cluster width
    n: int = 2000  # gaussian-mixture / sine: number of examples
    seed: int = 0
    context_length: int = 64  # text data (pydoc-chars, text): tokens per sequence
    max_chars: int | None = None  # text data: use the first characters of each split only
    path: str | None = None  # text: the UTF-8 file


@dataclass(frozen=True)
class ModelConfig:
    """The network (a name in the model registry) and its options."""

    name: str = "fc"
    widths: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    dropout: bool = False
    batchnorm: bool = False
    extra_dense: bool = False
    width: int = 64  # resnet18: channels of the first stage
    n_layer: int = 2  # gpt: transformer blocks
    n_head: int = 2  # gpt: attention heads
    n_embd: int = 32  # gpt: width
    tie_weights: bool = True  # gpt: output layer shares the token embedding


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer of the training loop."""

    name: str = "sgd"  # sgd | adam (and the projected optimizers)
    lr: float = 0.1
    batch_size: int = 64
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    k: int = 10  # projected optimizers: subspace dimension
    refresh_every: int = 10  # projected optimizers: steps between basis refreshes
    damping: float = 0.0  # low-rank Newton
    switch_threshold: float = 0.0  # switch protocol: f_top moving average threshold (0 = off)
    switch_window: int = 20  # switch protocol: steps in the moving average of f_top
    switch_lr: float | None = None  # switch protocol: learning rate after the switch (None: lr)
    project: str = "minibatch"  # projected optimizers: minibatch | fullbatch gradient
    refresh_subset: int | None = None  # projected optimizers: Hessian of a fixed seeded subset
    refresh_tol: float = 1e-3  # projected optimizers: relative residual of the refreshed basis


@dataclass(frozen=True)
class TrainConfig:
    """Length, loss, seed and where to compute."""

    steps: int = 1500
    epochs: float | None = None  # if set, train this many epochs instead (steps derived from it)
    loss: str = "cross_entropy"  # cross_entropy | mse
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 100  # steps between checkpoints (also written after measurements)
    divergence_factor: float = 10.0  # diverged: full-data loss above this × its first value ...
    divergence_patience: int = 3  # ... at this many measurements in a row (factor 0: never)


@dataclass(frozen=True)
class TrackerConfig:
    """When to measure on the full training set and what to keep."""

    k: int = 10  # top-k; the tracker also finds the next k (eigenpairs k+1 .. 2k)
    tol: float = 1e-4  # relative residual of the eigenpairs
    tol_scale: str = "top"  # tol relative to: top (‖r_i‖ ≤ tol·|λ1|) | pair (≤ tol·|λi|, ARPACK's)
    dense_until: int = 200  # measure every `dense_every` steps up to here ...
    dense_every: int = 10
    sparse_every: int = 100  # ... then every `sparse_every` steps
    extra_steps: tuple[int, ...] = ()  # more measurement steps
    anchors: tuple[int, ...] = (0, 50, 100, 200, 400)  # t1 of Fig. 2/3: bases kept for overlaps
    save_vectors_at: tuple[int, ...] = (0, 50, 100, 200, 400)  # Figs. 6/7/11: eigenvectors saved
    dtype: str = "float64"  # measurement dtype (the model trains in float32)
    chunk_size: int | None = 4096  # examples per pass of the measurement (not optim.batch_size)
    mode: str = "eval"
    minibatch_every: int = 1  # mini-batch overlap(g, Hg) every this many steps (0: never)
    spectrum: str = "none"  # at the end: none | exact | slq
    spectrum_probes: int = 10
    spectrum_steps: int = 90
    solver: str = "track"  # track (warm-started) | cold | budget (budget_matvecs products each)
    check: str = "amortised"  # multiplicity check: amortised (every check_every) | full (every)
    check_every: int = 4  # ... M of the amortised check
    budget_matvecs: int | None = None  # products per measurement of solver = budget
    pass_cost: str | None = None  # None | measure: time a pass once, warm = auto chooses by it
    overlap_last: int = 0  # Table 1: full-data overlap(g, Hg) at each of the last N steps (0: off)
    overlap_every: int = 1  # ... at every this many of those steps (1: every step, as the paper)
    spectrum_top: int = 0  # at the end: this many top eigenvalues by Lanczos (Fig. 5; 0: none)
    blocks: str = "none"  # per-block columns block/NAME/eig_1, /trace: none | auto | layers | types
    blocks_k: int = 1  # ... top eigenvalues of each diagonal block
    blocks_probes: int = 4  # ... Hutchinson / SLQ probes per block
    blocks_steps: int = 20  # ... SLQ Lanczos steps per probe (the heterogeneity score's densities)
    ggn: bool = False  # also the GGN's top 2k (ggn/eig_i), eq. 5 and principal angles with H's
    class_means: bool = False  # also eq. 5 of the class-mean gradients' span with the top-k
    geometry: bool = False  # principal angles / eigenvector displacement since the last one
    sharpness: bool = False  # the run's optimizer: threshold, preconditioned top-k, update share
    measure: str = "standard"  # the column groups: standard | eos | outliers (experiment_groups.py)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: the five sections plus its name and description."""

    name: str = "fig1-fc-digits"
    description: str = ""
    table1_row: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


SECTIONS = ("data", "model", "optim", "train", "tracker")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A nested plain dict (tuples become lists), ready for JSON."""
    return dataclasses.asdict(config)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a command line string) to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        return _number(value, annotation, key)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _number(value: Any, annotation: type, key: str) -> int | float:
    """``value`` as an ``int`` or a finite ``float`` (a bool is neither)."""
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a number")
        number = annotation(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r}") from None
    if annotation is int and isinstance(value, float) and value != int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


RENAMED_KEYS: dict[str, str] = {
    "tracker.hvp_batch_size": "tracker.chunk_size",  # issue 22: a chunk is not a mini-batch
    "data.block_size": "data.context_length",  # issue 22: "block" is the Lanczos block
}
"""Old key -> new key. An old key still works wherever a config arrives (``--set``, TOML files,
an old run folder's ``config.json`` on ``--resume``); both at once is an error."""


def _renamed(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` of ``section`` with old keys (:data:`RENAMED_KEYS`) under their new names."""
    out = dict(values)
    for old, new in RENAMED_KEYS.items():
        old_section, old_key = old.split(".", 1)
        if old_section != section or old_key not in out:
            continue
        new_key = new.split(".", 1)[1]
        if new_key in out:
            raise ConfigError(f"{old} is the old name of {new}; give only {new}, got both "
                              f"({out[old_key]!r} and {out[new_key]!r})")
        out[new_key] = out.pop(old_key)
    return out


def _replace(section: Any, key_path: str, updates: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(type(section))
    known = [f.name for f in dataclasses.fields(section)]
    changes = {}
    for key, value in updates.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=2)
            hint = f"; did you mean {' or '.join(key_path + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown key '{key_path}{key}'; known keys: "
                              + ", ".join(f"{key_path}{k}" for k in known) + hint)
        changes[key] = _coerce(value, hints[key], f"{key_path}{key}")
    return dataclasses.replace(section, **changes)


def apply_overrides(config: ExperimentConfig, updates: dict[str, Any]) -> ExperimentConfig:
    """Apply ``{"optim.lr": 0.01, "name": ...}`` or nested ``{"optim": {"lr": 0.01}}``.

    Raises:
        ConfigError: an unknown section or key (the message lists the known ones), or a value
            that does not fit the field's type.
    """
    flat: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in updates.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.setdefault(key, {}).update(value)
        elif "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"unknown section {section!r} in {key!r}; known sections: "
                                  + ", ".join(SECTIONS))
            flat.setdefault(section, {})[sub] = value
        else:
            top[key] = value
    for key in top:
        if key in SECTIONS:
            raise ConfigError(f"{key!r} is a section; set its keys as {key}.KEY=VALUE")
    config = _replace(config, "", top) if top else config
    for section, values in flat.items():
        values = _renamed(section, values)
        config = dataclasses.replace(
            config, **{section: _replace(getattr(config, section), f"{section}.", values)})
    validate_config(config)
    return config


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild an :class:`ExperimentConfig` from :func:`config_to_dict` output."""
    return apply_overrides(ExperimentConfig(), {k: v for k, v in data.items() if k != "meta"})


def parse_assignment(text: str) -> tuple[str, str]:
    """``"optim.lr=0.01"`` → ``("optim.lr", "0.01")``.

    Raises:
        ConfigError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=0.01), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


# ------------------------------------------------------------------------------ value ranges
_INF = math.inf
# key -> (lowest, lowest allowed?, highest, highest allowed?); ``None`` (unset) always passes
# and each entry of a tuple is checked. Keys not listed take any value of their type.
RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "data.n_train": (1, True, _INF, False), "data.n_test": (1, True, _INF, False),
    "data.classes": (2, True, _INF, False), "data.dim": (1, True, _INF, False),
    "data.sigma": (0, True, _INF, False), "data.n": (1, True, _INF, False),
    "data.seed": (0, True, _INF, False), "data.context_length": (1, True, _INF, False),
    "data.max_chars": (1, True, _INF, False),
    "model.widths": (1, True, _INF, False), "model.width": (1, True, _INF, False),
    "model.n_layer": (1, True, _INF, False), "model.n_head": (1, True, _INF, False),
    "model.n_embd": (1, True, _INF, False),
    "optim.lr": (0, False, _INF, False), "optim.batch_size": (1, True, _INF, False),
    "optim.momentum": (0, True, 1, True), "optim.weight_decay": (0, True, _INF, False),
    "optim.beta1": (0, True, 1, False), "optim.beta2": (0, True, 1, False),
    "optim.k": (1, True, _INF, False), "optim.refresh_every": (1, True, _INF, False),
    "optim.damping": (0, True, _INF, False), "optim.switch_threshold": (0, True, 1, True),
    "optim.switch_window": (1, True, _INF, False), "optim.switch_lr": (0, False, _INF, False),
    "optim.refresh_subset": (1, True, _INF, False), "optim.refresh_tol": (0, False, 1, False),
    "train.steps": (0, True, _INF, False), "train.epochs": (0, False, _INF, False),
    "train.seed": (0, True, _INF, False), "train.checkpoint_every": (1, True, _INF, False),
    "train.divergence_factor": (0, True, _INF, False),
    "train.divergence_patience": (1, True, _INF, False),
    "tracker.k": (1, True, _INF, False), "tracker.tol": (0, False, 1, False),
    "tracker.dense_until": (0, True, _INF, False), "tracker.dense_every": (1, True, _INF, False),
    "tracker.sparse_every": (1, True, _INF, False), "tracker.extra_steps": (0, True, _INF, False),
    "tracker.anchors": (0, True, _INF, False), "tracker.save_vectors_at": (0, True, _INF, False),
    "tracker.chunk_size": (1, True, _INF, False),
    "tracker.minibatch_every": (0, True, _INF, False),
    "tracker.spectrum_probes": (1, True, _INF, False),
    "tracker.spectrum_steps": (1, True, _INF, False),
    "tracker.overlap_last": (0, True, _INF, False), "tracker.overlap_every": (1, True, _INF, False),
    "tracker.spectrum_top": (0, True, _INF, False),
    "tracker.blocks_k": (1, True, _INF, False), "tracker.blocks_probes": (1, True, _INF, False),
    "tracker.blocks_steps": (1, True, _INF, False),
    "tracker.check_every": (1, True, _INF, False), "tracker.budget_matvecs": (1, True, _INF, False),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "tracker.mode": ("eval", "train"), "tracker.spectrum": ("none", "exact", "slq"),
    "tracker.tol_scale": ("top", "pair"), "tracker.measure": ("standard", "eos", "outliers"),
    "tracker.blocks": ("none", "auto", "layers", "types"),
    "tracker.solver": ("track", "cold", "budget"), "tracker.check": ("full", "amortised"),
    "optim.project": ("minibatch", "fullbatch"),
}


def _range_text(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == _INF:
        if low == 0 and not low_in:
            return "positive"
        return f"at least {low:g}" if low_in else f"greater than {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def validate_config(config: ExperimentConfig) -> None:
    """Check every value with a range (:data:`RANGES`) or a fixed set of choices
    (:data:`CHOICES`), so that a bad value is refused before a run folder is made.

    Raises:
        ConfigError: the first value out of range, naming the key, the range and the value.
    """
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
            if key not in RANGES or value is None:
                continue
            low, low_in, high, high_in = RANGES[key]
            for number in value if isinstance(value, (list, tuple)) else [value]:
                if not ((number >= low if low_in else number > low)
                        and (number <= high if high_in else number < high)):
                    raise ConfigError(f"{key} must be {_range_text(*RANGES[key])}, got "
                                      f"{value!r}")
    if 0 < config.train.divergence_factor < 1:
        raise ConfigError("train.divergence_factor must be 0 (no check) or at least 1, got "
                          f"{config.train.divergence_factor!r}")
    _validate_solver(config.tracker)
    if config.tracker.sharpness and config.optim.name not in ("sgd", "adam"):
        raise ConfigError(f"tracker.sharpness needs optim.name sgd or adam (a threshold and a "
                          f"preconditioner are known for them), got {config.optim.name!r}")
    if config.tracker.class_means and config.train.loss != "cross_entropy":
        raise ConfigError(f"tracker.class_means needs train.loss cross_entropy (class means of "
                          f"softmax gradients), got {config.train.loss!r}")


def _validate_solver(tracker: TrackerConfig) -> None:
    """``tracker.budget_matvecs`` set iff ``tracker.solver = budget``, and more than the ``2k``
    pairs it refines; ``tracker.pass_cost`` unset or ``measure``.

    Raises:
        ConfigError: naming the key, what was expected and the value.
    """
    if tracker.solver == "budget" and tracker.budget_matvecs is None:
        raise ConfigError("tracker.solver = budget needs tracker.budget_matvecs (products per "
                          "measurement, at least 2 * tracker.k), got none")
    if tracker.solver != "budget" and tracker.budget_matvecs is not None:
        raise ConfigError(f"tracker.budget_matvecs is the budget of tracker.solver = budget, "
                          f"got tracker.solver = {tracker.solver!r}")
    if tracker.budget_matvecs is not None and tracker.budget_matvecs <= 2 * tracker.k:
        raise ConfigError(f"tracker.budget_matvecs must be more than 2 * tracker.k = "
                          f"{2 * tracker.k} (the pairs it refines), got {tracker.budget_matvecs}")
    if tracker.pass_cost not in (None, "measure"):
        raise ConfigError(f"tracker.pass_cost must be unset or measure, got "
                          f"{tracker.pass_cost!r}")
