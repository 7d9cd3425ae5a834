"""Launch a few gloo (or NCCL) processes on this machine and collect what each one returns (for
``test_distributed.py``).

:func:`launch` spawns ``world`` processes that meet through a file store in a temporary folder
(no TCP port to pick for the rendezvous; gloo's own connections stay on the loopback interface).
Each runs ``worker(rank, world, folder)`` and its return value (or the exception it raised) is
saved to ``folder/rank<r>.pt``; a process still alive at the deadline is killed and reported, so
a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["WorkerError", "launch"]


class WorkerError(RuntimeError):
    """A worker process crashed without a result, or did not finish before the deadline."""


def _entry(worker: Callable[..., Any], rank: int, world: int, folder: str,
           timeout_s: float, backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if torch.cuda.is_available():  # NCCL needs this rank's GPU chosen before it starts
        torch.cuda.set_device(rank % torch.cuda.device_count())
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result: Any = {"ok": worker(rank, world, Path(folder))}
    except Exception as error:  # reported to the test, which decides whether it was expected
        result = {"error": (type(error).__name__, str(error), traceback.format_exc())}
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    with contextlib.suppress(Exception):  # a peer that already left: nothing to clean up
        dist.destroy_process_group()


def launch(worker: Callable[[int, int, Path], Any], folder: Path, world: int = 2,
           timeout_s: float = 30.0, deadline_s: float = 120.0,
           backend: str = "gloo") -> list[dict[str, Any]]:
    """Run ``worker`` on ``world`` ranks; ``[{"ok": value} or {"error": (type, message,
    traceback)} for each rank]``.

    Args:
        worker: a module-level function ``worker(rank, world, folder)`` (picklable).
        folder: an empty temporary folder (rendezvous file, results).
        timeout_s: the process group's timeout (a collective waits this long at most).
        deadline_s: kill every process still running after this long.
        backend: the process group's backend (``gloo``; ``nccl`` for one GPU per rank).

    Raises:
        WorkerError: a process died without a result or outlived the deadline.
    """
    folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_entry,
                                 args=(worker, r, world, str(folder), timeout_s, backend))
                 for r in range(world)]
    for process in processes:
        process.start()
    end = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(end - time.monotonic(), 0.1))
    hung = [r for r, process in enumerate(processes) if process.is_alive()]
    for r in hung:
        processes[r].kill()
        processes[r].join()
    if hung:
        raise WorkerError(f"ranks {hung} did not finish within {deadline_s} s (a hang)")
    results = []
    for r in range(world):
        path = folder / f"rank{r}.pt"
        if not path.exists():
            raise WorkerError(f"rank {r} exited with code {processes[r].exitcode} and no result")
        results.append(torch.load(path, weights_only=False))
    return results
