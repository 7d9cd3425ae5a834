"""Many processes, one Hessian: 2 gloo processes on CPU against one process and the dense reference.

With shards of unequal size (7 and 16 examples; 151 and 150), the distributed H·V, gradient,
loss and top-k eigenpairs equal the dense float64 reference and the single-process operator,
and are bit-identical on both ranks; a short tracked run under ``torchrun`` (and a run stopped
and resumed on 2 processes) reproduces the single-process run; a rank that fails makes every
rank raise (collectively, or as soon as its connection closes, or by the process group's
timeout) instead of hanging.

The tests that start processes carry the ``distributed`` marker (``pytest -m distributed``).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tinysubspace as ts
from cases import Case
from distributed_workers import launch
from reference import FlatLoss, reference_gradient, reference_hessian, relative_error
from tinysubspace.experiments.catalog import load_experiment
from tinysubspace.experiments.training import minibatch_step, run_experiment
from tinysubspace.results.store import load_run
from tinysubspace.runtime import distributed as tsdist

F64 = torch.float64
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPERATOR_CASES = (Case("mlp_layernorm", "ce", "tuple"), Case("cnn_batchnorm", "mse", "tuple", 1))
BOUNDS = (0, 7, 23)  # rank 0 holds examples 0..6, rank 1 examples 7..22 (of 23)
K = 3


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _operator(case: Case, part: slice, **kwargs) -> ts.HessianOperator:
    problem = case.build()
    data = (problem.inputs[part], problem.targets[part])
    return ts.HessianOperator(problem.model, problem.loss_fn, data, dtype=F64, batch_size=4,
                              **kwargs)


def _measure(op: ts.HessianOperator) -> dict:
    V = _randn(op.shape[0], 4, seed=1)
    loss, g = op.loss_and_gradient()
    eig = ts.top_eigenpairs(op, K, tol=1e-10, seed=0)
    return {"N": op.num_examples, "distributed": op.distributed, "HV": op @ V,
            "Hv": op @ V[:, 0], "loss": loss, "g": g, "values": eig.values,
            "vectors": eig.vectors, "residuals": eig.residuals, "matvecs": eig.matvecs}


def _caught(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


# ---------------------------------------------------------------- workers (run in each rank)
def _operator_worker(rank: int, world: int, folder: Path) -> dict:
    part = slice(BOUNDS[rank], BOUNDS[rank + 1])
    out = {str(case): _measure(_operator(case, part)) for case in OPERATOR_CASES}
    case = OPERATOR_CASES[0]
    problem = case.build()
    if rank == 1:  # this rank's model has drifted away from rank 0's
        with torch.no_grad():
            next(problem.model.parameters())[0, 0] += 1e-3
    out["drifted"] = _caught(lambda: ts.HessianOperator(
        problem.model, problem.loss_fn, (problem.inputs[part], problem.targets[part])))
    X, Y = case.build().inputs[part].clone(), case.build().targets[part]
    if rank == 1:
        X[3] = float("nan")
    poisoned = ts.HessianOperator(case.build().model, case.build().loss_fn, (X, Y), dtype=F64)
    out["nan_on_rank_1"] = _caught(poisoned.loss_and_gradient)
    op = _operator(case, part)
    out["other_block"] = _caught(lambda: op @ _randn(op.shape[0], 2, seed=10 + rank))

    def fails_on_rank_1() -> torch.Tensor:
        if rank == 1:
            raise KeyError("no such thing")
        return torch.ones(2)

    out["key_error"] = _caught(lambda: tsdist.sum_across_ranks(fails_on_rank_1, "cpu"))
    out["still_in_step"] = tsdist.all_reduce_sum(torch.ones(1) * (rank + 1))  # no desync
    out["minibatch"] = _minibatch_parts(rank)
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(rank + 1.0)
    tsdist.average_buffers(norm, weight=BOUNDS[rank + 1] - BOUNDS[rank])
    out["running_mean"] = norm.running_mean.clone()
    if rank == 1:  # last: alive but stuck (outside any collective) until rank 0 has given up
        while not (folder / "rank0.pt").exists():
            time.sleep(0.05)
    else:  # waits for rank 1 in this product until the process group's timeout
        out["peer_stalled"] = _caught(lambda: op @ _randn(op.shape[0], seed=0))
    return out


def _minibatch_parts(rank: int) -> tuple:
    """Rank 0 holds the whole mini-batch of 5 examples, rank 1 an empty part."""
    problem = Case("mlp_softplus", "ce", "tuple").build()
    part = slice(0, 5) if rank == 0 else slice(0, 0)
    loss, overlap = minibatch_step(problem.model, problem.loss_fn, problem.inputs[part],
                                   problem.targets[part], True,
                                   functools.partial(tsdist.weighted_mean, weight=5 - 5 * rank))
    return loss, overlap, [p.grad.clone() for p in problem.model.parameters()]


# ------------------------------------------------------------------------ operator checks
@pytest.fixture(scope="module")
def operator_results(tmp_path_factory):
    return launch(_operator_worker, tmp_path_factory.mktemp("operator"), timeout_s=5)


@pytest.mark.slow
@pytest.mark.parametrize("case", OPERATOR_CASES, ids=str)
@pytest.mark.distributed
@needs_gloo
def test_products_gradient_and_eigenpairs_equal_the_single_process_ones(operator_results, case):
    ranks = [result["ok"][str(case)] for result in operator_results]
    problem = case.build()
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    H, g_ref, loss_ref = reference_hessian(f), reference_gradient(f), float(f(f.theta0))
    single = _measure(_operator(case, slice(None), distributed=False))
    V = _randn(H.shape[0], 4, seed=1)
    top = torch.linalg.eigvalsh(H).flip(0)[:K]
    for got in ranks:
        assert got["distributed"] and got["N"] == 23
        assert relative_error(got["HV"], H @ V) < 1e-10
        assert relative_error(got["Hv"], H @ V[:, 0]) < 1e-10
        assert relative_error(got["g"], g_ref) < 1e-10
        assert got["loss"] == pytest.approx(loss_ref, rel=1e-12)
        assert relative_error(got["values"], top) < 1e-8
        assert relative_error(got["HV"], single["HV"]) < 1e-12
        assert relative_error(got["g"], single["g"]) < 1e-12
        assert relative_error(got["values"], single["values"]) < 1e-10
        overlaps = (got["vectors"].T @ single["vectors"]).abs().diagonal()
        assert torch.allclose(overlaps, torch.ones(K, dtype=F64), atol=1e-8)
        assert got["matvecs"] == single["matvecs"]


@pytest.mark.distributed
@needs_gloo
def test_every_rank_gets_bit_identical_results(operator_results):
    first, second = (result["ok"] for result in operator_results)
    for case in OPERATOR_CASES:
        a, b = first[str(case)], second[str(case)]
        for key in ("HV", "Hv", "g", "values", "vectors", "residuals"):
            assert torch.equal(a[key], b[key]), key
        assert a["loss"] == b["loss"] and a["matvecs"] == b["matvecs"]


@pytest.mark.distributed
@needs_gloo
def test_a_failure_or_disagreement_raises_on_every_rank(operator_results):
    first, second = (result["ok"] for result in operator_results)
    for out in (first, second):
        assert out["drifted"][0] == "DistributedError"
        assert "ranks hold different parameters" in out["drifted"][1]
        assert out["nan_on_rank_1"][0] == "NonFiniteError"
        assert out["other_block"][0] == "DistributedError"
        assert "different block" in out["other_block"][1]
        assert torch.equal(out["still_in_step"], torch.tensor([3.0]))
    assert "the loss of batch 0 is nan" in second["nan_on_rank_1"][1]
    assert first["nan_on_rank_1"][1].startswith("rank 1 of 2 failed: NonFiniteError: the loss")
    assert second["key_error"][0] == "KeyError"
    assert first["key_error"] == ("DistributedError",
                                  "rank 1 of 2 failed: KeyError: 'no such thing'")


@pytest.mark.distributed
@needs_gloo
def test_a_rank_with_an_empty_part_of_the_minibatch_adds_nothing(operator_results):
    problem = Case("mlp_softplus", "ce", "tuple").build()
    loss, overlap = minibatch_step(problem.model, problem.loss_fn, problem.inputs[:5],
                                   problem.targets[:5], True)
    grads = [p.grad for p in problem.model.parameters()]
    for result in operator_results:
        got_loss, got_overlap, got_grads = result["ok"]["minibatch"]
        assert got_loss == pytest.approx(loss, rel=1e-6)
        assert got_overlap == pytest.approx(overlap, rel=1e-5)
        for got, want in zip(got_grads, grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
@needs_gloo
def test_running_statistics_are_averaged_with_the_parts_sizes(operator_results):
    for result in operator_results:  # (7 * 1 + 16 * 2) / 23 on both ranks
        torch.testing.assert_close(result["ok"]["running_mean"], torch.full((3,), 39 / 23))


@pytest.mark.distributed
@needs_gloo
def test_a_rank_that_stalls_makes_the_others_raise_after_the_timeout(operator_results):
    kind, message = operator_results[0]["ok"]["peer_stalled"]
    assert kind in ("RuntimeError", "DistBackendError") and "Timed out" in message


# ------------------------------------------------------------------------ training checks
SETTINGS = {"train.steps": "20", "model.widths": "16", "tracker.k": "2", "data.n_train": "301",
            "tracker.dense_every": "20", "tracker.anchors": "0", "tracker.save_vectors_at": "0",
            "tracker.hvp_batch_size": "64", "train.checkpoint_every": "5",
            "train.device": "cpu"}
VOLATILE = ["wall_time", "cost/seconds"]


def _tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = load_run(path)
    return run.metrics.drop(columns=VOLATILE), run.minibatch


def _assert_same_run(path: Path, reference: Path) -> None:
    for got, want in zip(_tables(path), _tables(reference), strict=True):
        assert list(got.columns) == list(want.columns)
        assert got["step"].tolist() == want["step"].tolist()  # each row once: one writer
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-4,
                                   atol=1e-6)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "run"
    outcome = run_experiment(load_experiment("fig1-fc-digits", SETTINGS), path)
    assert outcome.state == "finished"
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out: Path, settings: dict[str, str], **env: str) -> None:
    """``torchrun --nproc-per-node 2 -m tinysubspace run ...`` on 127.0.0.1; checks the run."""
    options = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINYSUBSPACE_DIST_TIMEOUT": "60", **env}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for _ in range(2):  # a second port if another process took the free one meanwhile
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "--max-restarts", "0",
                   "-m", "tinysubspace", "run", "fig1-fc-digits", *options, "--out", str(out),
                   "--quiet"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                              check=False)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # only rank 0 prints
    assert load_run(out).config["meta"]["world_size"] == 2
    assert load_run(out).status["state"] == "finished"


@pytest.mark.slow
@pytest.mark.distributed
@needs_gloo
def test_torchrun_tracked_run_equals_the_single_process_run(tmp_path, single_run):
    _torchrun(tmp_path / "run", SETTINGS)
    _assert_same_run(tmp_path / "run", single_run)


def _resume_worker(rank: int, world: int, folder: Path) -> list:
    config = load_experiment("fig1-fc-digits", SETTINGS)
    stopped = run_experiment(config, folder / "run", stop_after=10)
    resumed = run_experiment(config, folder / "run", resume=True)
    outcomes = [(stopped.state, stopped.step), (resumed.state, resumed.step)]
    if rank == 0:  # last: rank 1 has left (its process ends), so this sum cannot complete
        outcomes.append(_caught(lambda: tsdist.all_reduce_sum(torch.ones(1))))
    return outcomes


@pytest.mark.slow
@pytest.mark.distributed
@needs_gloo
def test_a_run_stopped_and_resumed_on_two_processes_equals_the_single_process_run(
        tmp_path, single_run):
    first, second = launch(_resume_worker, tmp_path)
    assert second.get("ok") == [("stopped", 10), ("finished", 20)], second
    assert first["ok"][:2] == [("stopped", 10), ("finished", 20)], first
    _assert_same_run(tmp_path / "run", single_run)
    # a rank that leaves makes the others raise at once ("Connection closed by peer")
    assert first["ok"][2][0] in ("RuntimeError", "DistBackendError")


# -------------------------------------------------------------- single-process behaviour
def test_shards_tile_the_data_and_differ_by_at_most_one():
    for n, world in [(0, 3), (2, 3), (23, 2), (1797, 4), (10, 1)]:
        parts = [tsdist.shard_slice(n, r, world) for r in range(world)]
        covered = [i for part in parts for i in range(n)[part]]
        assert covered == list(range(n))
        sizes = [part.stop - part.start for part in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="0 <= rank < world"):
        tsdist.shard_slice(10, 2, 2)


def test_in_one_process_the_helpers_are_the_identity():
    assert not tsdist.is_distributed() and tsdist.rank() == 0 and tsdist.world_size() == 1
    assert tsdist.is_main()
    if "WORLD_SIZE" not in os.environ:  # not under torchrun: nothing to join
        assert not tsdist.init_from_env()
    t = torch.arange(3.0)
    assert torch.equal(tsdist.all_reduce_sum(t), t)
    assert torch.equal(tsdist.sum_across_ranks(lambda: t, "cpu"), t)
    assert torch.equal(tsdist.weighted_mean([t], weight=5)[0], t)
    assert tsdist.run_on_main(lambda: 7) == 7 and tsdist.gather_objects(1) == [1]
    assert all(torch.equal(a, t) for a in tsdist.shard((t, t))) and tsdist.shard(None) is None
    with pytest.raises(ValueError, match="weights of all ranks sum to zero"):
        tsdist.weighted_mean([t], weight=0)


def test_distributed_operator_needs_an_initialised_process_group():
    problem = OPERATOR_CASES[0].build()
    with pytest.raises(ValueError, match=r"distributed=True needs torch\.distributed initialised"):
        ts.HessianOperator(problem.model, problem.loss_fn, (problem.inputs, problem.targets),
                           distributed=True)
    assert not ts.HessianOperator(problem.model, problem.loss_fn,
                                  (problem.inputs, problem.targets)).distributed


def test_fingerprints_tell_a_sign_flip_and_a_permutation_apart():
    v = _randn(50, seed=3)
    values = {tsdist.fingerprint(w)[0] for w in (v, -v, v.flip(0), v.clone())}
    assert len(values) == 3


# --------------------------------------------------------------------------------- on GPUs
def _gpu_worker(rank: int, world: int, folder: Path) -> dict:
    part = slice(BOUNDS[rank], BOUNDS[rank + 1]) if world == 2 else slice(None)
    op = _operator(OPERATOR_CASES[0], part, device="cuda", distributed=True)
    out = {key: value.cpu() if isinstance(value, torch.Tensor) else value
           for key, value in _measure(op).items()}

    def fails_on_last_rank() -> torch.Tensor:
        if rank == world - 1:
            raise KeyError("no such thing")
        return torch.ones(2, device="cuda")

    out["key_error"] = _caught(lambda: tsdist.sum_across_ranks(fails_on_last_rank, "cuda"))
    return out


@pytest.mark.gpu
@pytest.mark.distributed
@needs_cuda
@pytest.mark.parametrize(("backend", "world"), [("nccl", 1), ("gloo", 2), ("nccl", 2)])
def test_ranks_on_gpus_equal_one_gpu(tmp_path, backend, world):
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip("NCCL needs one GPU per rank")
    results = launch(_gpu_worker, tmp_path, world=world, backend=backend, timeout_s=60)
    case = OPERATOR_CASES[0]
    single = _measure(_operator(case, slice(None), device="cuda", distributed=False))
    for r, result in enumerate(results):
        got = result["ok"]
        for key in ("HV", "Hv", "g", "values"):
            assert relative_error(got[key], single[key].cpu()) < 1e-12, key
        assert got["N"] == 23 and got["matvecs"] == single["matvecs"]
        assert got["key_error"][0] == ("KeyError" if r == world - 1 else "DistributedError")
    for key in ("HV", "g", "values", "vectors"):
        assert all(torch.equal(result["ok"][key], results[0]["ok"][key]) for result in results)


@pytest.mark.gpu
@pytest.mark.distributed
@needs_cuda
def test_torchrun_on_gpu_equals_one_gpu(tmp_path):
    settings = {**SETTINGS, "train.device": "cuda"}
    reference = tmp_path / "single"
    assert run_experiment(load_experiment("fig1-fc-digits", settings), reference).state \
        == "finished"
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.device_count() >= 2 else "gloo"  # 1 GPU: shared
    _torchrun(tmp_path / "run", settings, TINYSUBSPACE_DIST_BACKEND=backend)
    _assert_same_run(tmp_path / "run", reference)
