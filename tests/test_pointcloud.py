"""PLY writing and reading: exact round trips through trimesh, empty clouds, meshes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from dualpm.pointcloud import PlyError, read_ply, write_mesh_ply, write_ply


def cloud(count: int = 257, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(count, 3)).astype(np.float32)
    colors = rng.integers(0, 256, size=(count, 3), dtype=np.uint8)
    return points, colors


def test_round_trip_points_and_colours_exactly(tmp_path):
    points, colors = cloud()
    points[5] = points[6]  # duplicates must survive (no merging)
    path = tmp_path / "sub" / "cloud.ply"
    write_ply(path, points, colors)
    data = path.read_bytes()
    assert data.startswith(b"ply\nformat binary_little_endian 1.0\n")
    assert b"property float x" in data and b"property uchar red" in data
    read_points, read_colors = read_ply(path)
    assert read_points.dtype == np.float32 and read_colors.dtype == np.uint8
    np.testing.assert_array_equal(read_points, points)
    np.testing.assert_array_equal(read_colors, colors)
    assert [p.name for p in path.parent.iterdir()] == ["cloud.ply"]  # atomic: no temporary left


def test_round_trip_without_colours_and_float_inputs(tmp_path):
    points, _ = cloud(seed=1)
    write_ply(tmp_path / "plain.ply", points.astype(np.float64))
    read_points, read_colors = read_ply(tmp_path / "plain.ply")
    assert read_colors is None
    np.testing.assert_array_equal(read_points, points)  # float64 input stored as float32
    float_colors = np.array([[0.0, 0.5, 1.0], [0.2, 0.9, 0.004]])
    write_ply(tmp_path / "float.ply", points[:2], float_colors)
    _, read_colors = read_ply(tmp_path / "float.ply")
    np.testing.assert_array_equal(read_colors, [[0, 128, 255], [51, 230, 1]])  # round(c * 255)


def test_empty_cloud_round_trip(tmp_path):
    write_ply(tmp_path / "empty.ply", np.zeros((0, 3)))
    points, colors = read_ply(tmp_path / "empty.ply")
    assert points.shape == (0, 3) and colors is None
    write_ply(tmp_path / "empty_rgb.ply", np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8))
    points, colors = read_ply(tmp_path / "empty_rgb.ply")
    assert points.shape == (0, 3) and colors.shape == (0, 3)
    loaded = trimesh.load(tmp_path / "empty.ply")  # still a file trimesh itself accepts
    assert len(loaded.geometry) == 0


def test_mesh_round_trip(tmp_path):
    points, colors = cloud(count=4, seed=2)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    write_mesh_ply(tmp_path / "mesh.ply", points, faces, colors)
    mesh = trimesh.load(tmp_path / "mesh.ply", process=False)
    np.testing.assert_array_equal(mesh.vertices, points)
    np.testing.assert_array_equal(mesh.faces, faces)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], colors)
    read_points, read_colors = read_ply(tmp_path / "mesh.ply")  # a mesh's vertices read as a cloud
    np.testing.assert_array_equal(read_points, points)
    np.testing.assert_array_equal(read_colors, colors)
    with pytest.raises(PlyError, match=r"face indices must lie in \[0, 4\)"):
        write_mesh_ply(tmp_path / "bad.ply", points, faces + 2)


def test_bad_inputs_and_files_raise_ply_error(tmp_path):
    points, colors = cloud(count=3)
    with pytest.raises(PlyError, match=r"\(N, 3\)"):
        write_ply(tmp_path / "a.ply", points[:, :2])
    with pytest.raises(PlyError, match=r"\(3, 3\)"):
        write_ply(tmp_path / "a.ply", points, colors[:2])
    with pytest.raises(PlyError, match=r"\[0, 1\]"):
        write_ply(tmp_path / "a.ply", points, colors.astype(np.float64))  # 0..255 floats
    nan_points = points.copy()
    nan_points[0, 0] = np.nan
    with pytest.raises(PlyError, match="NaN"):
        write_ply(tmp_path / "a.ply", nan_points)
    assert not (tmp_path / "a.ply").exists()
    with pytest.raises(PlyError, match="missing.ply"):
        read_ply(tmp_path / "missing.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(PlyError, match="junk.ply"):
        read_ply(tmp_path / "junk.ply")
