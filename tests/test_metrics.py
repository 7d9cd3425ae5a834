"""The paper's measurements (eq. 2, 3, 5, 12) on vectors worked out by hand, invariants, and
the validation errors."""

from __future__ import annotations

import math

import pytest
import torch

import tinysubspace as ts
from tinysubspace.metrics import default_basis_atol, orthonormality_error

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
S2 = math.sqrt(2.0)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def e(i: int, p: int = 4) -> torch.Tensor:
    return torch.eye(p, dtype=F64)[:, i]


def cols(*vectors: torch.Tensor) -> torch.Tensor:
    return torch.stack(vectors, dim=1)


def random_orthonormal(p: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=F64))[0]


# ------------------------------------------------------------------ eq. 2: f_top
@pytest.mark.parametrize(("V", "expected"), [
    (cols(e(0)), 9 / 25),  # |3|² / |(3, 4, 0, 0)|²
    (cols(e(1)), 16 / 25),
    (cols(e(0), e(1)), 1.0),  # the gradient lies in the subspace
    (cols(e(2), e(3)), 0.0),  # orthogonal to it
    (cols((e(0) + e(1)) / S2), 49 / 50),  # ((3 + 4)/√2)² / 25
    (cols((e(0) - e(1)) / S2, e(2)), 1 / 50),  # ((3 − 4)/√2)² / 25
])
def test_top_fraction_by_hand(V, expected):
    g = t(3.0, 4.0, 0.0, 0.0)
    assert ts.top_fraction(g, V) == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_top_fraction_is_scale_invariant_and_basis_invariant():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(20, generator=gen, dtype=F64)
    V = random_orthonormal(20, 5, seed=1)
    rotation = random_orthonormal(5, 5, seed=2)
    f = ts.top_fraction(g, V)
    assert 0.0 < f < 1.0
    assert ts.top_fraction(-7.5 * g, V) == pytest.approx(f, rel=1e-13)
    assert ts.top_fraction(g, V @ rotation) == pytest.approx(f, rel=1e-13)  # same subspace


def test_project_and_top_fraction_against_least_squares():
    """The reference knows nothing of ``V``'s orthonormality: the projection of ``g`` onto
    ``span(A)`` for a non-orthonormal ``A`` is ``A x`` with ``x = argmin ‖A x − g‖``
    (``torch.linalg.lstsq``); ``V`` is an orthonormal basis of the same span."""
    gen = torch.Generator().manual_seed(10)
    A = torch.randn(20, 5, generator=gen, dtype=F64) @ torch.triu(torch.ones(5, 5, dtype=F64))
    g = torch.randn(20, generator=gen, dtype=F64)
    V = torch.linalg.qr(A)[0]
    reference = A @ torch.linalg.lstsq(A, g[:, None]).solution[:, 0]
    assert torch.allclose(ts.project(g, V), reference, rtol=0, atol=1e-12)
    assert ts.top_fraction(g, V) == pytest.approx(
        float(reference.square().sum() / g.square().sum()), rel=1e-12)
    residual = g - reference  # orthogonal to the subspace: f_top 0
    assert ts.top_fraction(residual, V) == pytest.approx(0.0, abs=1e-24)


def test_project():
    g = t(3.0, 4.0, 1.0, 0.0)
    assert torch.allclose(ts.project(g, cols(e(0), e(2))), t(3.0, 0.0, 1.0, 0.0))
    V = cols((e(0) + e(1)) / S2)
    assert torch.allclose(ts.project(g, V), t(3.5, 3.5, 0.0, 0.0))


# ------------------------------------------------------------------ eq. 12: c_i^2
def test_eigenvector_overlaps_by_hand():
    g = t(3.0, 4.0, 0.0, 0.0)
    c2 = ts.eigenvector_overlaps(g, cols(e(0), e(1), e(2)))
    assert torch.allclose(c2, t(9 / 25, 16 / 25, 0.0), rtol=0, atol=1e-15)
    c2 = ts.eigenvector_overlaps(g, cols((e(0) + e(1)) / S2, (e(0) - e(1)) / S2))
    assert torch.allclose(c2, t(49 / 50, 1 / 50), rtol=0, atol=1e-15)


def test_eigenvector_overlaps_sum_to_top_fraction():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(30, generator=gen, dtype=F64)
    V = random_orthonormal(30, 7, seed=4)
    c2 = ts.eigenvector_overlaps(g, V)
    assert c2.shape == (7,) and torch.all(c2 >= 0)
    assert float(c2.sum()) == pytest.approx(ts.top_fraction(g, V), rel=1e-13)
    full = ts.eigenvector_overlaps(g, random_orthonormal(30, 30, seed=5))
    assert float(full.sum()) == pytest.approx(1.0, rel=1e-13)  # Σ over all p directions is 1


# ------------------------------------------------------------------ eq. 3: overlap(g, Hg)
def test_gradient_overlap_by_hand():
    H = torch.diag(t(2.0, 1.0))
    g = t(1.0, 1.0)
    # gᵀHg = 3, |g| = √2, |Hg| = |(2, 1)| = √5
    assert ts.gradient_overlap(g, H @ g) == pytest.approx(3 / math.sqrt(10), rel=1e-14)
    assert ts.gradient_overlap(t(0.0, 5.0), H @ t(0.0, 5.0)) == pytest.approx(1.0)  # eigenvector
    assert ts.gradient_overlap(g, -(H @ g)) == pytest.approx(-3 / math.sqrt(10))  # negative
    g2, H2 = t(3.0, 1.0), torch.diag(t(1.0, -1.0))  # indefinite: gᵀHg = 9 − 1, |g| = |Hg| = √10
    assert ts.gradient_overlap(g2, H2 @ g2) == pytest.approx(8 / 10, rel=1e-14)


def test_gradient_overlap_eq4_for_a_vertex_of_the_cube():
    """Eq. 4: for w = Σ ±v_i in the top subspace, overlap = Σλ / √(k Σλ²)."""
    lam = t(5.0, 4.0, 3.0, 2.0, 1.0)
    V = random_orthonormal(12, 5, seed=6)
    H = (V * lam) @ V.T
    w = V @ t(1.0, -1.0, -1.0, 1.0, 1.0)
    expected = float(lam.sum() / torch.sqrt(5 * lam.square().sum()))
    assert ts.gradient_overlap(w, H @ w) == pytest.approx(expected, rel=1e-13)


# ------------------------------------------------------------------ eq. 5: subspace overlap
@pytest.mark.parametrize(("V1", "V2", "expected"), [
    (cols(e(0), e(1)), cols(e(1), e(0)), 1.0),  # the same subspace
    (cols(e(0), e(1)), cols(e(2), e(3)), 0.0),  # orthogonal
    (cols(e(0)), cols((e(0) + e(1)) / S2), 0.5),  # cos² 45°
    (cols(e(0)), cols(e(0), e(1)), 1 / S2),  # Tr(P1P2) = 1, √(1·2): the k1 ≠ k2 maximum
    (cols(e(0), e(1)), cols(e(0), e(2), (e(1) + e(3)) / S2), 1.5 / math.sqrt(6)),
    (cols(e(0), e(1)), cols(e(0), (e(1) + e(2)) / S2), 0.75),  # (1 + 1/2) / 2
])
def test_subspace_overlap_by_hand(V1, V2, expected):
    assert ts.subspace_overlap(V1, V2) == pytest.approx(expected, rel=1e-14, abs=1e-15)
    assert ts.subspace_overlap(V2, V1) == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_subspace_overlap_equals_the_three_forms_of_eq5():
    V1, V2 = random_orthonormal(15, 4, seed=7), random_orthonormal(15, 4, seed=8)
    P1, P2 = V1 @ V1.T, V2 @ V2.T
    trace_form = float(torch.trace(P1 @ P2) / torch.sqrt(torch.trace(P1) * torch.trace(P2)))
    sum_form = float(sum((P1 @ V2[:, i]).square().sum() for i in range(4)) / 4)
    value = ts.subspace_overlap(V1, V2)
    assert value == pytest.approx(trace_form, rel=1e-12)
    assert value == pytest.approx(sum_form, rel=1e-12)
    assert ts.subspace_overlap(V1, V1 @ random_orthonormal(4, 4, seed=9)) == pytest.approx(1.0)


# ------------------------------------------------------------------ validation errors
def test_non_orthonormal_basis_is_named():
    g = t(1.0, 2.0, 3.0, 4.0)
    skewed = cols(e(0), (e(0) + e(1)) / S2)
    with pytest.raises(ValueError, match=r"the columns of V must be orthonormal .*max \|VᵀV − I\|"):
        ts.top_fraction(g, skewed)
    with pytest.raises(ValueError, match="the columns of V must be orthonormal"):
        ts.eigenvector_overlaps(g, 2 * cols(e(0)))
    with pytest.raises(ValueError, match="the columns of V2 must be orthonormal"):
        ts.subspace_overlap(cols(e(0)), skewed)
    with pytest.raises(ValueError, match="the columns of V1 must be orthonormal"):
        ts.subspace_overlap(skewed, cols(e(0)))
    assert ts.top_fraction(g, 1.01 * cols(e(0)), atol=0.05) > 0  # a looser atol accepts it


def test_long_float32_bases_are_checked_in_float64():
    """A float32 basis of long columns (a 1.2M-parameter ConvNet's eigenvectors) is orthonormal
    to rounding, but its Gram matrix accumulated in float32 is off by up to 1e-2: the check must not
    refuse it (issue 14: the tracker failed at step 0 on blocks-convnet-fashion)."""
    p = 2_000_000
    V64 = torch.ones(p, 2, dtype=F64) / math.sqrt(p)
    V64[1::2, 1] *= -1
    V = V64.float()
    # accumulated in float32 the Gram matrix is off by 5e-5 to 1e-2, depending on the BLAS
    # build's summation order (measured on two machines); in float64 by less than 1e-9
    assert float((V.T @ V - torch.eye(2)).abs().max()) > 1e-6
    assert orthonormality_error(V) < 1e-9
    g = torch.linspace(-1, 2, p, dtype=F64)
    assert ts.top_fraction(g.float(), V) == pytest.approx(ts.top_fraction(g, V64), rel=1e-2)
    assert ts.subspace_overlap(V, V64) == pytest.approx(1.0, rel=1e-6)  # computed in float64


def test_default_tolerance_grows_with_the_length_of_float32_columns():
    """float32 eigenvectors of p = 1.2M parameters are orthonormal to ~1e-4 (rounding in their
    orthogonalisation); the default check accepts 5e-4 there and still refuses 5e-3."""
    p = 1_200_000
    V64 = torch.zeros(p, 2, dtype=F64)
    V64[0, 0] = V64[1, 1] = 1.0
    for skew, accepted in ((5e-4, True), (5e-3, False)):
        V = V64.clone()
        V[0, 1] = skew  # <v1, v2> = skew
        V = V.float()
        assert default_basis_atol(V) == pytest.approx(10 * math.sqrt(p) * 2.0**-23)
        if accepted:
            assert ts.subspace_overlap(V, V) == pytest.approx(1.0, abs=1e-3)
        else:
            with pytest.raises(ValueError, match="the columns of V1 must be orthonormal"):
                ts.subspace_overlap(V, V)
    assert default_basis_atol(V64[:10]) == 1e-6  # short float64 columns: unchanged


def test_zero_vectors():
    with pytest.raises(ValueError, match="g is the zero vector"):
        ts.top_fraction(torch.zeros(4, dtype=F64), cols(e(0)))
    with pytest.raises(ValueError, match="g is the zero vector"):
        ts.eigenvector_overlaps(torch.zeros(4, dtype=F64), cols(e(0)))
    with pytest.raises(ValueError, match="g is the zero vector"):
        ts.gradient_overlap(torch.zeros(2, dtype=F64), t(1.0, 0.0))
    with pytest.raises(ValueError, match="Hg is the zero vector"):
        ts.gradient_overlap(t(1.0, 0.0), torch.zeros(2, dtype=F64))


def test_shape_mismatches():
    with pytest.raises(ValueError, match=r"g has length 3 but the basis has 4 rows"):
        ts.top_fraction(t(1.0, 2.0, 3.0), cols(e(0)))
    with pytest.raises(ValueError, match=r"g has length 5 but the basis has 4 rows"):
        ts.eigenvector_overlaps(torch.ones(5, dtype=F64), cols(e(0)))
    with pytest.raises(ValueError, match=r"Hg has length 3 but g has length 2"):
        ts.gradient_overlap(t(1.0, 2.0), t(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"g must be a 1-D vector, got shape \(4, 1\)"):
        ts.top_fraction(torch.ones(4, 1, dtype=F64), cols(e(0)))
    with pytest.raises(ValueError, match=r"V must be a \(p, k\) matrix .* got shape \(4,\)"):
        ts.top_fraction(torch.ones(4, dtype=F64), e(0))
    with pytest.raises(ValueError, match="V has no columns"):
        ts.top_fraction(torch.ones(4, dtype=F64), torch.zeros(4, 0, dtype=F64))
    with pytest.raises(ValueError, match="different dimension: 4 and 3 rows"):
        ts.subspace_overlap(cols(e(0)), cols(e(0, p=3)))


def test_non_finite_inputs():
    with pytest.raises(ValueError, match="g has non-finite entries"):
        ts.top_fraction(t(1.0, float("nan"), 0.0, 0.0), cols(e(0)))
    with pytest.raises(ValueError, match="Hg has non-finite entries"):
        ts.gradient_overlap(t(1.0, 0.0), t(float("inf"), 0.0))
    with pytest.raises(ValueError, match="columns of V must be orthonormal"):
        ts.top_fraction(t(1.0, 0.0, 0.0, 0.0), cols(t(float("nan"), 0.0, 0.0, 0.0)))


def test_mixed_dtypes_are_computed_in_the_wider_one():
    """A float32 gradient on a float64 basis (and the other way round) is computed in float64:
    the same number as with the float32 input cast by hand, no raw torch error."""
    g32 = torch.tensor([3.0, 4.0, 0.0, 0.0])
    V64 = cols((e(0) + e(1)) / S2, e(2))
    assert ts.top_fraction(g32, V64) == ts.top_fraction(g32.double(), V64) == pytest.approx(
        49 / 50, rel=1e-15)
    assert torch.equal(ts.eigenvector_overlaps(g32, V64),
                       ts.eigenvector_overlaps(g32.double(), V64))
    assert ts.project(g32, V64).dtype == F64
    assert ts.top_fraction(g32.double(), V64.float()) == pytest.approx(49 / 50, rel=1e-7)
    H = torch.diag(t(2.0, 1.0))
    assert ts.gradient_overlap(t(1.0, 1.0).float(), H @ t(1.0, 1.0)) == pytest.approx(
        3 / math.sqrt(10), rel=1e-14)
    V1 = random_orthonormal(12, 3, seed=11)
    assert ts.subspace_overlap(V1, V1.float()) == pytest.approx(1.0, abs=1e-6)
    assert ts.top_fraction(torch.tensor([3, 4, 0, 0]), V64) == pytest.approx(49 / 50)  # ints


def test_overlaps_are_clipped_to_their_range():
    """Bases orthonormal only to ``atol`` (as the tracker allows for float32 vectors) can give
    ``Tr(P1 P2) / k > 1``; the measurement is clipped to [0, 1] (a cosine to [−1, 1])."""
    stretched = cols(e(0), e(1)) * (1 + 3e-7)  # ‖v‖ = 1 + 3e-7: within the default atol 1e-6
    raw = float((stretched.T @ stretched).square().sum()) / 2
    assert raw > 1.000001
    assert ts.subspace_overlap(stretched, stretched) == 1.0
    assert ts.top_fraction(t(3.0, 4.0, 0.0, 0.0), stretched) == 1.0
    g = t(1.0, 2.0, 3.0, 4.0)
    assert -1.0 <= ts.gradient_overlap(g, -g * (1 + 1e-16)) <= 1.0


def test_inputs_that_are_not_real_tensors_are_named():
    with pytest.raises(TypeError, match=r"g must be a torch\.Tensor, got list"):
        ts.top_fraction([3.0, 4.0, 0.0, 0.0], cols(e(0)))
    with pytest.raises(TypeError, match=r"V2 must be a torch\.Tensor, got ndarray"):
        ts.subspace_overlap(cols(e(0)), cols(e(0)).numpy())
    with pytest.raises(ValueError, match=r"g must be real, got torch\.complex128"):
        ts.top_fraction(t(3.0, 4.0, 0.0, 0.0).to(torch.complex128), cols(e(0)))
    with pytest.raises(ValueError, match=r"project needs g of shape \(p,\) or \(p, m\)"):
        ts.project(t(1.0, 2.0, 3.0), cols(e(0)))


def test_docstring_examples_run():
    """The module's doctests (also: ``pytest --doctest-modules src/tinysubspace/metrics.py``)."""
    import doctest

    from tinysubspace import metrics

    outcome = doctest.testmod(metrics)
    assert outcome.attempted > 0 and outcome.failed == 0
