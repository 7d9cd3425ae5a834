"""Shared pieces of the benchmarks: problems (model, loss, data), timing and table printing.

Benchmarks are run on demand (``python benchmarks/<name>.py``), never by pytest. Every table
reports ratios against a baseline measured in the same run, on the same machine.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tinysubspace import HVP_METHODS
from tinysubspace.problems.datasets.catalog import load_dataset
from tinysubspace.problems.models.networks import build_model

EXACT_HVP_METHODS = tuple(m for m in HVP_METHODS if m != "auto")
"""The H·v methods a benchmark compares (``auto`` picks one of them)."""


@dataclass(frozen=True)
class Problem:
    """A model, a mean-reduced loss and a full data set ``(X, Y)``."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    X: torch.Tensor
    Y: torch.Tensor
    device: str = "cpu"

    def to(self, device: str) -> Problem:
        """The same problem with model and data on ``device``."""
        return Problem(self.name, self.model.to(device), self.loss_fn, self.X.to(device),
                       self.Y.to(device), device)


def digits_problem(seed: int = 0) -> Problem:
    """sklearn digits, all 1797 × 64 (``load_dataset("digits", split="all")``), FC 64-100-100-10."""
    data = load_dataset("digits", split="all")
    return Problem("digits FC 64-100-100-10", build_model("fc", (64,), 10, seed=seed),
                   nn.functional.cross_entropy, data.inputs, data.targets)


def synthetic_mnist_problem(n: int = 10_000, seed: int = 0) -> Problem:
    """MNIST-sized synthetic data: ``n × 784`` Gaussian clusters, 10 classes; FC 784-100-100-10."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=gen)
    Y = torch.randint(0, 10, (n,), generator=gen)
    X = centers[Y] + 2.0 * torch.randn(n, 784, generator=gen)
    return Problem(f"synthetic {n}x784 FC 784-100-100-10",
                   build_model("fc", (784,), 10, seed=seed), nn.functional.cross_entropy, X, Y)


def fashion_problem(n: int | None = 10_000, seed: int = 0) -> Problem:
    """The first ``n`` Fashion-MNIST training images (standardised), FC 784-100-100-10."""
    data = load_dataset("fashion-mnist", split="train")
    X = data.inputs[:n].reshape(-1, 784)
    X = (X - X.mean()) / X.std()
    return Problem(f"Fashion-MNIST {X.shape[0]}x784 FC 784-100-100-10",
                   build_model("fc", (784,), 10, seed=seed), nn.functional.cross_entropy,
                   X, data.targets[:n])


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1,
           sync: Callable[[], None] | None = None) -> float:
    """Best (smallest) wall time of ``repeat`` calls of ``fn()`` in seconds, after ``warmup`` calls.

    The minimum, not the median: the machine is shared, and interference only adds time.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(min(times))


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1,
                       sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Best wall time of each function, the calls interleaved round-robin.

    Interleaving spreads the load of other users of a shared machine over every variant alike,
    so the ratios between them stay meaningful when the absolute times do not.
    """
    sync = sync or (lambda: None)
    best = {name: float("inf") for name in fns}
    for round_ in range(warmup + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def exact_device() -> str:
    """``"cuda"`` where there is a GPU, else ``"cpu"``, with TF32 matmuls off so that GPU
    products are float32 products (the accuracy the tables compare at)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {cuda}, "
            f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table (so it pastes into docs/performance.md)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "—"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)
