"""The Animodel protocol on hand-built meshes with known answers: the floor of a mesh against itself, a
rigid motion undone by ICP, a 1.3x copy undone by the volume rescale, a 180-degree turn undone by the
flip, unit-cube scaling by the target's world box; parity of the voxelisation, hole filling and ICP with
trimesh / scipy (what Animodel runs); point clouds meshed; determinism for a seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh
from scipy import ndimage
from scipy.spatial.transform import Rotation

from scipy.spatial import cKDTree

from dualpm.eval.animodel import (
    AnimodelOptions,
    NearestTracker,
    fill_inside,
    icp_until_settled,
    mesh_from_points,
    sample_even,
    score,
    score_all,
    voxel_volume,
    voxelise,
)
from dualpm.eval.metrics import EvalError
from dualpm.eval.nearest import DelaunayGraph
from dualpm.eval.targets import camera_to_world, to_canonical_pose, turn_about_y

# Fewer points and a coarser voxel pitch than Animodel's where the test allows: seconds, not minutes.
FAST = AnimodelOptions(align_points=1500, chamfer_points=8000, min_cubes=40)


def critter(subdivisions: int = 3) -> trimesh.Trimesh:
    """A closed, animal-sized blob with no symmetry: a stretched sphere with a raised 'head' at +x and a
    bulge at +z, so a 180-degree turn about Y or a mirror image of it is a different shape."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = sphere.vertices * np.array([1.0, 0.35, 0.3])
    v[:, 1] += 0.35 * np.clip(v[:, 0], 0, None) ** 2  # head up at +x
    v[:, 2] += 0.08 * np.exp(-((v[:, 0] + 0.3) ** 2) / 0.05) * (v[:, 2] > 0)  # bulge at +z, rear half
    return trimesh.Trimesh(v + np.array([0.05, 0.4, -0.02]), sphere.faces, process=False)


@pytest.fixture(scope="module")
def blob() -> trimesh.Trimesh:
    return critter()


@pytest.fixture(scope="module")
def floor(blob) -> float:
    """Bidirectional distance of the blob against itself with the FAST settings (sampling + remesh floor)."""
    return score(blob, blob, FAST).chamfer.symmetric


def moved(mesh: trimesh.Trimesh, matrix: np.ndarray) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices @ matrix[:3, :3].T + matrix[:3, 3], mesh.faces, process=False)


def test_voxel_volume_agrees_with_trimesh_voxelisation_and_the_true_volume(blob):
    pitch = blob.extents.min() / FAST.min_cubes
    ours = voxel_volume(blob, FAST.min_cubes)
    theirs = blob.voxelized(pitch).fill().volume  # what Animodel calls
    assert ours == pytest.approx(theirs, rel=2e-3)
    # Filled voxels of the surface's shell: a little more than the exact volume, by about half a voxel layer.
    assert blob.volume < ours < blob.volume + 0.8 * blob.area * pitch
    grid, got_pitch, low = voxelise(blob, FAST.min_cubes)
    assert got_pitch == pitch and grid.dtype == bool
    np.testing.assert_array_equal(low, np.round(blob.vertices.min(axis=0) / pitch))


def test_fill_inside_is_binary_fill_holes():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        grid = rng.random((23, 17, 19)) < density
        np.testing.assert_array_equal(fill_inside(grid), ndimage.binary_fill_holes(grid))
    shell = np.zeros((9, 9, 9), bool)
    shell[2:7, 2:7, 2:7] = True
    shell[3:6, 3:6, 3:6] = False  # a closed box with a 3^3 cavity
    assert fill_inside(shell).sum() == 125


@pytest.mark.parametrize("walk", [False, True])
def test_icp_matches_trimesh_registration_icp(walk):
    # walk: the protocol's own path, matches from the compiled Delaunay walk (`DelaunayTracker`).
    rng = np.random.default_rng(1)
    target = critter(2).sample(600, seed=2)
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", [4, -9, 3], degrees=True).as_matrix()
    motion[:3, 3] = [0.04, -0.02, 0.03]
    source = (target + rng.normal(scale=0.002, size=target.shape)) @ motion[:3, :3].T + motion[:3, 3]
    ours, iterations = icp_until_settled(source, target, 200, graph=DelaunayGraph.of(target) if walk else None)
    theirs, _, _ = trimesh.registration.icp(source, target, threshold=0, max_iterations=200, reflection=False,
                                            translation=True, scale=False)
    assert iterations < 200  # settled early: every later trimesh iteration repeats the same step
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(ours @ motion, np.eye(4), atol=0.01)


def test_nearest_tracker_gives_the_kdtree_nearest_points_while_they_move():
    rng = np.random.default_rng(5)
    target = critter(2).sample(700, seed=3)
    tree = cKDTree(target)
    points = target[:300] + rng.normal(scale=0.05, size=(300, 3))
    points[:40] += [0.6, 0.3, 0.0]  # some far from the surface, where the neighbours crowd
    nearest = NearestTracker(tree, k=16)
    steps = 0
    for step in range(60):
        angle = 0.002 * step
        turn = Rotation.from_euler("y", angle).as_matrix()
        moved = points @ turn.T + [0.001 * step, 0.0, -0.0005 * step]
        if step == 30:
            moved = moved + 0.2  # a jump: every point is queried again
        np.testing.assert_array_equal(nearest(moved), tree.query(moved)[1])
        steps += 1
    # Small moves keep most points' nearest target point among their candidates: far fewer tree queries.
    assert len(points) * 2 <= nearest.queried < 0.5 * steps * len(points)
    # A tree of fewer points than candidates: every point is a candidate, nothing is queried again.
    small = NearestTracker(cKDTree(target[:5]), k=16)
    for shift in (0.0, 0.3, -2.0):
        np.testing.assert_array_equal(small(points + shift), cKDTree(target[:5]).query(points + shift)[1])
    assert small.queried == len(points)


def test_scoring_several_clouds_against_one_target_equals_scoring_each(blob):
    small = dataclasses.replace(FAST, align_points=500, chamfer_points=3000)
    clouds = [blob.sample(1500, seed=7), moved(blob, np.diag([-1.0, 1.0, -1.0, 1.0])), np.zeros((0, 3))]
    together = score_all(clouds, blob, small)
    for cloud, shared in zip(clouds, together, strict=True):
        assert shared.metrics() == pytest.approx(score(cloud, blob, small).metrics(), rel=1e-12, nan_ok=True)


def test_mesh_against_itself_is_the_sampling_floor_at_animodel_settings(blob):
    result = score(blob, blob)  # Animodel's defaults: 8,000 / 60,000 points, pitch = shortest side / 100
    print(f"floor at Animodel's settings: {result.unit.symmetric:.5f} of the longest side")
    assert result.volume_scale == 1.0 and not result.flipped and not result.points_meshed and result.enclosed
    # The floor: even samples of the target against even samples of its remeshed copy (0.0020 of the
    # longest side for this blob; the issue measured 0.0039 with Animodel's code on an animal mesh).
    assert 0.001 < result.unit.symmetric < 0.006, result.unit
    assert result.unit.pred_to_target == pytest.approx(result.chamfer.pred_to_target / blob.extents.max())


def test_unit_cube_scale_is_the_target_meshs_longest_world_side(blob, floor):
    result = score(blob, blob, FAST)
    assert result.unit_scale == 1.0 / blob.extents.max()
    assert result.unit.symmetric == result.chamfer.symmetric * result.unit_scale
    # The box is the target's own, in its own (world) frame: turning the target changes it.
    turned = np.eye(4)
    turned[:3, :3] = Rotation.from_euler("y", 45, degrees=True).as_matrix()
    quick = dataclasses.replace(FAST, rescale=False, flip=False, chamfer_points=500, align_points=100)
    assert score(moved(blob, turned), moved(blob, turned), quick).unit_scale == 1.0 / moved(blob, turned).extents.max()
    assert moved(blob, turned).extents.max() < blob.extents.max()


def test_rigid_motion_is_recovered_by_icp(blob, floor):
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", [5, 15, -4], degrees=True).as_matrix()
    motion[:3, 3] = [0.08, -0.05, 0.1]
    result = score(moved(blob, motion), blob, FAST)
    assert result.chamfer.symmetric < 1.3 * floor, (result.chamfer.symmetric, floor)
    assert not result.flipped
    unaligned = score(moved(blob, motion), blob, dataclasses.replace(FAST, icp_iterations=1))
    assert unaligned.chamfer.symmetric > 2 * floor


def test_scaled_copy_is_recovered_by_the_volume_rescale(blob, floor):
    bigger = trimesh.Trimesh(blob.vertices * 1.3, blob.faces, process=False)
    result = score(bigger, blob, FAST)
    # The pitch follows the mesh's own box, so the grid scales with the copy: the factor is exact.
    assert result.volume_scale == pytest.approx(1 / 1.3, rel=1e-6)
    assert result.chamfer.symmetric < 1.3 * floor
    assert score(bigger, blob, dataclasses.replace(FAST, rescale=False)).chamfer.symmetric > 5 * floor


def test_turned_copy_is_recovered_by_the_flip(blob, floor):
    turned = moved(blob, np.diag([-1.0, 1.0, -1.0, 1.0]))  # 180 degrees about world Y, through the origin
    result = score(turned, blob, FAST)
    assert result.flipped and result.chamfer.symmetric < 1.3 * floor
    unflipped = score(turned, blob, dataclasses.replace(FAST, flip=False))
    assert not unflipped.flipped and unflipped.chamfer.symmetric > 2 * result.chamfer.symmetric


def test_scores_are_deterministic_for_a_seed(blob):
    shifted = moved(blob, np.array([[1, 0, 0, 0.03], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    small = dataclasses.replace(FAST, align_points=500, chamfer_points=3000, flip=False)
    first, again = score(shifted, blob, small).metrics(), score(shifted, blob, small).metrics()
    assert first == again
    other = score(shifted, blob, dataclasses.replace(small, seed=1)).metrics()
    assert other["chamfer_sym"] != first["chamfer_sym"]
    assert other["chamfer_sym"] == pytest.approx(first["chamfer_sym"], rel=0.1)
    rng = np.random.default_rng(3)
    assert len(sample_even(blob, 5000, rng)) == 5000


def test_point_clouds_are_meshed_closed_and_scored_like_meshes(blob, floor):
    points = blob.sample(2500, seed=4)
    surface = mesh_from_points(points)
    assert surface.enclosed and surface.mesh.is_watertight
    # 2,500 random points: the meshed cloud's volume is within 8% of the mesh's (3% in scale; 0.946 seen).
    ratio = voxel_volume(surface.mesh, FAST.min_cubes) / voxel_volume(blob, FAST.min_cubes)
    assert 0.92 < ratio < 1.03, ratio
    result = score(points * 1.3, blob, FAST)
    assert result.points_meshed and result.enclosed
    assert result.volume_scale == pytest.approx(ratio ** (-1 / 3) / 1.3, rel=0.01)
    assert result.chamfer.symmetric < 3 * floor
    # Only one side of the surface: no closing radius encloses anything.
    front = points[points[:, 2] > 0.1]
    assert not mesh_from_points(front).enclosed
    empty = score(np.zeros((0, 3)), blob, FAST)
    assert empty.chamfer.symmetric == np.inf and empty.points_meshed


def test_bad_inputs_are_named():
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    with pytest.raises(EvalError, match="target: the mesh is flat"):
        score(critter(1), flat, FAST)
    with pytest.raises(EvalError, match="lie in a plane"):
        mesh_from_points(np.c_[np.random.default_rng(0).random((50, 2)), np.zeros(50)])
    with pytest.raises(EvalError, match="NaN"):
        score(np.full((10, 3), np.nan), critter(1), FAST)


def test_frames_camera_to_world_and_rest_pose():
    view = np.eye(4)
    view[:3, :3] = Rotation.from_euler("xy", [20, 70], degrees=True).as_matrix()
    view[:3, 3] = [0.1, -0.2, -4.5]
    world = np.random.default_rng(5).normal(size=(40, 3))
    camera = world @ view[:3, :3].T + view[:3, 3]
    camera[:, 2] -= view[2, 3]  # "subtract depth", as the posed maps store it
    np.testing.assert_allclose(camera_to_world(camera, view), world, atol=1e-12)
    rotation = Rotation.from_euler("y", 130, degrees=True).as_matrix()
    np.testing.assert_allclose(to_canonical_pose(world @ rotation.T + 1.0, world), world, atol=1e-9)
    np.testing.assert_allclose(turn_about_y(world, 180), world * [-1, 1, -1], atol=1e-12)
