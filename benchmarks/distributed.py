"""One process against several: H·V, the full gradient and a top-10 solve under torch.distributed.

Each configuration holds the same data set; with ``R`` processes each holds a contiguous shard
(``shard_slice``) and the operator all-reduces. Rows:

* ``R`` processes × ``t`` torch threads each (gloo on CPU, file-store rendezvous, no ports);
* for comparison on the same cores, 1 process × ``R`` threads.

Reported per row: best wall time of one H·V with a block of ``b = 10`` (float64, as the
tracker measures), of the loss and gradient, a cold top-10 solve (tol 1e-4, seed 0) and its
products, rank 0's CPU seconds per H·V (its share of the work, unaffected by other load on
the machine), the cost of the all-reduce alone (a ``p × b`` float64 block), and rank 0's H·V on its
shard without any collective (the compute a perfect all-reduce would leave).

Run: ``python benchmarks/distributed.py [--problem digits|synthetic] [--worlds 1,2]
[--device cpu|cuda]``. On one GPU, ``--device cuda`` with ``R > 1`` puts every rank on the same
GPU through gloo (a functional check; NCCL needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    digits_problem,
    machine_line,
    print_table,
    synthetic_mnist_problem,
    timeit,
)
from tinysubspace import HessianOperator, top_eigenpairs
from tinysubspace.runtime import distributed as tsdist

BLOCK, K = 10, 10


def _problem(name: str):
    return digits_problem() if name == "digits" else synthetic_mnist_problem()


def cpu_seconds(fn, repeat: int) -> float:
    """Smallest CPU time of this process over ``repeat`` calls (after one warm-up): the work a
    rank does, whatever else shares the cores (wall time also counts waiting for them)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def measure(problem_name: str, device: str, chunk: int, repeat: int) -> dict:
    """Timings on this rank (every rank runs it; the collectives keep them in step)."""
    problem = _problem(problem_name)
    part = tsdist.shard_slice(len(problem.X))
    data = (problem.X[part], problem.Y[part])
    model = problem.model.to(device)
    op = HessianOperator(model, problem.loss_fn, data, dtype=torch.float64, device=device,
                         chunk_size=chunk)
    p = op.shape[0]
    V = torch.randn(p, BLOCK, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    hv = timeit(lambda: op @ V, repeat=repeat, sync=sync)
    hv_cpu = cpu_seconds(lambda: op @ V, repeat) if sync is None else float("nan")
    local = HessianOperator(model, problem.loss_fn, data, dtype=torch.float64, device=device,
                            chunk_size=chunk, distributed=False)  # this shard, no collectives
    hv_local = timeit(lambda: local @ V, repeat=repeat, sync=sync)
    grad = timeit(op.loss_and_gradient, repeat=repeat, sync=sync)
    reduce = timeit(lambda: tsdist.all_reduce_sum(V), repeat=repeat, sync=sync) \
        if tsdist.is_distributed() else float("nan")
    start = time.perf_counter()
    eig = top_eigenpairs(op, K, tol=1e-4, seed=0)
    solve = time.perf_counter() - start
    return {"p": p, "N": op.num_examples, "hv": hv, "hv_cpu": hv_cpu, "hv_local": hv_local,
            "grad": grad,
            "reduce": reduce, "solve": solve, "matvecs": eig.matvecs,
            "lambda1": float(eig.values[0])}


def _worker(rank: int, world: int, folder: str, threads: int, args: tuple, queue) -> None:
    torch.set_num_threads(threads)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                             world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        result = measure(*args)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(world: int, threads: int, args: tuple) -> dict:
    if world == 1:
        torch.set_num_threads(threads)
        return measure(*args)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        processes = [context.Process(target=_worker, args=(r, world, folder, threads, args, queue))
                     for r in range(world)]
        for process in processes:
            process.start()
        result = queue.get(timeout=3600)
        for process in processes:
            process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=["digits", "synthetic"], default="digits")
    parser.add_argument("--worlds", default="1,2", help="numbers of processes, e.g. 1,2,4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=4096, help="examples per data chunk")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's connections on the loopback
    worlds = [int(w) for w in args.worlds.split(",")]
    measure_args = (args.problem, args.device, args.chunk, args.repeat)
    rows, base = [], None
    configurations = [(w, args.threads) for w in worlds]
    configurations += [(1, w * args.threads) for w in worlds if w > 1 and args.device == "cpu"]
    for world, threads in configurations:
        r = run(world, threads, measure_args)
        base = base or r
        rows.append([world, threads, r["hv"], base["hv"] / r["hv"], r["hv_cpu"], r["hv_local"],
                     r["grad"],
                     base["grad"] / r["grad"], r["solve"], r["matvecs"], r["reduce"],
                     f"{r['lambda1']:.6f}"])
    print(f"{machine_line()}\n{args.problem}: N = {base['N']}, p = {base['p']}, device "
          f"{args.device}, chunk {args.chunk}")
    print_table("processes × threads: H·V (b = 10), gradient, top-10 solve",
                ["processes", "threads each", "H·V s", "H·V speed-up", "H·V CPU s (rank 0)",
                 "rank 0's part alone s",
                 "gradient s",
                 "gradient speed-up", "top-10 s", "products", "all-reduce s", "λ1"], rows)


if __name__ == "__main__":
    main()
