"""Subspace geometry: all principal angles and eigenvector displacement, against closed forms.

Known rotations (angles chosen by hand, embedded by a random orthogonal map), scipy's
``subspace_angles`` as an independent implementation, eq. 5 as the mean squared cosine, and
angles of 1e-9 rad that a cosine-only formula cannot resolve.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import tinysubspace as ts
from tinysubspace.metrics import eigenvector_displacement, principal_angles

F64 = torch.float64


def _orthogonal(p: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))[0]


def _rotated_pair(angles: list[float], p: int = 9, seed: int = 0):
    """``V1 = Q[:, e_1..e_k]``, ``V2`` its columns each rotated by ``θ_i`` towards ``e_{k+i}``,
    in random coordinates ``Q``: principal angles exactly ``θ``."""
    k = len(angles)
    E = torch.eye(p, dtype=F64)
    W = torch.stack([math.cos(t) * E[i] + math.sin(t) * E[k + i] for i, t in enumerate(angles)], 1)
    Q = _orthogonal(p, seed)
    return Q @ E[:, :k], Q @ W


def test_angles_of_known_rotations():
    angles = [0.1, 0.7, 1.3]
    V1, V2 = _rotated_pair(angles)
    theta = principal_angles(V1, V2)
    assert torch.allclose(theta, torch.tensor(angles, dtype=F64), atol=1e-14, rtol=0)
    mixed = V2 @ _orthogonal(3, 5)  # another basis of the same subspace: same angles
    assert torch.allclose(principal_angles(V1, mixed), theta, atol=1e-14, rtol=0)
    assert torch.allclose(principal_angles(V2, V1), theta, atol=1e-14, rtol=0)


def test_tiny_angles_keep_their_relative_accuracy():
    """arccos(cos θ) loses θ = 1e-9 entirely in float64; the sine formula keeps it."""
    V1, V2 = _rotated_pair([1e-9, 3e-7])
    theta = principal_angles(V1, V2)
    assert torch.allclose(theta, torch.tensor([1e-9, 3e-7], dtype=F64), rtol=1e-6, atol=0)
    cosine_only = torch.arccos(torch.linalg.svdvals(V1.T @ V2).clamp(max=1))
    assert abs(float(cosine_only[-1]) - 1e-9) > 1e-10  # the naive formula would fail


def test_right_angles_and_identical_subspaces():
    V1, V2 = _rotated_pair([math.pi / 2, math.pi / 2])
    assert torch.allclose(principal_angles(V1, V2), torch.full((2,), math.pi / 2, dtype=F64),
                          atol=1e-14, rtol=0)
    assert float(principal_angles(V1, V1).abs().max()) < 1e-7  # sqrt(eps) floor at θ = 0


def test_against_scipy_with_different_dimensions():
    gen = torch.Generator().manual_seed(2)
    A = torch.linalg.qr(torch.randn(12, 5, generator=gen, dtype=F64))[0]
    B = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=F64))[0]
    expected = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    for first, second in ((A, B), (B, A)):
        theta = principal_angles(first, second)
        assert theta.shape == (3,)
        np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_eq5_overlap_is_the_mean_squared_cosine():
    V1, V2 = _rotated_pair([0.2, 0.5, 0.9, 1.4], p=11, seed=3)
    theta = principal_angles(V1, V2)
    assert abs(ts.subspace_overlap(V1, V2) - float(torch.cos(theta).square().mean())) < 1e-14


def test_bad_bases_are_refused():
    V = torch.eye(4, dtype=F64)[:, :2]
    with pytest.raises(ValueError, match="must be orthonormal"):
        principal_angles(V, 2 * V)
    with pytest.raises(ValueError, match="different dimension: 4 and 5 rows"):
        principal_angles(V, torch.eye(5, dtype=F64)[:, :2])
    with pytest.raises(ValueError, match="has no columns"):
        principal_angles(V, V[:, :0])


# ------------------------------------------------------------------ eigenvector displacement
def test_displacement_of_rotated_eigenvectors_is_two_sin_half_angle():
    angles = [0.0, 0.3, math.pi / 2]
    V1, V2 = _rotated_pair(angles)
    expected = torch.tensor([2 * math.sin(t / 2) for t in angles], dtype=F64)
    assert torch.allclose(eigenvector_displacement(V1, V2), expected, atol=1e-14, rtol=0)
    flipped = V2 * torch.tensor([-1.0, 1.0, -1.0], dtype=F64)  # eigenvectors have no sign
    assert torch.allclose(eigenvector_displacement(V1, flipped), expected, atol=1e-14, rtol=0)
    obtuse = V1.clone()
    obtuse[:, 1] = -V2[:, 1]
    assert abs(float(eigenvector_displacement(V1, obtuse)[1]) - 2 * math.sin(0.15)) < 1e-14


def test_swapped_eigenvectors_show_as_orthogonal():
    V = _orthogonal(5, 1)[:, :2]
    assert torch.allclose(eigenvector_displacement(V, V.flip(1)),
                          torch.full((2,), math.sqrt(2), dtype=F64), atol=1e-14, rtol=0)


def test_displacement_bad_input():
    V = torch.eye(4, dtype=F64)[:, :2]
    with pytest.raises(ValueError, match=r"same shape, got \(4, 2\) and \(4, 3\)"):
        eigenvector_displacement(V, torch.eye(4, dtype=F64)[:, :3])
    with pytest.raises(ValueError, match="columns of V_new must be unit vectors"):
        eigenvector_displacement(V, 2 * V)
