"""The curvature operator and the eigensolvers on a CUDA device, against CPU float64 references.

Skipped without CUDA (CI has none); run with ``pytest -m gpu tests/test_gpu.py`` on a GPU
machine. TF32 is switched off inside each test (and restored), so float32 means float32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinysubspace as ts
from tinysubspace.curvature.hvp import HVP_METHODS
from tinysubspace.linalg.warm_start import WARM_STARTS, track_eigenpairs
from tinysubspace.problems.models.networks import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64


@pytest.fixture(autouse=True)
def strict_float32():
    """No TF32 in matrix products and convolutions while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small model with non-trivial batch-norm statistics, and a data set (CPU)."""
    gen = torch.Generator().manual_seed(0)
    if name == "resnet18":
        model = build_model("resnet18", (3, 16, 16), 10, seed=0, width=4)
        X = torch.randn(48, 3, 16, 16, generator=gen)
    elif name == "convnet":
        model = build_model("convnet", (3, 16, 16), 10, seed=0, channels=(4, 8), dense=16,
                            batchnorm=True)
        X = torch.randn(48, 3, 16, 16, generator=gen)
    else:
        model = build_model("fc", (20,), 10, seed=0, widths=(32, 32))
        X = torch.randn(48, 20, generator=gen)
    Y = torch.randint(0, 10, (48,), generator=gen)
    with torch.no_grad():  # running statistics away from their initial (0, 1)
        model.train()
        model(X)
    return model.eval(), X, Y


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("name", ["fc", "convnet", "resnet18"])
@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_on_cuda_matches_cpu_float64(name, method):
    model, X, Y = problem(name)
    loss_fn = nn.functional.cross_entropy
    cpu = ts.HessianOperator(model, loss_fn, (X, Y), dtype=F64, batch_size=16)
    V = torch.randn(cpu.shape[0], 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    reference = cpu @ V
    for dtype, bound in ((torch.float32, 1e-4), (F64, 1e-10)):
        gpu = ts.HessianOperator(model, loss_fn, (X, Y), dtype=dtype, device="cuda",
                                 batch_size=16)
        gpu.hvp_method = method
        block = gpu @ V.to("cuda", dtype)
        single = gpu @ V[:, 0].to("cuda", dtype)
        assert block.device.type == "cuda" and block.dtype == dtype
        assert relative(block, reference) < bound
        assert relative(single, reference[:, 0]) < bound
    loss, g = gpu.loss_and_gradient()
    loss_cpu, g_cpu = cpu.loss_and_gradient()
    assert loss == pytest.approx(loss_cpu, rel=1e-10) and relative(g, g_cpu) < 1e-10


def test_top_eigenpairs_on_cuda_matches_cpu():
    model, X, Y = problem("fc")
    loss_fn = nn.functional.cross_entropy
    cpu = ts.top_eigenpairs(ts.HessianOperator(model, loss_fn, (X, Y), dtype=F64), 10, tol=1e-8)
    gpu_op = ts.HessianOperator(model, loss_fn, (X, Y), dtype=F64, device="cuda")
    gpu = ts.top_eigenpairs(gpu_op, 10, tol=1e-8)
    assert gpu.vectors.device.type == "cuda" and gpu.converged
    assert torch.allclose(gpu.values.cpu(), cpu.values, rtol=0, atol=1e-7 * float(cpu.values[0]))
    assert ts.subspace_overlap(gpu.vectors.cpu(), cpu.vectors) > 0.999
    residuals = (gpu_op @ gpu.vectors - gpu.vectors * gpu.values).norm(dim=0)
    assert float(residuals.max()) <= 1e-8 * float(gpu.values[0]) * 1.01


def test_dense_top_eigenpairs_on_cuda_match_eigh():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=F64))
    values = torch.cat([torch.linspace(10, 2, 8, dtype=F64), torch.rand(292, generator=gen,
                                                                          dtype=F64)])
    A = ((Q * values) @ Q.T).cuda()
    result = ts.top_eigenpairs(ts.DenseOperator(A), 8, tol=1e-10)
    w = torch.linalg.eigvalsh(A.cpu()).flip(0)[:8]
    assert result.values.device.type == "cuda"
    assert torch.allclose(result.values.cpu(), w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("warm", WARM_STARTS)
def test_tracking_on_cuda_along_sgd(warm):
    """Track the top-8 of a float32 model's Hessian on the GPU along a few SGD steps; each
    answer against a cold CPU float64 solve."""
    model, X, Y = problem("fc")
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    previous = None
    for _ in range(3):
        op = ts.HessianOperator(model, loss_fn, (X, Y), dtype=F64, device="cuda")
        previous = track_eigenpairs(op, 8, previous, tol=1e-8, warm=warm)
        cold = ts.top_eigenpairs(ts.HessianOperator(model, loss_fn, (X, Y), dtype=F64), 8,
                                 tol=1e-8)
        assert previous.converged and previous.vectors.device.type == "cuda"
        assert ts.subspace_overlap(previous.vectors.cpu(), cold.vectors) > 0.999
        assert torch.allclose(previous.values.cpu(), cold.values, rtol=0,
                              atol=1e-7 * float(cold.values[0]))
        for _ in range(3):
            index = torch.randint(0, X.shape[0], (16,), generator=gen)
            optimizer.zero_grad()
            loss_fn(model(X[index]), Y[index]).backward()
            optimizer.step()
    f32 = ts.HessianOperator(model, loss_fn, (X, Y), device="cuda")
    tracked = track_eigenpairs(f32, 8, previous, tol=1e-4, warm=warm)
    assert tracked.converged and tracked.vectors.dtype == torch.float32


@pytest.mark.parametrize("name", ["gpt", "encoder", "hf-outputs-loss"])
@pytest.mark.parametrize("method", [m for m in HVP_METHODS if m != "auto"])
def test_hessian_through_attention_on_cuda(name, method):
    """Issue 14 on CUDA: with every fused attention kernel allowed (flash, memory-efficient,
    cuDNN), the operator's products through attention equal the CPU float64 dense reference
    (itself checked by finite differences in test_transformers.py), and the caller's backend
    flags are as they were afterwards."""
    from test_transformers import PROBLEMS, reference
    from tinysubspace.curvature.attention import attention_backends

    built = PROBLEMS[name]()
    _, H = reference(name)
    before = attention_backends()
    op = ts.HessianOperator(built.model, built.loss_fn, built.data, dtype=F64, device="cuda",
                            hvp_method=method)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = (op @ V.cuda()).cpu()
    assert float((got - H @ V).norm() / (H @ V).norm()) < 1e-10
    assert attention_backends() == before
