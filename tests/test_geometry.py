"""dualpm.geometry against hand-derived rotations and scipy's Rotation (an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dualpm.geometry import (
    axis_angle_to_quaternion,
    matrix_to_quaternion,
    quaternion_multiply,
    quaternion_to_matrix,
    rigid_inverse,
    transform_points,
    trs_matrix,
)

S = math.sqrt(0.5)


def wxyz(rotation: Rotation) -> torch.Tensor:
    """scipy's scalar-last quaternions as our real-first float64 tensor."""
    return torch.from_numpy(rotation.as_quat()[..., [3, 0, 1, 2]])


RANDOM = Rotation.random(64, random_state=7)


def test_quarter_turns_by_hand():
    # 90 degrees about +z: x -> y, y -> -x (right hand); about +x: y -> z.
    about_z = quaternion_to_matrix(torch.tensor([S, 0.0, 0.0, S], dtype=torch.float64))
    assert torch.allclose(about_z, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64), atol=1e-15)
    about_x = quaternion_to_matrix(torch.tensor([S, S, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(about_x @ torch.tensor([0.0, 1, 0], dtype=torch.float64),
                          torch.tensor([0.0, 0, 1], dtype=torch.float64), atol=1e-15)
    # Half turn about +y: x -> -x, z -> -z.
    half_y = quaternion_to_matrix(torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(half_y, torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)))


def test_quaternion_to_matrix_matches_scipy_and_normalises():
    q = wxyz(RANDOM)
    assert torch.allclose(quaternion_to_matrix(q), torch.from_numpy(RANDOM.as_matrix()), atol=1e-12)
    # Not unit length: the same rotation (the function normalises).
    assert torch.allclose(quaternion_to_matrix(3.5 * q), torch.from_numpy(RANDOM.as_matrix()), atol=1e-12)


def test_matrix_to_quaternion_matches_scipy_with_nonnegative_w():
    got = matrix_to_quaternion(torch.from_numpy(RANDOM.as_matrix()))
    want = wxyz(RANDOM)
    want = torch.where(want[:, :1] < 0, -want, want)  # q and -q are one rotation; ours has w >= 0
    assert torch.allclose(got, want, atol=1e-12)
    assert (got[:, 0] >= 0).all()
    # The pivot branches: half turns (w = 0) about each axis and a near-half turn.
    for axis in np.eye(3):
        r = Rotation.from_rotvec(math.pi * axis)
        back = quaternion_to_matrix(matrix_to_quaternion(torch.from_numpy(r.as_matrix())))
        assert torch.allclose(back, torch.from_numpy(r.as_matrix()), atol=1e-12)


def test_axis_angle_and_multiply_match_scipy_composition():
    axis = torch.tensor([[1.0, 2.0, -2.0]], dtype=torch.float64)  # not unit: normalised (length 3)
    q = axis_angle_to_quaternion(axis, torch.tensor([0.7], dtype=torch.float64))
    want = Rotation.from_rotvec(0.7 * np.array([[1.0, 2.0, -2.0]]) / 3.0)
    assert torch.allclose(q, wxyz(want), atol=1e-15)
    a, b = RANDOM[:32], RANDOM[32:]
    # Hamilton product a * b = rotation b first, then a; scipy's a * b composes the same way.
    product = quaternion_multiply(wxyz(a), wxyz(b))
    want = wxyz(a * b)
    sign = torch.sign((product * want).sum(-1, keepdim=True))  # q and -q are one rotation
    assert torch.allclose(product, sign * want, atol=1e-12)
    assert torch.allclose(quaternion_to_matrix(product), torch.from_numpy((a * b).as_matrix()), atol=1e-12)


def test_trs_is_translate_after_rotate_after_scale():
    t = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    q = torch.tensor([S, 0.0, 0.0, S], dtype=torch.float64)  # 90 degrees about z
    s = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    m = trs_matrix(t, q, s)
    # The point (1, 1, 1): scaled (2, 3, 4), rotated about z (-3, 2, 4), translated (-2, 0, 7).
    p = transform_points(m, torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(p, torch.tensor([[-2.0, 0.0, 7.0]], dtype=torch.float64), atol=1e-15)
    assert torch.equal(m[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # No scale = unit scale; batched over leading dimensions.
    batch = trs_matrix(t.expand(5, 3), wxyz(RANDOM[:5]))
    assert batch.shape == (5, 4, 4)
    assert torch.allclose(batch[:, :3, :3], torch.from_numpy(RANDOM[:5].as_matrix()), atol=1e-12)


def test_rigid_inverse_matches_numpy_inverse():
    m = trs_matrix(torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                   wxyz(RANDOM[:16]))
    inv = rigid_inverse(m)
    assert np.allclose(inv.numpy(), np.linalg.inv(m.numpy()), atol=1e-12)
    points = torch.randn(16, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(transform_points(inv, transform_points(m, points)), points, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    q = wxyz(RANDOM[:3]).to(dtype)
    assert quaternion_to_matrix(q).dtype == dtype and matrix_to_quaternion(quaternion_to_matrix(q)).dtype == dtype
    assert trs_matrix(torch.zeros(3, 3, dtype=dtype), q).dtype == dtype


def test_checked_points_names_what_is_wrong():
    from dualpm.errors import DatasetError
    from dualpm.geometry import checked_points

    out = checked_points("cloud", [[1, 2, 3]], DatasetError)
    assert out.dtype == np.float64 and out.tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(DatasetError, match=r"cloud: expected points of shape \(N, 3\), got \(3,\)"):
        checked_points("cloud", [1, 2, 3], DatasetError)
    with pytest.raises(DatasetError, match="cloud: 2 points are NaN or infinite"):
        checked_points("cloud", [[np.nan, 0, 0], [0, np.inf, 0], [0, 0, 0]], DatasetError)
