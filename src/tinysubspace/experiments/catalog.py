"""The paper's experiments as data: one TOML file of differences from the defaults per setting.

Each ``*.toml`` beside this file holds a ``description``, an optional ``table1_row`` and any
of the sections ``data``, ``model``, ``optim``, ``train``, ``tracker``. Settings on MNIST or
CIFAR also exist as variants that run on data this machine has: ``…-digits`` (scikit-learn's
digits; not for the ConvNet, which needs larger images) and ``…-fashion`` (Fashion-MNIST).
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from typing import Any

from tinysubspace.experiments.config import ConfigError, ExperimentConfig, apply_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULT_EXPERIMENT", "describe_experiments", "experiment_names", "load_experiment"]

DEFAULT_EXPERIMENT = "fig1-fc-digits"
_SOURCE_SUFFIXES = {"-mnist": ("digits", "fashion"), "-cifar10": ("digits", "fashion"),
                    "-cifar100": ("digits", "fashion")}
_TOO_SMALL_FOR_DIGITS = ("convnet",)  # the Keras ConvNet needs inputs of at least 10×10
_VARIANT_DATA = {"digits": {"name": "digits", "root": None, "n_train": None, "n_test": None},
                 "fashion": {"name": "fashion-mnist", "root": None}}


def _files() -> dict[str, dict[str, Any]]:
    found = {}
    for entry in resources.files("tinysubspace.experiments").joinpath("configs").iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name[: -len(".toml")]] = tomllib.loads(entry.read_text(encoding="utf-8"))
    return found


def _variants(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``…-mnist`` / ``…-cifar10(0)`` → ``…-digits`` and ``…-fashion`` (no ConvNet on digits)."""
    made: dict[str, dict[str, Any]] = {}
    for name, spec in files.items():
        for suffix, targets in _SOURCE_SUFFIXES.items():
            if not name.endswith(suffix):
                continue
            for target in targets:
                variant = name[: -len(suffix)] + "-" + target
                model = spec.get("model", {}).get("name", "fc")
                if variant in files or (target == "digits" and model in _TOO_SMALL_FOR_DIGITS):
                    continue
                data = {**spec.get("data", {}), **_VARIANT_DATA[target]}
                data = {k: v for k, v in data.items() if v is not None}
                train = dict(spec.get("train", {}))
                if target == "digits":  # 1,437 examples: ~23 steps an epoch
                    train["steps"] = min(int(train.get("steps", 1500)), 1500)
                tracker = {k: v for k, v in spec.get("tracker", {}).items()
                           if k not in ("chunk_size", "hvp_batch_size")}
                made[variant] = {**spec, "data": data, "train": train, "tracker": tracker,
                                 "description": f"{spec['description']} — variant on {target}",
                                 "variant_of": name}
    return made


def _all_specs() -> dict[str, dict[str, Any]]:
    files = _files()
    return dict(sorted({**files, **_variants(files)}.items()))


def experiment_names() -> list[str]:
    """Every experiment, paper settings and their variants, sorted."""
    return list(_all_specs())


def describe_experiments() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every experiment."""
    return [(name, spec.get("description", "")) for name, spec in _all_specs().items()]


def _one_of(names: list[str]) -> str:
    """``"a"``, ``"a or b"``, ``"a, b or c"``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def load_experiment(name: str = DEFAULT_EXPERIMENT,
                    overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The resolved config of experiment ``name`` with ``overrides`` (``{"optim.lr": "0.01"}``).

    Raises:
        ConfigError: an unknown experiment (the message suggests close names, else lists
            the known ones), a bad key or a value out of range.
    """
    specs = _all_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.6)
        if close:
            raise ConfigError(f"unknown experiment {name!r}; did you mean "
                              f"{_one_of(close)}? (`tinysubspace list` shows all "
                              f"{len(specs)})")
        raise ConfigError(f"unknown experiment {name!r}; known experiments: "
                          + ", ".join(specs) + " (see `tinysubspace list`)")
    spec = {k: v for k, v in specs[name].items() if k != "variant_of"}
    config = apply_overrides(ExperimentConfig(name=name), spec)
    return apply_overrides(config, overrides or {})
