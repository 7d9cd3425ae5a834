"""The tracker in a user's own loop with an FSDP2 model (issue 25), and the metrics called on
sharded results without being told about shards.

A few SGD steps on an FSDP2-wrapped float64 MLP (affine LayerNorm, p = 135) under 2 and 3 gloo
ranks, uneven shards of the training and test data, ``ts.SubspaceTracker`` measuring at some
steps (rank 0 writes): rank 0's ``metrics.csv`` must equal the rows of the same loop and tracker
on an unsharded copy in one process (exact H·V there, central differences on the shards), its
eigenvector files the gathered single-process ones; at the final point the caller's metrics
(``top_fraction(g, eig)``, ``gradient_overlap(g, op)``, ``subspace_overlap(eig_1, eig_2)``)
equal the dense float64 Hessian's. The rank workers are ``fsdp_tracker_workers.py``; the launch
helper is ``distributed_workers.launch`` (the same as ``test_fsdp.py`` uses).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pandas as pd
import pytest
import torch

import fsdp_tracker_workers as fw
import tinysubspace as ts
from distributed_workers import launch
from reference import FlatLoss, reference_gradient, reference_hessian
from tinysubspace.operator import DenseOperator, VectorSpace

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available")

TIMING = {"wall_time", "cost/seconds", "cost/overhead"}  # clocks: not comparable
SOLVE_RESIDUALS = ("hessian/residual_max", "hessian/res_")  # of each solve, each ≤ tol
PRODUCTS = {"cost/matvecs"}  # how many products each solve took: reported, not compared


# ------------------------------------------------------------------ the metrics' inputs
def _diagonal_case() -> tuple[DenseOperator, torch.Tensor]:
    H = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    return DenseOperator(H), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)


def test_metrics_take_eigenpairs_and_the_operator_in_place_of_tensors():
    op, g = _diagonal_case()
    eig = ts.top_eigenpairs(op, 2, tol=1e-12, seed=0)
    top = ts.top_eigenpairs(op, 1, tol=1e-12, seed=1)
    assert eig.space is None  # a local operator: plain tensors, as before
    # by hand: V = (e1, e2) holds all of g; Hg = (3, 2, 0, 0)
    assert ts.top_fraction(g, eig) == ts.top_fraction(g, eig.vectors) == pytest.approx(1.0)
    assert ts.top_fraction(g, top) == pytest.approx(0.5, abs=1e-12)
    assert torch.equal(ts.eigenvector_overlaps(g, eig), ts.eigenvector_overlaps(g, eig.vectors))
    assert ts.gradient_overlap(g, op) == ts.gradient_overlap(g, op @ g)
    assert ts.gradient_overlap(g, op) == pytest.approx(5 / math.sqrt(2 * 13), abs=1e-12)
    assert ts.subspace_overlap(eig, top) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert ts.subspace_overlap(eig, top) == ts.subspace_overlap(eig.vectors, top.vectors)


class _Rescaled(VectorSpace):
    """A space that is not the plain one (stands for a sharded space of another dimension)."""

    sharded = True


def test_metrics_refuse_eigenpairs_of_different_spaces():
    op, g = _diagonal_case()
    eig = ts.top_eigenpairs(op, 2, tol=1e-12, seed=0)
    one, other = (dataclasses.replace(eig, space=_Rescaled(d)) for d in (4, 8))
    with pytest.raises(ValueError, match=r"different vector spaces: _Rescaled of dimension 4 "
                                         r"and _Rescaled of dimension 8"):
        ts.subspace_overlap(one, other)
    with pytest.raises(ValueError, match="g has length 3 but the operator's vectors has length 4"):
        ts.gradient_overlap(g[:3], op)


def test_sharded_option_check_names_every_option_that_is_on():
    from tinysubspace.experiments.tracker_sharded import check_sharded_options, reshard

    check_sharded_options(ggn=False, blocks="none", subset=None, chunk_size=None, resume=False)
    with pytest.raises(ValueError, match=r"not supported there: \['chunk_size', 'ggn'\] \(leave"):
        check_sharded_options(ggn=True, blocks="none", chunk_size=8, resume=False)
    model = fw.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    reshard(model)  # a model without FSDP2 modules: nothing happens
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ------------------------------------------------------------------ the loop under FSDP2
@functools.cache
def _single_process(folder: str) -> dict:
    """The single-process loop's run folder and rows, and the dense float64 references at its
    final point."""
    rows, model = fw.single_process_run(fw.Path(folder))
    X, Y, _, _ = fw.build_data()
    f = FlatLoss(model, fw.loss_fn, X, Y)
    evals, evecs = torch.linalg.eigh(reference_hessian(f))
    values, vectors = evals.flip(0)[: 2 * fw.K], evecs.flip(1)[:, : 2 * fw.K]
    g = reference_gradient(f)
    H = reference_hessian(f)
    return {"run": ts.load_run(folder), "rows": rows, "values": values, "vectors": vectors,
            "g": g, "f_top": float((vectors.T @ g).square().sum() / g.square().sum()),
            "overlap_g_Hg": float(g @ H @ g / (g.norm() * (H @ g).norm())), "p": f.size}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _single_process(str(tmp_path_factory.mktemp("single") / "run"))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def sharded(request, tmp_path_factory) -> dict:
    """Every rank's result and rank 0's run folder, of one launch per world size."""
    folder = tmp_path_factory.mktemp(f"fsdp_tracker{request.param}")
    results = launch(fw.tracker_worker, folder, world=request.param, deadline_s=900)
    errors = [r["error"][2] for r in results if "error" in r]
    assert not errors, errors[0]
    return {"ranks": [r["ok"] for r in results], "run": ts.load_run(folder / "run"),
            "folder": folder}


def column_differences(expected: pd.DataFrame, actual: pd.DataFrame) -> dict[str, float]:
    """The largest relative difference of each column (NaN where both are NaN counts as 0)."""
    out = {}
    for column in expected.columns:
        a, b = expected[column].to_numpy(float), actual[column].to_numpy(float)
        same_nan = pd.isna(a) & pd.isna(b)
        scale = abs(a).clip(min=1e-300)
        out[column] = float(((abs(a - b) / scale)[~same_nan]).max(initial=0.0))
    return out


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_rank_zero_writes_the_single_process_rows(single, sharded):
    expected, actual = single["run"].metrics, sharded["run"].metrics
    assert list(actual.columns) == list(expected.columns)
    assert actual["step"].tolist() == expected["step"].tolist() == [0, 1, 3, fw.STEPS]
    differences = column_differences(expected, actual)
    print({c: f"{d:.1e}" for c, d in differences.items()})  # the report's numbers (pytest -s)
    compared = [c for c in expected.columns if c not in TIMING | PRODUCTS
                and not c.startswith(SOLVE_RESIDUALS)]
    assert len(compared) == 34  # with hessian/f_top_error and hessian/certificate (amortised)
    for column in compared:  # float32 anchor bases: 3e-7; finite differences: 1e-7 at most
        assert differences[column] <= 1e-6, (column, differences[column])
    for column in (c for c in expected.columns if c.startswith(SOLVE_RESIDUALS)):
        assert (actual[column] <= fw.TOL).all() and (expected[column] <= fw.TOL).all()
    assert (actual["hessian/converged"] == 1).all()
    assert actual["cost/matvecs"].gt(0).all()


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_gets_the_row_and_only_rank_zero_writes(single, sharded):
    ranks = sharded["ranks"]
    assert [r["writes"] for r in ranks] == [True] + [False] * (len(ranks) - 1)
    assert sum(r["local_rows"] for r in ranks) == single["p"]  # each rank holds its shard
    assert max(r["local_rows"] for r in ranks) < single["p"]
    for r in ranks[1:]:
        for mine, first in zip(r["rows"], ranks[0]["rows"], strict=True):
            assert mine.keys() == first.keys()
            for c in (c for c in mine if c not in TIMING):  # NaN (e.g. f_top_error) equals NaN
                assert mine[c] == first[c] or (math.isnan(mine[c]) and math.isnan(first[c])), c


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_saved_eigenvectors_are_the_gathered_single_process_ones(single, sharded):
    expected, actual = single["run"], sharded["run"]
    assert actual.eigenvector_steps == expected.eigenvector_steps == [0, 1, 3]
    for step in expected.eigenvector_steps:
        mine, theirs = actual.eigenvectors(step), expected.eigenvectors(step)
        assert mine["param_names"] == theirs["param_names"]
        assert mine["param_shapes"] == theirs["param_shapes"]
        assert torch.allclose(mine["values"], theirs["values"], rtol=1e-6, atol=0)
        cosines = (mine["vectors"].double().T @ theirs["vectors"].double()).diagonal().abs()
        assert torch.allclose(cosines, torch.ones(2 * fw.K, dtype=torch.float64), atol=1e-6)


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_the_metrics_on_sharded_results_need_no_space(single, sharded):
    for r in sharded["ranks"]:
        assert r["eig_space_is_op_space"]
        assert r["f_top"] == r["f_top_space"] and r["overlap_g_Hg"] == r["overlap_space"]
        assert torch.allclose(r["values"], single["values"], rtol=1e-6, atol=0)
        assert r["f_top"] == pytest.approx(single["f_top"], rel=1e-6)
        assert r["overlap_g_Hg"] == pytest.approx(single["overlap_g_Hg"], rel=1e-6)
        assert float(r["c2"].sum()) == pytest.approx(r["f_top"], rel=1e-12)
        assert r["subspace"] == pytest.approx(math.sqrt(fw.K / (2 * fw.K)), rel=1e-8)
        assert torch.allclose(r["gathered_g"], single["g"], rtol=0, atol=1e-12)
        cosines = (r["gathered_vectors"].T @ single["vectors"]).diagonal().abs()
        assert torch.allclose(cosines, torch.ones(2 * fw.K, dtype=torch.float64), atol=1e-6)


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_options_that_cannot_run_sharded_are_refused_by_name(sharded):
    # each rank checked the messages with pytest.raises (fsdp_tracker_workers.refusals)
    for r in sharded["ranks"]:
        assert r["refused"] == [*fw.REFUSED, "batches"]


def dense_spectra_along_the_loop() -> dict[int, torch.Tensor]:
    """The dense float64 Hessian's eigenvalues at each measured step of the user's loop (the
    full-batch SGD steps replayed on an unsharded copy), descending."""
    model = fw.build_model()
    X, Y, _, _ = fw.build_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=fw.LR)
    spectra = {}
    for step in range(fw.STEPS + 1):
        if step in fw.OPTIONS["schedule"]:
            H = reference_hessian(FlatLoss(model, fw.loss_fn, X, Y))
            spectra[step] = torch.linalg.eigvalsh(H).flip(0)
        optimizer.zero_grad()
        fw.loss_fn(model(X), Y).backward()
        optimizer.step()
    return spectra


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
def test_budget_mode_under_fsdp2_gives_ritz_pairs_of_the_dense_hessian(sharded):
    """The tracker's Krylov budget (``solver="budget"``, ``budget_matvecs=2k+1``) with the FSDP2
    model on 2 uneven ranks. The refined pairs are Ritz pairs of an unconverged Krylov space
    whose start ``Σ v_i`` depends on the previous eigenvectors' arbitrary signs (a sharded and a
    single-process solve may flip one), so rows are not compared with a single-process budget
    run; instead, at every measured step against the dense Hessian of that step: the first
    measurement (a full solve) has its eigenvalues to 1e-6; every Ritz value lies below its
    eigenvalue (Cauchy interlacing) and within its residual (``res_i · max|θ|``, the residual
    summed over ranks) of an eigenvalue; each measurement costs ``budget_matvecs`` products
    and one for ``H g``;
    every rank has the same row."""
    if "budget_rows" not in sharded["ranks"][0]:
        pytest.skip("the budget run is launched on 2 ranks only")
    spectra = dense_spectra_along_the_loop()
    actual = ts.load_run(sharded["folder"] / "budget").metrics
    assert actual["step"].tolist() == [0, 1, 3, fw.STEPS]
    n = 2 * fw.K
    for _, row in actual.iterrows():
        exact = spectra[int(row["step"])]
        theta = torch.tensor([row[f"hessian/eig_{i + 1}"] for i in range(n)], dtype=torch.float64)
        res = torch.tensor([row[f"hessian/res_{i + 1}"] for i in range(n)], dtype=torch.float64)
        if row["step"] == 0:
            assert torch.allclose(theta, exact[:n], rtol=1e-6, atol=0)
            continue
        assert row["cost/matvecs"] == fw.BUDGET["budget_matvecs"] + 1  # and one for H g
        assert bool((theta <= exact[:n] + 1e-7).all()), (theta, exact[:n])
        nearest = (theta[:, None] - exact[None, :]).abs().min(dim=1).values
        bound = res * float(theta.abs().max())
        assert bool((nearest <= bound * (1 + 1e-6) + 1e-7).all()), (nearest, bound)
    first = sharded["ranks"][0]["budget_rows"]
    for r in sharded["ranks"][1:]:
        for mine, theirs in zip(r["budget_rows"], first, strict=True):
            for c in (c for c in mine if c not in TIMING):
                assert mine[c] == theirs[c] or (math.isnan(mine[c]) and math.isnan(theirs[c])), c
