"""How many CPU threads a run uses, and keeping the other thread pools from fighting torch's.

A parallel torch kernel waits for its slowest thread, so a thread that shares its core with
another busy process stalls every kernel: on a 2-core machine with one other busy process the
default job took 6 min 32 s with torch's default (2 threads) and 27 s with one. The default
here is therefore the number of *free* physical cores this process may use:

    threads = max(1, cores − busy),   cores = min(physical cores in the affinity mask,
                                                  the cgroup CPU quota),

where ``busy`` is the CPU time other processes used on those cores over a short sample
(``/proc/stat``, 0.1 s), rounded to whole cores. It is chosen once, at the start of a run.
``--threads N`` or the environment variable ``TINYSUBSPACE_THREADS`` override it; so does a
set ``OMP_NUM_THREADS`` (the user's explicit choice for torch). numpy's and scipy's BLAS get
one thread (:func:`limit_other_pools`): their calls here are small and their idle threads spin
on the cores torch computes on. See docs/performance.md ("Threads").
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "ThreadsError", "apply_threads", "available_cores", "busy_cores",
           "choose_threads", "default_threads", "limit_other_pools", "parse_threads"]

ENV_VAR = "TINYSUBSPACE_THREADS"


class ThreadsError(ValueError):
    """A thread count that is not a positive integer."""


def parse_threads(value: str | int, where: str) -> int:
    """``value`` as a thread count ≥ 1.

    Raises:
        ThreadsError: not a positive integer (``where`` names the source, e.g. ``--threads``).
    """
    try:
        threads = int(str(value).strip())
    except ValueError:
        raise ThreadsError(f"{where} must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ThreadsError(f"{where} must be a positive integer, got {value!r}")
    return threads


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among ``cpus`` (hyper-threads share a core)."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


def _cgroup_quota() -> float:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``); ``inf``: no limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return math.inf if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.inf if quota <= 0 else quota / period
    except (OSError, ValueError):
        return math.inf


def available_cores() -> int:
    """Physical cores this process may run on: its affinity mask, capped by a cgroup quota."""
    cores, quota = _physical_cores(_affinity()), _cgroup_quota()
    return max(1, cores if quota == math.inf else min(cores, math.floor(quota)))


def _cpu_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, total) jiffies of ``cpus`` from ``/proc/stat``."""
    busy = total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def busy_cores(sample_seconds: float = 0.1) -> float:
    """Cores' worth of CPU time that other processes used on this process's CPUs over a short
    sample (0 where ``/proc/stat`` is missing)."""
    cpus = set(_affinity())
    own = time.process_time
    try:
        busy0, total0 = _cpu_times(cpus)
        mine0, start = own(), time.monotonic()
        time.sleep(sample_seconds)
        busy1, total1 = _cpu_times(cpus)
        mine, elapsed = own() - mine0, time.monotonic() - start
    except (OSError, ValueError):
        return 0.0
    if total1 <= total0 or elapsed <= 0:
        return 0.0
    share = (busy1 - busy0) / (total1 - total0)  # of all the CPUs in the mask
    return max(share * len(cpus) - mine / elapsed, 0.0)


def default_threads(sample_seconds: float = 0.1) -> int:
    """Free physical cores: :func:`available_cores` minus :func:`busy_cores`, at least 1."""
    return max(1, available_cores() - round(busy_cores(sample_seconds)))


def choose_threads(cli: int | None = None, saved: int | None = None,
                   environ: dict[str, str] | None = None) -> tuple[int, str]:
    """The thread count of a run and where it came from, first that applies: ``--threads``,
    ``$TINYSUBSPACE_THREADS``, the count a resumed run was made with (``saved``: the same
    count keeps a resumed run bit-identical), ``$OMP_NUM_THREADS``, :func:`default_threads`.

    Raises:
        ThreadsError: a value that is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    if cli is not None:
        return parse_threads(cli, "--threads"), "--threads"
    if environ.get(ENV_VAR, "").strip():
        return parse_threads(environ[ENV_VAR], ENV_VAR), ENV_VAR
    if saved is not None:
        return parse_threads(saved, "the run's meta.threads"), "the run being resumed"
    if environ.get("OMP_NUM_THREADS", "").strip():
        return parse_threads(environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    return default_threads(), "free cores"


def limit_other_pools(threads: int = 1) -> object | None:
    """Limit the BLAS pools not shipped with torch (numpy's and scipy's OpenBLAS) to
    ``threads``; returns the :mod:`threadpoolctl` limiter (``None`` without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    torch_dir = str(Path(torch.__file__).parent)
    controller = ThreadpoolController()
    others = [lib for lib in controller.lib_controllers
              if lib.user_api == "blas" and not str(lib.filepath).startswith(torch_dir)]
    for lib in others:
        lib.set_num_threads(threads)
    return others


def apply_threads(threads: int) -> None:
    """Use ``threads`` torch threads in this process and one thread for the other BLAS pools."""
    torch.set_num_threads(threads)
    limit_other_pools(1)
