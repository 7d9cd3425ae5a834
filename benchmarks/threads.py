"""Thread count of a run on a loaded machine: torch's default (one thread per CPU) against
tinysubspace's default (the free physical cores, src/tinysubspace/runtime/threads.py).

The benchmark loads the machine itself: it starts ``--busy`` processes that spin on the CPU,
then runs the same short ``tinysubspace run`` twice in fresh processes, once with
``--threads $(nproc)`` (what torch did before) and once with the new default (no thread
setting in the environment), and prints both wall times. ``--busy 0`` runs the same on the
machine as it is.

    python benchmarks/threads.py                # 1 busy process, 60 steps
    python benchmarks/threads.py --steps 300 --busy 1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def _exit_on_term(signum, frame) -> None:  # `timeout` sends SIGTERM: stop the spinners too
    raise SystemExit(128 + signum)


def run_once(steps: int, threads: int | None, out: Path) -> tuple[float, str]:
    """Wall seconds of one ``tinysubspace run`` and the thread line it printed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TINYSUBSPACE_THREADS")}
    command = [sys.executable, "-m", "tinysubspace", "run", "--set", f"train.steps={steps}",
               "--out", str(out), "--quiet"]
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}): {result.stderr[-2000:]}")
    line = next((x for x in result.stderr.splitlines() if x.startswith("tinysubspace:")), "")
    return seconds, line.split(", ", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes to start")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_term)
    cpus = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)  # let the spinners take their cores
        print(f"{cpus} CPUs, {args.busy} busy process(es) started by the benchmark, load "
              f"average before: {os.getloadavg()[0]:.2f}; {args.steps} steps of the default "
              "experiment (fig1-fc-digits)")
        with tempfile.TemporaryDirectory() as folder:
            after, chosen = run_once(args.steps, None, Path(folder) / "after")
            print(f"after:  {chosen}: {after:.1f} s", flush=True)
            before, _ = run_once(args.steps, cpus, Path(folder) / "before")
            print(f"before: {cpus} threads: {before:.1f} s", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print(f"| threads | wall s |\n|---|---|\n| {cpus} (torch's default, before) | "
          f"{before:.1f} |\n| {chosen} (tinysubspace's default, after) | {after:.1f} |")
    print(f"speed-up: {before / after:.1f}x")


if __name__ == "__main__":
    main()
