"""Shared pieces of the benchmarks: problems (model, loss, data), timing and table printing.

Benchmarks are run on demand (``python benchmarks/<name>.py``), never by pytest. Every table
reports ratios against a baseline measured in the same run, on the same machine.
"""

from __future__ import annotations

import gzip
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Problem:
    """A model, a mean-reduced loss and a full data set ``(X, Y)``."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    X: torch.Tensor
    Y: torch.Tensor


def fc_net(sizes: Sequence[int], seed: int) -> nn.Sequential:
    """Fully connected ReLU network (the paper's FC: two hidden layers of 100)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_problem(seed: int = 0) -> Problem:
    """sklearn digits (1797 × 64, standardised), FC 64-100-100-10."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)
    Y = torch.tensor(data.target, dtype=torch.long)
    return Problem("digits FC 64-100-100-10", fc_net([64, 100, 100, 10], seed),
                   nn.functional.cross_entropy, X, Y)


def synthetic_mnist_problem(n: int = 10_000, seed: int = 0) -> Problem:
    """MNIST-sized synthetic data: ``n × 784`` Gaussian clusters, 10 classes; FC 784-100-100-10."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=gen)
    Y = torch.randint(0, 10, (n,), generator=gen)
    X = centers[Y] + 2.0 * torch.randn(n, 784, generator=gen)
    return Problem(f"synthetic {n}x784 FC 784-100-100-10", fc_net([784, 100, 100, 10], seed),
                   nn.functional.cross_entropy, X, Y)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST training images ``(n, 784)`` scaled to [0, 1], standardised, and labels.

    Raises:
        FileNotFoundError: the IDX files are not installed (``apt-get install -y
            dataset-fashion-mnist``).
    """
    images = FASHION_DIR / "train-images-idx3-ubyte.gz"
    labels = FASHION_DIR / "train-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} is missing; run apt-get install -y dataset-fashion-mnist")
    X = torch.tensor(_read_idx(images)[:n].reshape(-1, 784), dtype=torch.float32) / 255.0
    X = (X - X.mean()) / X.std()
    Y = torch.tensor(_read_idx(labels)[:n], dtype=torch.long)
    return X, Y


def fashion_problem(n: int | None = 10_000, seed: int = 0) -> Problem:
    X, Y = fashion_mnist(n)
    return Problem(f"Fashion-MNIST {X.shape[0]}x784 FC 784-100-100-10",
                   fc_net([784, 100, 100, 10], seed), nn.functional.cross_entropy, X, Y)


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
