"""The speed-ups of the Animodel protocol that must not change a number: trimesh's even samples drawn
again bit for bit (`dualpm.eval.sampling`), the Delaunay-walk tracker giving the KD-tree's nearest points
(`dualpm.eval.nearest`), ICP with it equal to ICP without, and the volume's voxel grid reused for the
remesh of the rescaled mesh."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from dualpm.eval import sampling
from dualpm.eval.animodel import (
    _chamfer,
    _marching_cubes,
    chamfer_tree,
    column_mean,
    icp_residual,
    icp_until_settled,
    voxelise,
)
from dualpm.eval.nearest import DelaunayGraph, DelaunayTracker


def critter(subdivisions: int = 3) -> trimesh.Trimesh:
    """A closed blob with no symmetry (as tests/test_eval_animodel.py), shifted off the origin."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = sphere.vertices * np.array([1.0, 0.35, 0.3])
    v[:, 1] += 0.35 * np.clip(v[:, 0], 0, None) ** 2
    v[:, 2] += 0.08 * np.exp(-((v[:, 0] + 0.3) ** 2) / 0.05) * (v[:, 2] > 0)
    return trimesh.Trimesh(v + np.array([0.05, 0.4, -0.02]), sphere.faces, process=False)


@pytest.mark.parametrize("count, seed", [(500, 0), (3000, 1), (8000, 2)])
def test_even_samples_are_trimeshs_bit_for_bit(count, seed):
    mesh = critter()
    theirs, _ = trimesh.sample.sample_surface_even(mesh, count, seed=np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    ours = sampling.sample_surface_even(mesh, count, rng)
    np.testing.assert_array_equal(ours, theirs)
    # The same draws were taken from the generator: the streams continue alike.
    again = np.random.default_rng(seed)
    trimesh.sample.sample_surface_even(mesh, count, seed=again)
    assert rng.random() == again.random()
    plain, _ = trimesh.sample.sample_surface(mesh, count, seed=np.random.default_rng(seed))
    np.testing.assert_array_equal(sampling.sample_surface(mesh, count, np.random.default_rng(seed)), plain)


def test_remove_close_is_trimeshs():
    points = np.random.default_rng(3).random((4000, 3))
    for radius in (0.01, 0.03, 0.08):
        _, theirs = trimesh.points.remove_close(points, radius)
        np.testing.assert_array_equal(sampling.remove_close(points, radius), theirs)


def test_delaunay_tracker_gives_the_kdtree_nearest_points_while_they_move():
    rng = np.random.default_rng(5)
    target = critter(2).sample(700, seed=3)
    tree = cKDTree(target)
    graph = DelaunayGraph.of(target)
    assert graph is not None and graph.indptr[-1] == len(graph.indices)
    points = target[:300] + rng.normal(scale=0.05, size=(300, 3))
    points[:40] += [0.6, 0.3, 0.0]  # some far from the surface
    nearest = DelaunayTracker(tree, graph)
    for speed, steps in ((0.01, 60), (0.001, 60)):  # slides (many points change neighbour), then creeps
        for step in range(steps):
            turn = Rotation.from_euler("y", speed * step).as_matrix()
            moved = points @ turn.T + [0.4 * speed * step, 0.0, -0.2 * speed * step]
            if step == 30:
                moved = moved + 0.5  # a jump: the points are queried in the tree (and again on the way back)
            np.testing.assert_array_equal(nearest(moved), tree.query(moved)[1])
        if speed == 0.01:
            assert nearest.walked > 0 and nearest.queried == 3 * len(points)  # first call, jump, jump back
            walked = nearest.walked
    # Small moves: most points are settled by their slack and neither walk nor query.
    assert nearest.walked - walked < 0.2 * 60 * len(points)


def test_delaunay_graph_refuses_points_that_are_not_vertices():
    points = np.random.default_rng(0).random((50, 3))
    assert DelaunayGraph.of(np.vstack([points, points[:1]])) is None  # a duplicate
    assert DelaunayGraph.of(points[:4]) is None


def test_icp_walking_the_delaunay_graph_equals_icp_with_the_kdtree():
    rng = np.random.default_rng(1)
    target = critter(3).sample(2000, seed=2)
    # A poor start far from the target: ICP slides for many iterations.
    source = critter(2).sample(1500, seed=4) * [1.3, 0.8, 1.1] + [0.3, 0.2, -0.1]
    source = source + rng.normal(scale=0.01, size=source.shape)
    plain, plain_done, plain_residual = icp_residual(source, target, 120)  # the KD-tree tracker
    graph = DelaunayGraph.of(target)
    walked, walked_done, walked_residual = icp_residual(source, target, 120, graph=graph)
    assert plain_done == walked_done > 20 and walked_residual == plain_residual
    np.testing.assert_array_equal(walked, plain)
    # From a close start (ICP settles in a few iterations) too.
    near = target[::2] @ Rotation.from_euler("y", 0.05).as_matrix().T + 0.01
    settled, done = icp_until_settled(near, target, 120, graph=graph)
    np.testing.assert_array_equal(settled, icp_until_settled(near, target, 120)[0])
    assert done < 60


def test_chamfer_stops_early_only_when_it_cannot_win():
    rng = np.random.default_rng(6)
    recon = critter(3).sample(9000, seed=1)  # more points than a chunk: the early stop can act
    target = critter(3).sample(10000, seed=2) * [1.05, 0.95, 1.0]
    recon_tree, target_tree = chamfer_tree(recon), chamfer_tree(target)
    for turn in (0.0, 0.4, np.pi):
        matrix = np.eye(4)
        matrix[:3, :3] = Rotation.from_euler("y", turn).as_matrix()
        matrix[:3, 3] = rng.normal(scale=0.05, size=3)
        exact = _chamfer(recon, recon_tree, matrix, target, target_tree)
        moved = recon @ matrix[:3, :3].T + matrix[:3, 3]
        to_target, to_recon = cKDTree(target).query(moved)[0].mean(), cKDTree(moved).query(target)[0].mean()
        assert (exact.pred_to_target, exact.target_to_pred) == (float(to_target), float(to_recon))
        # Below `beat`: the same numbers, bit for bit; at or above it: None.
        assert _chamfer(recon, recon_tree, matrix, target, target_tree, np.nextafter(exact.symmetric, 1)) == exact
        assert _chamfer(recon, recon_tree, matrix, target, target_tree, exact.symmetric) is None
        assert _chamfer(recon, recon_tree, matrix, target, target_tree, 0.5 * exact.symmetric) is None


@pytest.mark.parametrize("scale", [0.77, 1.0 / 1.3, 1.442, 2.5])
def test_rescaled_mesh_voxelises_to_the_same_grid(scale):
    # Step 3 reuses the volume's filled grid for the rescaled mesh: the pitch scales with the mesh.
    mesh = critter()
    grid, pitch, low = voxelise(mesh, 40)
    scaled = trimesh.Trimesh(mesh.vertices * scale, mesh.faces, process=False)
    scaled_grid, scaled_pitch, scaled_low = voxelise(scaled, 40)
    assert scaled_pitch == pytest.approx(pitch * scale, rel=1e-12)
    np.testing.assert_array_equal(scaled_grid, grid)
    np.testing.assert_array_equal(scaled_low, low)


def test_marching_cubes_is_trimeshs():
    mesh = critter()
    grid, _, _ = voxelise(mesh, 30)
    rough = np.random.default_rng(2).random((14, 11, 9)) < 0.5  # many small pieces
    for matrix in (grid, rough):
        theirs = trimesh.voxel.ops.matrix_to_marching_cubes(matrix)
        ours = _marching_cubes(matrix)
        np.testing.assert_array_equal(ours.vertices, theirs.vertices)
        np.testing.assert_array_equal(ours.faces, theirs.faces)


def test_icp_arithmetic_is_numpys_bit_for_bit():
    # ICP's fit takes the mean of its matches with `column_mean` and its residual with the sum of squares
    # in the order `np.sum(axis=1)` adds them: a baseline's ICP slides for 200 iterations and would amplify
    # any rounding change, so both must be numpy's to the last bit.
    rng = np.random.default_rng(7)
    for n in (1, 2, 7, 8, 9, 127, 128, 129, 1000, 8000, 60001):
        points = rng.normal(size=(n, 3)) * 10.0 ** rng.uniform(-3, 3, size=3) + rng.normal(size=3) * 100
        np.testing.assert_array_equal(column_mean(points), points.mean(axis=0))
        squared = points * points
        np.testing.assert_array_equal((squared[:, 0] + squared[:, 1]) + squared[:, 2], np.sum(points**2, axis=1))
