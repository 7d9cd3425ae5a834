"""The files of a run folder, written and read safely: atomic writes that honour the umask,
``torch.load`` with ``weights_only=True`` only, ``config.json`` read with a clear error, and the
checks made before a run folder is created or resumed (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "MINIBATCH", "SPECTRUM", "STATUS", "VECTORS",
           "RunStoreError", "atomic_write_bytes", "check_out_folder", "config_differences",
           "current_umask", "flatten_config", "read_config", "refusal_reason",
           "safe_torch_load", "write_failed"]

CONFIG, METRICS, MINIBATCH, STATUS = "config.json", "metrics.csv", "minibatch.csv", "status.json"
CHECKPOINT, SPECTRUM, VECTORS = "checkpoint.pt", "spectrum.npz", "eigenvectors"


class RunStoreError(RuntimeError):
    """A run folder that cannot be created, resumed or read as asked."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is shown (no change of
    the umask, so no race with other threads), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves either the old or the new file.

    The file gets mode ``0o666 & ~umask``, as ``open()`` would give it (``tempfile`` creates
    its files 0600, which would hide results from colleagues on a shared folder).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def refusal_reason(error: Exception) -> str:
    """What a ``weights_only`` load refused (e.g. ``unsupported GLOBAL posix.system``), without
    torch's advice to load the file unrestricted."""
    for line in str(error).splitlines():
        text = line.strip()
        if text and "weights_only" not in text.lower() and "weights only" not in text.lower():
            return text.rstrip(".")
    return "it asks for objects other than tensors"


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only.

    A run folder may come from someone else; a pickle that asks for any other object (which
    could run code while it is read) is refused, as is a file that is cut short.

    Raises:
        RunStoreError: the file holds other objects, or is damaged or incomplete.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        what = ("holds more than tensors and plain containers" if "GLOBAL" in str(error) else
                "is damaged or incomplete, or holds more than tensors and plain containers")
        raise RunStoreError(f"{path} {what}; refusing to load it ({refusal_reason(error)})"
                            ) from None
    except OSError as error:
        if error.errno != errno.EINVAL:  # no permission, an I/O error: say so
            raise RunStoreError(f"{path} cannot be read: {error.strerror or error}") from None
        raise RunStoreError(f"{path} is damaged or incomplete and cannot be read (torch: "
                            f"{error})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as error:
        first = (str(error).splitlines() or [""])[0] or type(error).__name__
        raise RunStoreError(f"{path} is damaged or incomplete and cannot be read ({first})"
                            ) from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the run folder ``path``, as a dict.

    Raises:
        RunStoreError: no ``config.json``, or one that is not a JSON object.
    """
    file = Path(path) / CONFIG
    if not file.exists():
        raise RunStoreError(f"{path} is not a run folder ({CONFIG} missing)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunStoreError(f"{file} is not valid JSON ({error}); the run's other files are "
                            "untouched") from None
    if not isinstance(config, dict):
        raise RunStoreError(f"{file} must hold a JSON object (the resolved config), got "
                            f"{type(config).__name__}")
    return config


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``, in the config's order (lists kept as
    values): the one flattener of configs (the resume comparison, ``tinysubspace config``, the
    report)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], mine: dict[str, Any],
                       renamed: Mapping[str, str] | None = None) -> list[str]:
    """``"optim.lr: 0.1 in the run, 0.2 now"`` for each key whose values differ (``meta`` and
    keys that only one side has — a run made by another version — are not compared).

    ``renamed`` maps old flat keys to new ones (the experiments' ``RENAMED_KEYS``): a run saved
    under an old key is compared under the new one (named so in the message)."""
    def plain(config: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in config.items() if k != "meta"}
        flat = flatten_config(json.loads(json.dumps(body, default=str)))
        return {(renamed or {}).get(key, key): value for key, value in flat.items()}

    theirs, ours = plain(saved), plain(mine)
    return [f"{key}: {json.dumps(theirs[key])} in the run, {json.dumps(ours[key])} now"
            for key in sorted(theirs.keys() & ours.keys()) if theirs[key] != ours[key]]


def check_out_folder(path: str | Path, resume: bool = False) -> None:
    """Refuse early (before any data is loaded) a run folder that cannot be used.

    Raises:
        RunStoreError: ``path`` is a file, lies under a file, is not writable (permissions, a
            read-only file system), holds a run already (without ``resume``) or holds none
            (with ``resume``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunStoreError(f"--out {path} is a file, not a folder; choose a folder for the run")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunStoreError(f"--out {path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunStoreError(f"--out {path}: cannot write in {existing} (no permission, or a "
                            "read-only file system); choose another folder")
    if resume and not (path / CONFIG).exists():
        raise RunStoreError(f"nothing to resume: {path} holds no run ({CONFIG} missing)")
    if not resume and (path / CONFIG).exists():
        raise RunStoreError(f"{path} already holds a run; use --resume to continue it or "
                            "--out to choose another folder")


def write_failed(path: Path, error: OSError) -> RunStoreError:
    what = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
    return RunStoreError(f"cannot write the run folder {path}: {what} "
                         f"({error.filename or path})")


