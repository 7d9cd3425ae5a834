"""What each rank of ``test_fsdp_tracker.py`` runs: a user's own SGD loop on an FSDP2 model,
with :class:`~tinysubspace.SubspaceTracker` measuring at some steps (issue 25).

The model, the data and the loop are built from seeds, the same on every rank and in the test
process (:func:`single_process_run`, the reference on an unsharded copy). Rank ``r`` holds the
rows ``BOUNDS[world][r]`` of the training and test data (uneven shards) and back-propagates
``(n_r · world / N) ℓ_r``: FSDP2 averages gradients over ranks, so each step is the full-batch
gradient step of the single process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import tinysubspace as ts
from tinysubspace.experiments.residuals import ResidualsGroup

F64 = torch.float64
N, N_TEST, K = 29, 13, 2
BOUNDS = {2: (0, 9, 29), 3: (0, 6, 17, 29)}  # uneven shards of the N training examples
TEST_BOUNDS = {2: (0, 5, 13), 3: (0, 3, 8, 13)}
STEPS, LR = 4, 0.5
TOL = 1e-9  # above the float64 finite-difference floor (about 4e-11), so every solve converges
OPTIONS = {"k": K, "schedule": [0, 1, 3, STEPS], "anchors": (0, 1), "save_vectors_at": (3,),
           "tol": TOL, "seed": 0}


def build_model() -> torch.nn.Module:
    """A small float64 MLP with an affine LayerNorm (p = 135)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 3)).to(F64)


def build_data() -> tuple[torch.Tensor, ...]:
    """``X, Y, X_test, Y_test``."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N + N_TEST, 5, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (N + N_TEST,), generator=gen)
    return X[:N], Y[:N], X[N:], Y[N:]


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets)


def user_loop(model: torch.nn.Module, data: tuple, weight: float,
              tracker: ts.SubspaceTracker) -> list[dict[str, float]]:
    """The user's loop: ``STEPS`` SGD steps on ``weight · loss``, the tracker called before each
    update and once after the last; the rows it returned."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rows = []
    for step in range(STEPS + 1):
        row = tracker.on_step(step)
        if row is not None:
            rows.append(row)
        if step == STEPS:
            break
        optimizer.zero_grad()
        (weight * loss_fn(model(data[0]), data[1])).backward()
        optimizer.step()
    tracker.close()
    return rows


BUDGET = {"solver": "budget", "budget_matvecs": 2 * K + 1}
"""The Krylov budget (issue 23): a fixed number of products per measurement, no convergence."""


def single_process_run(out: Path, **extra: Any) -> tuple[list[dict[str, float]], torch.nn.Module]:
    """The reference: the same loop and tracker on the unsharded model, all the data; its rows
    and the model after the loop (``extra``: more tracker options, e.g. :data:`BUDGET`)."""
    model = build_model()
    X, Y, Xt, Yt = build_data()
    tracker = ts.SubspaceTracker(model, loss_fn, (X, Y), out=out, test=(Xt, Yt),
                                 groups=[ResidualsGroup(K)], **{**OPTIONS, **extra})
    return user_loop(model, (X, Y), 1.0, tracker), model


def sharded_model(world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shards(rank: int, world: int) -> tuple[tuple, tuple]:
    X, Y, Xt, Yt = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    test = slice(TEST_BOUNDS[world][rank], TEST_BOUNDS[world][rank + 1])
    return (X[part], Y[part]), (Xt[test], Yt[test])


def tracker_worker(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """The user's loop on the FSDP2 model under ``world`` ranks, rank 0 writing
    ``folder/run``; then the metrics called as a single-process caller calls them, at the
    final point, and the bad options refused."""
    model = sharded_model(world)
    data, test = shards(rank, world)
    weight = data[1].shape[0] * world / N
    tracker = ts.SubspaceTracker(model, loss_fn, data, out=folder / "run", test=test,
                                 groups=[ResidualsGroup(K)], **OPTIONS)
    rows = user_loop(model, data, weight, tracker)
    return {"rows": rows, "writes": tracker.store is not None, "local_rows":
            tracker.operator().shape[0], **caller_metrics(tracker.operator()),
            "refused": refusals(model, data), **budget_run(rank, world, folder)}


def budget_run(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """On 2 ranks: the same loop with the tracker in budget mode (:data:`BUDGET`), rank 0
    writing ``folder/budget``; its rows."""
    if world != 2:
        return {}
    model = sharded_model(world)
    data, test = shards(rank, world)
    tracker = ts.SubspaceTracker(model, loss_fn, data, out=folder / "budget", test=test,
                                 groups=[ResidualsGroup(K)], **{**OPTIONS, **BUDGET})
    return {"budget_rows": user_loop(model, data, data[1].shape[0] * world / N, tracker)}


def caller_metrics(op: Any) -> dict[str, Any]:
    """The metrics as a caller who never heard of shards writes them (eigenpairs and the
    operator carry the inner product), and the same with ``space=`` given explicitly."""
    space = op.vector_space
    _, g = op.loss_and_gradient()
    eig = ts.top_eigenpairs(op, 2 * K, tol=TOL, seed=0)
    top = ts.top_eigenpairs(op, K, tol=TOL, seed=1)
    return {"f_top": ts.top_fraction(g, eig), "c2": ts.eigenvector_overlaps(g, eig),
            "overlap_g_Hg": ts.gradient_overlap(g, op),
            "subspace": ts.subspace_overlap(eig, top),
            "f_top_space": ts.top_fraction(g, eig.vectors, space=space),
            "overlap_space": ts.gradient_overlap(g, op @ g, space=space),
            "eig_space_is_op_space": eig.space is space, "values": eig.values,
            "gathered_g": space.gather(g), "gathered_vectors": space.gather(eig.vectors)}


REFUSED = {  # option -> (exception, message pattern), checked with pytest.raises on each rank
    "ggn": ({"ggn": True}, ValueError, r"not supported there: \['ggn'\]"),
    "geometry+blocks": ({"geometry": True, "blocks": "layers"}, ValueError,
                        r"not supported there: \['blocks', 'geometry'\]"),
    "chunk_size": ({"chunk_size": 4}, ValueError, r"not supported there: \['chunk_size'\]"),
    "subset": ({"subset": 5}, ValueError, r"not supported there: \['subset'\]"),
    "resume": ({"resume": True}, ValueError, r"not supported there: \['resume'\]"),
    "dtype": ({"dtype": torch.float32}, ValueError,
              r"its own dtype torch.float64.*got dtype=torch.float32"),
    "hvp_method": ({"hvp_method": "loop"}, ValueError,
                   r"needs hvp_method 'finite_difference'.*got 'loop'"),
}


def refusals(model: torch.nn.Module, data: tuple) -> list[str]:
    """Each option :data:`REFUSED` (and data given as a list of batches) is refused with its
    message before anything is measured; the names of the cases checked."""
    import pytest

    for options, kind, pattern in REFUSED.values():
        with pytest.raises(kind, match=pattern):
            ts.SubspaceTracker(model, loss_fn, data, k=K, **options)
    with pytest.raises(TypeError, match=r"pair of tensors per rank .*got list"):
        ts.SubspaceTracker(model, loss_fn, [data, data], k=K)
    return [*REFUSED, "batches"]
