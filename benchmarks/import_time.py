"""``import tinysubspace`` time over ``import torch`` time, each in fresh interpreters.

The core (curvature, linalg, metrics) is imported eagerly; pandas, matplotlib and the experiment
layer only on first use. Prints the median of ``--repeat`` fresh imports of each, interleaved, and
which heavy modules each import leaves in ``sys.modules``.

    python benchmarks/import_time.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

PROBE = ("import sys, time; t = time.perf_counter(); import {module}; "
         "print(time.perf_counter() - t, "
         "','.join(m for m in ('pandas', 'matplotlib', 'sklearn') if m in sys.modules) or '-')")


def fresh_import(module: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c",
                          PROBE.format(module=module)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds, heavy = out.stdout.split()
    return float(seconds), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"torch": [], "tinysubspace": []}
    heavy = {}
    for _ in range(args.repeat):  # interleaved, so load changes hit both alike
        for module in times:
            seconds, heavy[module] = fresh_import(module)
            times[module].append(seconds)
    torch_s, ts_s = (statistics.median(times[m]) for m in ("torch", "tinysubspace"))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.repeat} fresh imports each (median)")
    print(f"import torch         {torch_s:6.3f} s   heavy modules: {heavy['torch']}")
    print(f"import tinysubspace  {ts_s:6.3f} s   heavy modules: {heavy['tinysubspace']}")
    print(f"ratio tinysubspace / torch = {ts_s / torch_s:.3f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
