"""Per-block Hessian spectra of a saved run, at initialisation and after training (issue 14).

``measure_run_blocks(run)`` rebuilds the run's problem from its resolved ``config.json`` — the
model at initialisation is seeded, so it is the run's step-0 model exactly — and, for
``"final"``, loads the run's last checkpoint. Any other step ``s`` is reached by training the
run's config again for ``s`` steps in a scratch folder (training is deterministic and the
tracker leaves the trajectory alone, so this is the run's model at ``s``; the tests check it
against the run's own checkpoint), with the tracker cut to one cheap measurement. At each point
it measures
:func:`tinysubspace.problems.block_curvature.block_spectra` on the run's whole training set with
the tracker's operator settings (dtype, mode, chunk size) and stores, in the run folder:

* ``blocks/step_SSSSSSSS.npz``: per block its name, size, top eigenvalues, trace and standard
  error, SLQ nodes and weights (flat, with offsets), and the Jensen–Shannon distance matrix and
  heterogeneity score (:func:`block_arrays`; read back by :mod:`tinysubspace.plots.blocks`);
* ``blocks.csv``: one row per measured step, the flat columns of
  :func:`~tinysubspace.problems.block_curvature.block_measurements` (``block/NAME/eig_1``,
  ``block/NAME/trace`` …, ``blocks/heterogeneity``).

Nothing is trained; the run's own files are not changed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinysubspace.experiments.build import build_problem
from tinysubspace.experiments.config import ExperimentConfig, config_from_dict
from tinysubspace.experiments.tracker import settings_of
from tinysubspace.problems.block_curvature import BlockSpectra, block_spectra
from tinysubspace.results.store import CHECKPOINT, CONFIG, RunStoreError, atomic_write_bytes

__all__ = ["BLOCKS_CSV", "BLOCKS_DIR", "block_arrays", "block_row", "measure_run_blocks"]

BLOCKS_DIR = "blocks"
BLOCKS_CSV = "blocks.csv"


def block_arrays(result: BlockSpectra, step: int, blocking: str) -> dict[str, np.ndarray]:
    """The arrays of ``blocks/step_*.npz``: ``names``, ``sizes``, ``eigenvalues`` (``B × k``,
    NaN-padded), ``trace``, ``trace_se``, ``nodes`` / ``weights`` (every block's SLQ rule
    flattened; block ``i`` is ``[offsets[i], offsets[i+1])``), ``probes``, ``distances``,
    ``heterogeneity``, ``normalized_distances``, ``heterogeneity_normalized``, ``step``,
    ``blocking``."""
    spectra = list(result.blocks.values())
    k = max(s.eigenvalues.numel() for s in spectra)
    eig = np.full((len(spectra), k), np.nan)
    for i, s in enumerate(spectra):
        eig[i, : s.eigenvalues.numel()] = s.eigenvalues.numpy()
    nodes = [s.density.nodes.reshape(-1).numpy() for s in spectra]
    weights = [s.density.weights.reshape(-1).numpy() for s in spectra]
    return {"names": np.array(result.names), "sizes": np.array([s.size for s in spectra]),
            "eigenvalues": eig, "trace": np.array([s.trace.value for s in spectra]),
            "trace_se": np.array([s.trace.stderr for s in spectra]),
            "nodes": np.concatenate(nodes), "weights": np.concatenate(weights),
            "offsets": np.cumsum([0, *[n.size for n in nodes]]),
            "probes": np.array([s.density.probe for s in spectra]),
            "distances": result.distances.numpy(),
            "heterogeneity": np.float64(result.heterogeneity),
            "normalized_distances": result.normalized_distances.numpy(),
            "heterogeneity_normalized": np.float64(result.normalized_heterogeneity),
            "step": np.int64(step),
            "blocking": np.array(blocking)}


def block_row(result: BlockSpectra, step: int) -> dict[str, float]:
    """The flat ``blocks.csv`` row: ``step``, ``block/NAME/eig_i``, ``…/trace``, ``…/trace_se``,
    ``…/size``, ``blocks/heterogeneity``."""
    row: dict[str, float] = {"step": step}
    for name, s in result.blocks.items():
        row.update({f"block/{name}/eig_{i + 1}": float(v) for i, v in enumerate(s.eigenvalues)})
        row.update({f"block/{name}/trace": s.trace.value, f"block/{name}/trace_se": s.trace.stderr,
                    f"block/{name}/size": float(s.size)})
    row["blocks/heterogeneity"] = result.heterogeneity
    row["blocks/heterogeneity_normalized"] = result.normalized_heterogeneity
    return row


def measure_run_blocks(run: str | Path, at: tuple[str | int, ...] = ("init", "final"),
                       blocks: str = "auto", data_root: str | None = None,
                       examples: int | None = None, **options: Any) -> list[Path]:
    """Measure and store the block spectra of ``run`` at ``at`` (``"init"``, ``"final"``).

    Args:
        run: a run folder (written by ``tinysubspace run``).
        at: which models: ``"init"`` (the seeded initialisation, step 0), ``"final"`` (the
            last checkpoint), or step numbers (retrained, see the module docstring).
        blocks: ``"auto"``, ``"layers"`` or ``"types"``.
        data_root: where the data files are, if the run's config does not say.
        examples: measure on a seeded subset of this many training examples (sequences for
            a language model; the seed is the run's ``data.seed``) instead of all of them.
        **options: passed to :func:`~tinysubspace.problems.block_curvature.block_spectra`
            (``k``, ``steps``, ``probes``, ``seed``, ``exact_size`` …).

    Returns:
        the ``.npz`` files written.

    Raises:
        RunStoreError: not a run folder, or ``"final"`` without a checkpoint.
        ValueError: an unknown entry in ``at``.
    """
    path = Path(run)
    if not (path / CONFIG).exists():
        raise RunStoreError(f"{path} holds no run ({CONFIG} missing)")
    unknown = [a for a in at if a not in ("init", "final")
               and (isinstance(a, bool) or not isinstance(a, int) or a < 0)]
    if unknown:
        raise ValueError(f"at must hold 'init', 'final' or step numbers >= 0, got {unknown}")
    config = config_from_dict(json.loads((path / CONFIG).read_text()))
    problem = build_problem(config, data_root)
    ops = settings_of(config.tracker, distributed=False).operators.keywords()
    ops.pop("distributed")  # block_spectra runs on one process
    settings = {**ops, **options}
    data = _examples(problem.tensors("train"), examples, config.data.seed)
    written = []
    for which in at:
        if which in ("init", 0):
            step = 0
        elif which == "final":
            step = _load_checkpoint(path / CHECKPOINT, problem.model)
        else:
            step = _retrain(config, which, problem.model, data_root)
        result = block_spectra(problem.model, problem.loss_fn, data, blocks, **settings)
        target = path / BLOCKS_DIR / f"step_{step:08d}.npz"
        target.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **block_arrays(result, step, blocks))
        atomic_write_bytes(target, buffer.getvalue())
        _append_row(path / BLOCKS_CSV, block_row(result, step))
        written.append(target)
    return written


def _examples(data: tuple[torch.Tensor, torch.Tensor], n: int | None,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training examples drawn without replacement (seeded), or all of them."""
    X, Y = data
    if n is None or n >= len(X):
        return X, Y
    if n < 1:
        raise ValueError(f"examples must be a positive number, got {n}")
    index = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    return X[index.to(X.device)], Y[index.to(Y.device)]


def _load_checkpoint(file: Path, model: torch.nn.Module) -> int:
    if not file.exists():
        raise RunStoreError(f"{file.parent} has no checkpoint, so no trained model to measure")
    state = torch.load(file, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return int(state["step"])


def _retrain(config: ExperimentConfig, step: int, model: torch.nn.Module,
             data_root: str | None) -> int:
    """Load into ``model`` the run's model after ``step`` training steps, trained again."""
    from tinysubspace.experiments.training import run_experiment

    light = dataclasses.replace(config.tracker, k=1, tol=1e-2, dense_until=0,
                                sparse_every=max(step, 1), extra_steps=(), anchors=(),
                                save_vectors_at=(), minibatch_every=0, spectrum="none")
    replay = dataclasses.replace(
        config, train=dataclasses.replace(config.train, steps=step, epochs=None,
                                          checkpoint_every=max(step, 1)),
        data=dataclasses.replace(config.data, test_set=False), tracker=light)
    with tempfile.TemporaryDirectory() as scratch:
        outcome = run_experiment(replay, Path(scratch) / "replay", data_root=data_root)
        if outcome.state != "finished":
            raise RunStoreError(f"retraining to step {step} ended {outcome.state}: "
                                f"{outcome.message}")
        return _load_checkpoint(Path(scratch) / "replay" / CHECKPOINT, model)


def _append_row(file: Path, row: dict[str, float]) -> None:
    """Add ``row`` to the CSV (a row of the same step is replaced; columns are the union)."""
    rows = []
    if file.exists():
        with file.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) != row["step"]]
    rows.append({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    rows.sort(key=lambda r: int(float(r["step"])))
    columns = list(dict.fromkeys(["step", *(key for r in rows for key in r)]))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(file, out.getvalue().encode())
