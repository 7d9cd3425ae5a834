"""The run folder of a :class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker`:
created, or reopened for ``resume=True`` after checking that it was made with the same settings
(docs/run-store.md, docs/own-loop.md)."""

from __future__ import annotations

import json
import pickle
from typing import Any

import torch

from tinysubspace.runtime import distributed as tsdist

__all__ = ["STATE_FILE", "differing_keys", "open_run_folder", "run_meta"]

STATE_FILE = "tracker.pt"  # warm start, anchors and clocks of an own-loop run (for resume=True)


def open_run_folder(store: Any, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Create the run folder, or reopen it for ``resume``; returns the saved tracker state."""
    from tinysubspace.results.store import CONFIG, RunStoreError

    path = store.path
    if path.exists() and not path.is_dir():
        raise RunStoreError(f"out={str(path)!r} is a file, not a run folder")
    if not (path / CONFIG).exists():
        store.create(config)
        return None
    if not resume:
        raise RunStoreError(f"out={str(path)!r} already holds a run; pass resume=True to "
                            "continue it, or choose another folder")
    saved = json.loads((path / CONFIG).read_text())
    differ = sorted(differing_keys(
        {k: v for k, v in config.items() if k != "meta"},
        {k: v for k, v in saved.items() if k != "meta"}))
    if differ:
        raise RunStoreError(f"the run in {path} was made with other settings ({', '.join(differ)}"
                            " differ); resume with the same ones, or choose another folder")
    if store.metrics.path.read_text().splitlines()[0].split(",") != store.metrics.columns:
        raise RunStoreError(f"{store.metrics.path} has other columns than this tracker writes")
    store.write_status("running", 0)
    state_path = path / STATE_FILE
    if not state_path.exists():
        return None
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise RunStoreError(f"{state_path} cannot be read as the tracker's state (tensors and "
                            f"plain containers only): {str(error).splitlines()[0]}") from error


def differing_keys(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    keys = set(mine) | set(theirs)
    out = []
    for key in keys:
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


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
