"""What each rank of ``test_fsdp.py`` runs: an FSDP2 model on its uneven shard of the data.

The model and data are built from seeds (the same on every rank and in the test process); each
rank wraps its copy with ``fully_shard`` and measures through
:class:`~tinysubspace.curvature.sharded.ShardedHessianOperator`, then gathers what the test
compares with the single-process, exact references.
"""

from __future__ import annotations

from pathlib import Path

import torch

import tinysubspace as ts

F64 = torch.float64
N = 23
K = 3
BOUNDS = {2: (0, 7, 23), 3: (0, 5, 13, 23)}  # uneven shards of the N examples


def build_model() -> torch.nn.Module:
    """A small float64 MLP with an affine LayerNorm (p = 195)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(F64)


def build_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, 6, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (N,), generator=gen)
    return X, Y


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets)


def probe_block(p: int) -> torch.Tensor:
    """A global ``(p, 2)`` block (the same on every rank) to compare products."""
    return torch.randn(p, 2, generator=torch.Generator().manual_seed(5), dtype=F64)


def sharded_operator(rank: int, world: int, **kwargs) -> ts.HessianOperator:
    """This rank's operator: the model wrapped with FSDP2, this rank's shard of the data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    X, Y = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    return ts.HessianOperator(model, loss_fn, (X[part], Y[part]), **kwargs)


def eigen_worker(rank: int, world: int, folder: Path) -> dict:
    """Top-k eigenpairs, gradient, products and the metrics on the shards, gathered."""
    op = sharded_operator(rank, world)
    space = op.vector_space
    eig = ts.top_eigenpairs(op, K, tol=1e-8, seed=0)
    loss, g = op.loss_and_gradient()
    V = space.local_rows(probe_block(space.dim))
    return {"values": eig.values, "vectors": space.gather(eig.vectors),
            "local_rows": op.shape[0], "converged": eig.converged,
            "checked": eig.multiplicity_checked, "loss": loss, "g": space.gather(g),
            "HV": space.gather(op @ V), "product_error": op.product_error,
            "f_top": ts.top_fraction(g, eig.vectors, space=space),
            "overlap": ts.gradient_overlap(g, op @ g, space=space),
            "self_overlap": ts.subspace_overlap(eig.vectors, eig.vectors[:, :2], space=space)}


STEP = 0.5  # the parameter step between the two tracked measurements: θ' = θ − STEP · ∇L
SLQ_STEPS = 8


def tracking_worker(rank: int, world: int, folder: Path) -> dict:
    """Top-k at ``θ``, one gradient step on the shards, ``track_eigenpairs`` at ``θ'`` warm
    started from the first result (``krylov`` and ``subspace`` warm starts), and SLQ at ``θ'``."""
    op = sharded_operator(rank, world)
    first = ts.top_eigenpairs(op, K, tol=1e-8, seed=0)
    _, g = op.loss_and_gradient()
    model = op.model
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            local = p.to_local()
            local.sub_(STEP * g[offset: offset + local.numel()].view_as(local))
            offset += local.numel()
    X, Y = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    moved = ts.HessianOperator(model, loss_fn, (X[part], Y[part]))
    tracked = {warm: ts.track_eigenpairs(moved, K, previous=first, tol=1e-8, warm=warm)
               for warm in ("krylov", "subspace")}
    density = ts.spectral_density(moved, steps=SLQ_STEPS, probes=2, seed=3)
    return {"first": first.values, "g": op.vector_space.gather(g),
            **{f"tracked_{w}": e.values for w, e in tracked.items()},
            **{f"converged_{w}": e.converged for w, e in tracked.items()},
            "nodes": density.nodes, "weights": density.weights, "dim": density.dimension}


def memory_worker(rank: int, world: int, folder: Path) -> dict:
    """Local rows and the bytes of a Lanczos basis (vectors and images, the default basis of a
    top-3 solve, 23 vectors) on this rank, for a wider MLP (p = 39 434)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tinysubspace.linalg.basis import KrylovBasis

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.LayerNorm(512),
                                torch.nn.Tanh(), torch.nn.Linear(512, 10)).to(F64)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    X = torch.randn(8, 64, dtype=F64, generator=torch.Generator().manual_seed(rank))
    op = ts.HessianOperator(model, loss_fn, (X, torch.zeros(8, dtype=torch.int64)))
    basis = KrylovBasis(op.shape[0], op.dtype, op.device, 23, space=op.vector_space)
    return {"p": op.vector_space.dim, "rows": op.shape[0],
            "bytes": basis._Q.nbytes + basis._HQ.nbytes}


def checks_worker(rank: int, world: int, folder: Path) -> dict:
    """Bad input is refused with a message naming what was expected; a product leaves the
    model's parameter shards and ``.grad`` exactly as they were; the 4-point products give the
    same top eigenvalues."""
    import pytest

    op = sharded_operator(rank, world)
    model = op.model
    X, Y = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    data = (X[part], Y[part])
    with pytest.raises(ValueError, match=r"needs hvp_method 'finite_difference'.*got 'loop'"):
        ts.HessianOperator(model, loss_fn, data, hvp_method="loop")
    with pytest.raises(ValueError, match=r"its own dtype torch.float64.*got dtype=torch.float32"):
        ts.HessianOperator(model, loss_fn, data, dtype=torch.float32)
    with pytest.raises(ValueError, match="params must be None"):
        ts.HessianOperator(model, loss_fn, data, params=["0.weight"])
    with pytest.raises(TypeError, match=r"an \(inputs, targets\) pair of tensors, got list"):
        ts.HessianOperator(model, loss_fn, [data, data, data])
    from tinysubspace.curvature.sharded import ShardedHessianOperator

    with pytest.raises(TypeError, match=r"got plain tensors for \['0.weight'"):
        ShardedHessianOperator(build_model(), loss_fn, data)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.to_local().detach().clone() for p in model.parameters()]
    op @ op.vector_space.local_rows(probe_block(op.vector_space.dim))
    restored = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before,
                                                                 strict=True))
    grads_kept = all(bool((p.grad.to_local() == 7.0).all()) for p in model.parameters())
    four = ts.HessianOperator(model, loss_fn, data, hvp_method="finite_difference4")
    eig4 = ts.top_eigenpairs(four, K, tol=1e-8, seed=0)
    return {"restored": restored, "grads_kept": grads_kept, "values4": eig4.values,
            "error4": four.product_error}
