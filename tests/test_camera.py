"""dualpm.camera against hand-derived cameras: files, the Z-up -> Y-up view, projection, rays, depth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualpm.camera import (
    SENSOR_HEIGHT_MM,
    camera_pose_from_view,
    focal_from_projection,
    format_camera_txt,
    look_at,
    pixel_rays,
    project_points,
    projection_from_focal,
    read_camera_txt,
    subtract_depth,
    view_from_camera_pose,
)
from dualpm.errors import DatasetError

F64 = torch.float64


def blender_camera(distance: float) -> np.ndarray:
    """A Blender camera (Z-up world) at (0, -d, 0) looking at the origin, +Z up in the image.

    A Blender camera looks down its local -Z with local +Y up; a 90 degree turn about X sends local -Z
    to world +Y (towards the origin) and local +Y to world +Z.
    """
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
    pose[:3, 3] = [0, -distance, 0]
    return pose


def test_blender_camera_becomes_an_axis_aligned_view():
    # In the Y-up world the camera sits at (0, 0, d) looking down -Z: the view is a pure translation by -d.
    view = view_from_camera_pose(torch.from_numpy(blender_camera(5.0)))
    want = torch.eye(4, dtype=F64)
    want[2, 3] = -5.0
    assert torch.allclose(view, want, atol=1e-15)
    assert torch.allclose(camera_pose_from_view(view), torch.from_numpy(blender_camera(5.0)), atol=1e-15)
    # The same camera by look_at in the Y-up world.
    eye, target = torch.tensor([0.0, 0.0, 5.0], dtype=F64), torch.zeros(3, dtype=F64)
    assert torch.allclose(look_at(eye, target), want, atol=1e-15)


def test_look_at_maps_the_target_onto_the_optical_axis():
    eye = torch.tensor([[3.0, 2.0, -4.0], [0.5, -1.0, 2.0]], dtype=F64)
    target = torch.tensor([[0.0, 0.5, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    view = look_at(eye, target)
    in_camera = (view[:, :3, :3] @ target[:, :, None])[..., 0] + view[:, :3, 3]
    distance = (eye - target).norm(dim=-1)
    assert torch.allclose(in_camera, torch.stack([0 * distance, 0 * distance, -distance], dim=-1), atol=1e-12)
    assert torch.allclose(view[:, :3, :3] @ view[:, :3, :3].transpose(1, 2), torch.eye(3, dtype=F64).expand(2, 3, 3))
    # World +Y stays "up" in the image: its camera-space y is positive.
    assert (view[:, 1, 1] > 0).all()


def test_camera_file_round_trip_and_refusals(tmp_path):
    pose = blender_camera(2.5)
    pose[:3, 3] += [0.1, 1 / 3, -1e-7]  # repr precision survives
    path = tmp_path / "c.txt"
    path.write_text(format_camera_txt(pose))
    assert np.array_equal(read_camera_txt(path), pose)
    cases = {
        "3 lines": "1 0 0 0\n0 1 0 0\n0 0 1 0\n",
        "nan": "1 0 0 0\n0 1 0 0\n0 0 nan 0\n0 0 0 1\n",
        "last row": "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n",
        "singular": "1 0 0 0\n0 1 0 0\n0 0 0 0\n0 0 0 1\n",
        "words": "a b c d\n",
    }
    for name, text in cases.items():
        bad = tmp_path / f"{name}.txt"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=str(bad).replace(".", r"\.")):
            read_camera_txt(bad)


def test_projection_from_focal_by_hand():
    # 18 mm on a 36 mm sensor: cot(fov/2) = 1, a 90 degree vertical field of view.
    p = projection_from_focal(18.0, aspect=2.0, near=1.0, far=3.0)
    assert p[0, 0] == 0.5 and p[1, 1] == -1.0 and p[3, 2] == -1.0
    # Depth maps near -> -1 and far -> +1 in NDC.
    for z, ndc in [(-1.0, -1.0), (-3.0, 1.0)]:
        clip = p @ torch.tensor([0.0, 0.0, z, 1.0])
        assert math.isclose(float(clip[2] / clip[3]), ndc, abs_tol=1e-6)
    assert math.isclose(float(focal_from_projection(projection_from_focal(torch.tensor(50.0)))), 50.0, rel_tol=1e-6)
    assert SENSOR_HEIGHT_MM == 36.0


def test_project_points_puts_row_zero_at_the_top():
    p = projection_from_focal(torch.tensor(18.0, dtype=F64))  # 90 degrees: x/-z = 1 reaches the edge
    points = torch.tensor([[0.0, 0.0, -2.0], [1.0, 0.0, -2.0], [0.0, 1.0, -2.0], [0.0, 2.0, -2.0]], dtype=F64)
    pixels, w = project_points(points, p, height=10, width=20)
    # Centre, halfway right, halfway up (row 2.5: above the centre row 5), and the top edge (row 0).
    want = torch.tensor([[10.0, 5.0], [15.0, 5.0], [10.0, 2.5], [10.0, 0.0]], dtype=F64)
    assert torch.allclose(pixels, want, atol=1e-12)
    assert torch.allclose(w, torch.full((4,), 2.0, dtype=F64))


def test_pixel_rays_pass_through_pixel_centres_between_the_planes():
    p = projection_from_focal(torch.tensor(18.0, dtype=F64), near=0.5, far=4.0)
    origins, directions, lengths = pixel_rays(p, 4, 6)
    assert origins.shape == (4, 6, 3) and directions.shape == (4, 6, 3) and lengths.shape == (4, 6)
    assert torch.allclose(origins[..., 2], torch.full((4, 6), -0.5, dtype=F64), atol=1e-12)  # on the near plane
    ends = origins + directions * lengths[..., None]
    assert torch.allclose(ends[..., 2], torch.full((4, 6), -4.0, dtype=F64), atol=1e-9)  # on the far plane
    # Pixel (row 0, col 0) centre is NDC (-1 + 1/6, -1 + 1/4) -> up-left: x < 0, y > 0 in camera space.
    ray = directions[0, 0]
    assert torch.allclose(ray[:2] / -ray[2], torch.tensor([-5 / 6, 3 / 4], dtype=F64), atol=1e-12)
    # Projecting a point on each ray lands on that pixel's centre.
    pixels, _ = project_points(origins.reshape(-1, 3) + 1.3 * directions.reshape(-1, 3), p, 4, 6)
    rows, cols = torch.meshgrid(torch.arange(4, dtype=F64), torch.arange(6, dtype=F64), indexing="ij")
    assert torch.allclose(pixels, torch.stack([cols.reshape(-1) + 0.5, rows.reshape(-1) + 0.5], -1), atol=1e-9)
    # A subset of pixels by flat index gives the same rays.
    o, d, n = pixel_rays(p, 4, 6, pixels=torch.tensor([0, 23]))
    assert torch.equal(o, origins.reshape(-1, 3)[[0, 23]]) and torch.equal(d, directions.reshape(-1, 3)[[0, 23]])


def test_pixel_rays_take_numpy_and_batches_alike():
    # The CPU renderer calls pixel_rays with numpy arrays: the same numbers as torch, batched or not.
    p = projection_from_focal(torch.tensor([18.0, 35.0], dtype=F64), near=0.3, far=7.0)  # (2, 4, 4)
    subset = np.array([0, 5, 17, 23])
    for pixels in (None, subset):
        batched = pixel_rays(p, 4, 6, None if pixels is None else torch.from_numpy(pixels))
        for b in range(2):
            with_numpy = pixel_rays(p[b].numpy(), 4, 6, pixels)
            assert all(isinstance(x, np.ndarray) for x in with_numpy)
            for got, want in zip(with_numpy, batched, strict=True):
                assert got.shape == want[b].shape
                np.testing.assert_allclose(got, want[b].numpy(), rtol=0, atol=1e-12)


def test_subtract_depth_removes_the_camera_distance():
    view = torch.eye(4, dtype=F64).repeat(2, 1, 1)
    view[:, 2, 3] = torch.tensor([-5.0, -2.0], dtype=F64)
    points = torch.tensor([[[0.0, 1.0, -5.5]], [[2.0, 0.0, -1.0]]], dtype=F64)  # (B=2, N=1, 3)
    out = subtract_depth(points, view)
    assert torch.equal(out, torch.tensor([[[0.0, 1.0, -0.5]], [[2.0, 0.0, 1.0]]], dtype=F64))
    grid = subtract_depth(torch.zeros(2, 3, 4, 3, dtype=F64), view)  # (B, H, W, 3)
    assert torch.equal(grid[0, ..., 2], torch.full((3, 4), 5.0, dtype=F64))
