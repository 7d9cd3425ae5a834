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
    same top eigenvalues; so do several batches per rank (``chunk_size=3``: 3 and 6 chunks on
    the two ranks) and a ``params`` selection (the last layer)."""
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
    with pytest.raises(ValueError, match=r"unknown parameter name 'nope'"):
        ts.HessianOperator(model, loss_fn, data, params=["nope"])
    with pytest.raises(TypeError, match=r"one-shot iterator"):
        ts.HessianOperator(model, loss_fn, (d for d in [data]))
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
    chunked = ts.HessianOperator(model, loss_fn, data, chunk_size=3)
    last = ts.HessianOperator(model, loss_fn, data, params=["3.weight", "3.bias"])
    return {"restored": restored, "grads_kept": grads_kept, "values4": eig4.values,
            "error4": four.product_error, "batches": (chunked.local_batches,
                                                     chunked.max_batches),
            "values_chunked": ts.top_eigenpairs(chunked, K, tol=1e-8, seed=0).values,
            "values_last": ts.top_eigenpairs(last, K, tol=1e-8, seed=0).values,
            "dim_last": last.vector_space.dim, **buffers_checks(rank, world)}


def build_bn_model() -> torch.nn.Module:
    """A float64 MLP with batch norm, its running statistics away from their defaults."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8),
                                    torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(F64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.rand(8, generator=gen, dtype=F64) - 0.5)
        model[1].running_var.copy_(0.5 + 1.5 * torch.rand(8, generator=gen, dtype=F64))
    return model


def buffers_checks(rank: int, world: int) -> dict:
    """Batch norm under FSDP2: in eval mode the products use the buffers of when the operator
    was built (the caller changes them after); in train mode a product leaves the running
    statistics as they were. Returns both products (gathered) for the test's references."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_bn_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    X, Y = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    evaluated = ts.HessianOperator(model, loss_fn, (X[part], Y[part]))
    trained = ts.HessianOperator(model, loss_fn, (X[part], Y[part]), mode="train")
    V = evaluated.vector_space.local_rows(probe_block(evaluated.vector_space.dim))
    with torch.no_grad():
        model[1].running_mean.add_(1.0)  # the caller trains on: the operator keeps its snapshot
    changed = [b.clone() for b in model.buffers()]
    HV_eval = evaluated @ V
    HV_train = trained @ V
    kept = all(torch.equal(b, c) for b, c in zip(model.buffers(), changed, strict=True))
    return {"HV_eval": evaluated.vector_space.gather(HV_eval),
            "HV_train": trained.vector_space.gather(HV_train), "buffers_kept": kept}


# ----------------------------------------------------------------- a Hugging Face GPT-2
GPT2_K = 5
GPT2_LENGTHS = (12, 12, 9, 5, 3, 7, 4)  # tokens before the -100 padding of each sequence
GPT2_BATCHES = ((slice(0, 2),), (slice(2, 4), slice(4, 7)))  # rank 0: one batch; rank 1: two


def build_gpt2() -> torch.nn.Module:
    """A Hugging Face ``GPT2LMHeadModel`` from a config (no download; p = 27 584, tied
    embeddings), float64, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).to(F64).eval()


def gpt2_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of 7 sequences of 12 tokens, ``-100`` after each
    sequence's length (``GPT2_LENGTHS``)."""
    ids = torch.randint(50, (len(GPT2_LENGTHS), 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    for row, length in enumerate(GPT2_LENGTHS):
        labels[row, length:] = -100
    return ids, (labels != -100).long(), labels


def gpt2_batch(rows: slice) -> ts.curvature.data.Batch:
    """A dict batch of ``rows`` weighted by its counted tokens (the size hook of
    ``causal_lm_loss``: ``count_tokens(labels, shift=True)``)."""
    from tinysubspace.curvature.data import Batch, count_tokens

    ids, mask, labels = gpt2_data()
    return Batch({"input_ids": ids[rows], "attention_mask": mask[rows]}, labels[rows],
                 count_tokens(labels[rows], shift=True))


def gpt2_worker(rank: int, world: int, folder: Path) -> dict:
    """GPT-2 under FSDP2 (each block, then the root), this rank's dict batches weighted by
    tokens: top-5 eigenpairs, loss and gradient of ``causal_lm_loss``, gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_gpt2()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    data = [gpt2_batch(rows) for rows in GPT2_BATCHES[rank]]
    op = ts.HessianOperator(model, ts.causal_lm_loss, data, hvp_method="finite_difference4")
    space = op.vector_space
    eig = ts.top_eigenpairs(op, GPT2_K, tol=1e-8, seed=0)
    loss, g = op.loss_and_gradient()
    two = ts.HessianOperator(model, ts.causal_lm_loss, data)  # the default: 2-point differences
    eig2 = ts.top_eigenpairs(two, GPT2_K, tol=1e-6, seed=0, max_matvecs=300)
    return {"values": eig.values, "converged": eig.converged, "matvecs": eig.matvecs,
            "vectors": space.gather(eig.vectors), "loss": loss, "g": space.gather(g),
            "rows": op.shape[0], "dim": space.dim, "tokens": op.num_examples,
            "batches": (op.local_batches, op.max_batches), "product_error": op.product_error,
            "values2": eig2.values, "converged2": eig2.converged, "matvecs2": eig2.matvecs}



# ----------------------------------------------------------------- a bf16 model, no float32 copy
BF16_SPLIT = ((slice(0, 20),), (slice(20, 32), slice(32, 48)))  # rank 0: one batch; rank 1: two


def bf16_worker(rank: int, world: int, folder: Path) -> dict:
    """test_low_precision.py's bf16 ``gpt`` (p = 976) under FSDP2 on 2 ranks, measured in bf16
    (``θ + h v`` formed in float32, gradients summed in float32): top-3 eigenvalues, ``f_top``
    (its basis gathered), the largest float32 shard of a parameter (the transient shadow)."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from test_low_precision import bf16_gpt, token_loss

    model, X, Y = bf16_gpt()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    data = [(X[rows], Y[rows]) for rows in BF16_SPLIT[rank]]
    op = ts.HessianOperator(model, token_loss, data, hvp_method="finite_difference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eig = ts.top_eigenpairs(op, k=3, tol=0.05, seed=0)
    _, g = op.loss_and_gradient()
    space = op.vector_space
    shards = [p.to_local() for p in model.parameters()]
    return {"values": eig.values, "vectors": space.gather(eig.vectors), "g": space.gather(g),
            "dtype": op.dtype, "g_dtype": g.dtype, "matvecs": eig.matvecs,
            "product_error": op.product_error, "rows": op.shape[0],
            "shadow_bytes": 4 * max(s.numel() for s in shards),
            "bf16_bytes": sum(s.nbytes for s in shards)}


# ------------------------------------------------------- data paths: loaders, lists, dict batches
def weighted_batches(rank: int, world: int) -> list:
    """This rank's dict batches (``{"input": x}``, ``nn.Sequential``'s keyword) as
    :class:`~tinysubspace.curvature.data.Batch` es of 3 examples, each weighted by a stated
    count (``1 + index mod 4``, standing for counted tokens), not by its rows."""
    from tinysubspace.curvature.data import Batch

    X, Y = build_data()
    rows = range(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    starts = list(rows)[::3]
    return [Batch({"input": X[s: min(s + 3, rows.stop)]}, Y[s: min(s + 3, rows.stop)],
                  1 + s % 4) for s in starts]


def data_paths_worker(rank: int, world: int, folder: Path) -> dict:
    """One FSDP2 model, this rank's shard as a ``DataLoader`` (batches of 4), a list of
    ``(x, y)`` batches (of 3), an ``(X, Y)`` pair with ``chunk_size=4`` and weighted dict
    batches: each operator's batch counts, its product with a probe block and gradient
    (gathered), and the loader's top-3 eigenvalues."""
    from torch.utils.data import DataLoader, TensorDataset

    op = sharded_operator(rank, world)
    model = op.model
    X, Y = build_data()
    part = slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])
    x, y = X[part], Y[part]
    operators = {
        "loader": ts.HessianOperator(model, loss_fn, DataLoader(TensorDataset(x, y),
                                                                batch_size=4)),
        "list": ts.HessianOperator(model, loss_fn, [(x[s: s + 3], y[s: s + 3])
                                                    for s in range(0, len(x), 3)]),
        "chunked": ts.HessianOperator(model, loss_fn, (x, y), chunk_size=4),
        "weighted": ts.HessianOperator(model, loss_fn, weighted_batches(rank, world)),
    }
    out = {}
    for name, each in operators.items():
        space = each.vector_space
        V = space.local_rows(probe_block(space.dim))
        loss, g = each.loss_and_gradient()
        out[name] = {"batches": (each.local_batches, each.max_batches),
                     "examples": each.num_examples, "HV": space.gather(each @ V),
                     "loss": loss, "g": space.gather(g)}
    out["loader"]["values"] = ts.top_eigenpairs(operators["loader"], K, tol=1e-8,
                                                seed=0).values
    return out
