"""The run folder of a :class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker`:
created, or reopened for ``resume=True`` after checking that it was made with the same settings
(docs/run-store.md, docs/own-loop.md)."""

from __future__ import annotations

from typing import Any

import torch

from tinysubspace.experiments.config import RENAMED_KEYS
from tinysubspace.experiments.tracker_curvature import curvature_settings
from tinysubspace.runtime import distributed as tsdist

__all__ = ["STATE_FILE", "open_run_folder", "run_config", "run_meta"]

STATE_FILE = "tracker.pt"  # warm start, anchors and clocks of an own-loop run (for resume=True)


def open_run_folder(store: Any, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Create the run folder, or reopen it for ``resume``; returns the saved tracker state.

    The checks are the CLI's (:meth:`~tinysubspace.results.store.RunStore.resume`): the same
    comparison of the saved config (:func:`~tinysubspace.results.folder.config_differences`:
    ``meta`` and keys only one side has are not compared) and the same safe loader
    (:func:`~tinysubspace.results.folder.safe_torch_load`); a missing ``tracker.pt`` starts from
    the first step, and missing entries of the state start empty
    (:meth:`~tinysubspace.experiments.tracker.Tracker.load_state_dict`).
    """
    from tinysubspace.results.store import (
        CONFIG,
        RunStoreError,
        config_differences,
        read_config,
        safe_torch_load,
    )

    path = store.path
    if path.exists() and not path.is_dir():
        raise RunStoreError(f"out={str(path)!r} is a file, not a run folder")
    if not (path / CONFIG).exists():
        store.create(config)
        return None
    if not resume:
        raise RunStoreError(f"out={str(path)!r} already holds a run; pass resume=True to "
                            "continue it, or choose another folder")
    differ = [d.split(":")[0] for d in config_differences(read_config(path), config,
                                                      RENAMED_KEYS)]
    if differ:
        raise RunStoreError(f"the run in {path} was made with other settings ({', '.join(differ)}"
                            " differ); resume with the same ones, or choose another folder")
    if store.metrics.path.read_text().splitlines()[0].split(",") != store.metrics.columns:
        raise RunStoreError(f"{store.metrics.path} has other columns than this tracker writes")
    store.write_status("running", 0)
    state_path = path / STATE_FILE
    return safe_torch_load(state_path) if state_path.exists() else None


def run_meta(device: torch.device) -> dict[str, Any]:
    import platform
    import socket
    from datetime import datetime, timezone

    import numpy

    from tinysubspace import __version__

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": numpy.__version__, "tinysubspace": __version__},
            "device": str(device), "host": socket.gethostname(),
            "world_size": tsdist.world_size(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_config(tracker: Any, name: str | None) -> dict[str, Any]:
    """The ``config.json`` of a :class:`~tinysubspace.experiments.subspace_tracker.
    SubspaceTracker` run: what it measures, with which settings (``tracker``), on what."""
    engine, spec = tracker.engine, tracker.schedule_spec
    schedule = (spec if isinstance(spec, (str, int)) else sorted(spec) if isinstance(
        spec, (list, tuple, set, frozenset, range)) else
        f"callable {getattr(spec, '__qualname__', type(spec).__name__)}")
    ops, solver = engine.operators, engine.solver
    settings = {"k": engine.k, "tol": solver.tol, "tol_scale": solver.tol_scale,
               "solver": solver.solver, "anchors": sorted(tracker.anchors),
               "save_vectors_at": sorted(tracker.save_vectors_at),
               "dtype": str(ops.dtype).split(".")[-1], "chunk_size": ops.chunk_size,
               "mode": ops.mode, **tracker.blocks, "schedule": schedule,
               "budget": None if tracker.budget is None else tracker.budget.fraction,
               "seed": tracker.seed, "subset": tracker.subset, "check_subset": tracker.check_subset,
               "hvp_method": ops.hvp_method}
    if solver.reports_certificate:  # the check (amortised by default), budget and pass cost
        settings.update(check=solver.check, check_every=solver.check_every,
                        budget_matvecs=solver.budget_matvecs, pass_cost=solver.pass_cost)
    if tracker.extra_groups:
        settings["groups"] = list(tracker.extra_groups)
    curvature = [g for g in engine.groups if getattr(g, "bucket", None) == "curvature"]
    if curvature:
        settings["curvature"] = curvature_settings(curvature)
    p = sum(t.numel() for t in tracker.model.parameters() if t.requires_grad)
    return {"name": name or tracker.out.name, "table1_row": None, "source": "SubspaceTracker",
            "description": "measured with ts.SubspaceTracker in the user's own loop",
            "model": {"class": type(tracker.model).__name__, "parameters": p},
            "data": {"examples": tracker.total_examples}, "train": {"seed": tracker.seed},
            "tracker": settings}

