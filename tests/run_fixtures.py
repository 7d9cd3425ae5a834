"""Small run folders written by hand in the docs/run-store.md format (no training), for the
tests of plots, Table 1 and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

K = 3
ANCHORS = (0, 50, 100)
VECTOR_STEPS = (0, 100, 200)
PARAM_NAMES = ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
PARAM_SHAPES = [[5, 4], [5], [3, 5], [3]]
P = 20 + 5 + 15 + 3


def metrics_table(last_step: int = 300, every: int = 10, seed: int = 0) -> pd.DataFrame:
    """A metrics.csv table with every documented column for k = 3 and anchors 0, 50, 100."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, last_step + 1, every)
    n = len(steps)
    table = {"step": steps, "epoch": steps // 100, "wall_time": 0.1 * steps,
             "train/loss": 2.3 * np.exp(-steps / 80) + 0.05,
             "train/accuracy": 1 - 0.9 * np.exp(-steps / 60),
             "train/grad_norm": 1 + rng.random(n)}
    eig = np.sort(rng.random((n, 2 * K)) * 10, axis=1)[:, ::-1]
    for i in range(2 * K):
        table[f"hessian/eig_{i + 1}"] = eig[:, i]
    f_top = 1 - np.exp(-steps / 40)
    table["hessian/f_top"] = f_top
    table["hessian/f_next"] = 0.05 * rng.random(n)
    table["hessian/overlap_g_Hg"] = 0.5 + 0.4 * f_top
    c2 = rng.random((n, 2 * K))
    c2[:, :K] *= (f_top / c2[:, :K].sum(axis=1))[:, None]
    c2[:, K:] *= 0.01
    for i in range(2 * K):
        table[f"hessian/c2_{i + 1}"] = c2[:, i]
    table["hessian/residual_max"] = np.full(n, 1e-6)
    for t1 in ANCHORS:
        later = steps >= t1
        gap = np.where(later, steps - t1, np.nan)
        table[f"overlap/top/t1={t1}"] = np.exp(-gap / 400)
        table[f"overlap/next/t1={t1}"] = np.exp(-gap / 40)
        for d in range(2, 2 * K + 1):
            table[f"overlap/d={d}/t1={t1}"] = np.exp(-gap * d / 500)
    table["cost/matvecs"] = np.full(n, 100)
    table["cost/seconds"] = np.full(n, 0.5)
    table["test/loss"] = table["train/loss"] + 0.1
    table["test/accuracy"] = table["train/accuracy"] - 0.05
    table["test/f_top"] = f_top * 0.9
    table["test/overlap_g_Hg"] = 0.4 + 0.4 * f_top
    return pd.DataFrame(table)


def minibatch_table(last_step: int = 300, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.arange(last_step)
    return pd.DataFrame({"step": steps, "minibatch/loss": 2 * np.exp(-steps / 80),
                         "minibatch/overlap_g_Hg": 0.9 - 0.3 * rng.random(last_step)})


def write_run(path: Path, name: str = "fixture-run", table1_row: str | None = None,
              vectors: bool = True, spectrum: bool = True, minibatch: bool = True,
              last_step: int = 300, seed: int = 0) -> Path:
    """Write a run folder; returns its path."""
    path.mkdir(parents=True)
    config = {"name": name, "description": "a hand-written run for tests",
              "table1_row": table1_row, "data": {"name": "digits"},
              "model": {"name": "fc", "widths": [5]}, "optim": {"name": "sgd", "lr": 0.1},
              "train": {"steps": last_step, "seed": seed},
              "tracker": {"k": K, "anchors": list(ANCHORS)},
              "meta": {"torch": torch.__version__, "seed": seed}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    metrics_table(last_step, seed=seed).to_csv(path / "metrics.csv", index=False)
    columns = ["step", "minibatch/loss", "minibatch/overlap_g_Hg"]
    (minibatch_table(last_step, seed + 1) if minibatch else pd.DataFrame(columns=columns)
     ).to_csv(path / "minibatch.csv", index=False)
    (path / "status.json").write_text(json.dumps({"state": "finished", "step": last_step,
                                                  "message": ""}))
    (path / "eigenvectors").mkdir()
    if vectors:
        gen = torch.Generator().manual_seed(seed)
        for step in VECTOR_STEPS:
            Q, _ = torch.linalg.qr(torch.randn(P, 2 * K, generator=gen, dtype=torch.float64))
            torch.save({"step": step, "values": torch.linspace(5, 0.5, 2 * K),
                        "vectors": Q.float(), "param_names": PARAM_NAMES,
                        "param_shapes": PARAM_SHAPES},
                       path / "eigenvectors" / f"step_{step:08d}.pt")
    if spectrum:
        rng = np.random.default_rng(seed)
        bulk = rng.normal(0, 0.01, (2, P - K))
        top = np.array([[9.0, 6.0, 4.0], [8.0, 5.5, 3.5]])
        np.savez(path / "spectrum.npz", eigenvalues=np.concatenate([top, bulk], axis=1))
    return path
