"""The direct Embree binding (dualpm.render.embree_direct) against embreex, analytic rays, and its fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dualpm.render import embree, embree_direct, render_dual_pointmaps
from dualpm.render.embree import EmbreexScene, triangle_scene
from dualpm.camera import projection_from_focal
from pipeline.synth.lighting import occluded

REAL_LIBRARY_PATH = embree_direct.library_path
PROJECTION = projection_from_focal(torch.tensor([36.0]))  # cot(fov / 2) = 2


@pytest.fixture
def library():
    found = embree_direct.load()
    if found is None:
        pytest.skip("the direct Embree binding does not load here (embreex is used instead)")
    return found


@pytest.fixture
def fallback(monkeypatch):
    """The binding as if the embreex wheel shipped no Embree library; restored afterwards."""
    monkeypatch.setattr(embree_direct, "library_path", lambda: None)
    monkeypatch.setattr(embree, "_LAST_SCENE", None)
    embree_direct.load.cache_clear()
    yield
    embree_direct.load.cache_clear()


def random_scene(seed: int, triangles: int = 300):
    """Random triangles in the unit cube (z in [2, 3]), rays from around the origin towards it: some
    miss (aimed wide), some have a segment that ends before or starts past everything."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-1, -1, 2], [1, 1, 3], (triangles, 1, 3))
    verts = (centres + rng.normal(scale=0.15, size=(triangles, 3, 3))).reshape(-1, 3).astype(np.float32)
    faces = np.arange(3 * triangles, dtype=np.int32).reshape(-1, 3)
    n = 1007  # not a multiple of 16
    origins = rng.normal(scale=0.1, size=(n, 3)).astype(np.float32)
    directions = np.concatenate([rng.uniform(-0.6, 0.6, (n, 2)), np.ones((n, 1))], 1)
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    t_far = rng.choice([1.0, 10.0, 10.0, 10.0], n).astype(np.float32)  # 1: ends before the cube
    t_near = np.zeros(n, np.float32)
    return verts, faces, origins, directions, t_near, t_far


@pytest.mark.parametrize("seed", [0, 1])
def test_direct_binding_matches_embreex_on_random_triangles(library, seed):
    verts, faces, origins, directions, t_near, t_far = random_scene(seed)
    prim, u, v, t = embree_direct.TriangleScene(library, verts, faces).intersect(origins, directions, t_near, t_far)
    ref = EmbreexScene(verts, faces).intersect(origins, directions, t_near, t_far)
    hit = prim >= 0
    assert 0.2 < hit.mean() < 0.9  # both hits and misses are exercised
    np.testing.assert_array_equal(prim, ref[0])
    assert prim.dtype == np.int32 and u.dtype == v.dtype == t.dtype == np.float32
    for ours, theirs in zip((u, v, t), ref[1:], strict=True):
        np.testing.assert_allclose(ours[hit], theirs[hit], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t[~hit], t_far[~hit])  # a miss keeps its segment end


def test_segment_start_skips_the_nearer_surface(library):
    """Two parallel triangles at z = 1 and z = 2; rays along +z from z = 0 starting at t_near."""
    verts = np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1], [0, 0, 2], [1, 0, 2], [0, 1, 2]], np.float32)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    origins = np.tile(np.float32([0.2, 0.3, 0.0]), (5, 1))
    directions = np.tile(np.float32([0, 0, 1]), (5, 1))
    t_near = np.float32([0, 0.5, 1.5, 2.5, 0])
    t_far = np.float32([9, 9, 9, 9, 0.5])
    for scene in (embree_direct.TriangleScene(library, verts, faces), EmbreexScene(verts, faces)):
        prim, u, v, t = scene.intersect(origins, directions, t_near, t_far)
        np.testing.assert_array_equal(prim, [0, 0, 1, -1, -1])
        np.testing.assert_allclose(t, [1, 1, 2, 9, 0.5], rtol=1e-6)
        np.testing.assert_allclose(np.stack([u, v])[:, :3], [[0.2] * 3, [0.3] * 3], atol=1e-6)


def test_no_rays_few_rays_and_an_empty_mesh(library):
    verts, faces, origins, directions, t_near, t_far = random_scene(2, triangles=50)
    scene = embree_direct.TriangleScene(library, verts, faces)
    out = scene.intersect(origins[:0], directions[:0], t_near[:0], t_far[:0])
    assert [(len(x), x.dtype) for x in out] == [(0, np.int32)] + [(0, np.float32)] * 3
    few = scene.intersect(origins[:5], directions[:5], t_near[:5], t_far[:5])
    np.testing.assert_array_equal(few[0], scene.intersect(origins, directions, t_near, t_far)[0][:5])
    empty = embree_direct.TriangleScene(library, np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    prim, _, _, t = empty.intersect(origins, directions, t_near, t_far)
    assert (prim == -1).all() and np.array_equal(t, t_far)


def test_out_of_range_triangle_indices_are_refused(library):
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        embree_direct.TriangleScene(library, np.zeros((3, 3)), np.array([[0, 1, 3]]))


def test_a_layout_other_than_expected_is_caught_at_load(monkeypatch, fallback, caplog):
    """Reading u from the wrong row (as if RTCHit16 were laid out differently) fails the load-time check."""
    monkeypatch.setattr(embree_direct, "library_path", REAL_LIBRARY_PATH)
    monkeypatch.setattr(embree_direct, "U", embree_direct.U - 1)
    with caplog.at_level(logging.WARNING):
        assert embree_direct.load() is None
    assert "not laid out as expected" in caplog.text


@pytest.mark.parametrize("missing", ["no library", "not a library"])
def test_without_the_library_the_renderer_falls_back_to_embreex(monkeypatch, fallback, caplog, tmp_path, missing):
    if missing == "not a library":
        (tmp_path / "libembree4.so.4").write_text("not a shared object")
        monkeypatch.setattr(embree_direct, "library_path", lambda: str(tmp_path / "libembree4.so.4"))
    verts = np.array([[-1, -1, -3], [1, -1, -3], [0, 1, -3]], np.float32)
    with caplog.at_level(logging.WARNING):
        scene = triangle_scene(verts, np.array([[0, 1, 2]]))
        triangle_scene(verts + 1, np.array([[0, 1, 2]]))
    assert isinstance(scene, EmbreexScene)
    warnings = [r for r in caplog.records if r.name == embree_direct.__name__]
    assert len(warnings) == 1 and "casting rays through embreex" in warnings[0].getMessage()
    # the renderer works on embreex: a triangle seen face-on covers the image centre
    maps = render_dual_pointmaps(torch.from_numpy(verts), torch.from_numpy(verts)[None], torch.tensor([[0, 1, 2]]),
                                 torch.eye(4)[None], PROJECTION, 8, 2, backend="cpu", workers=1)
    assert maps[0, 4, 4, 0, 6] == 1 and maps[0, 4, 4, 1, 6] == 0
    np.testing.assert_allclose(maps[0, 4, 4, 0, 2].item(), -3.0, rtol=1e-6)


def test_direct_and_fallback_render_the_same_maps(fallback):
    """Two boxes one behind the other, 4 layers: the same coverage, points within float32 rounding."""
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    box = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                        [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    verts = torch.cat([corners * 0.5 + torch.tensor([0.2, 0.1, -3.0]), corners * 0.8 + torch.tensor([0, 0, -6.0])])
    faces = torch.cat([box, box + 8])
    render = lambda: render_dual_pointmaps(verts, verts[None], faces, torch.eye(4)[None], PROJECTION, 24, 4,  # noqa: E731
                                           backend="cpu", workers=1)
    embreex_maps = render()
    embree_direct.load.cache_clear()
    embree._LAST_SCENE = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embree_direct, "library_path", REAL_LIBRARY_PATH)
        if embree_direct.load() is None:
            pytest.skip("the direct Embree binding does not load here")
        direct_maps = render()
    assert embreex_maps[..., 6].sum() > 100 and (embreex_maps[..., 3, 6] == 1).any()  # 4 layers where both boxes
    torch.testing.assert_close(direct_maps[..., 6], embreex_maps[..., 6], rtol=0, atol=0)
    torch.testing.assert_close(direct_maps, embreex_maps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direct", [True, False])
def test_shadow_rays_are_blocked_by_a_roof(monkeypatch, fallback, direct):
    """A square roof at y = 1 over points at y = 0: light from straight above is blocked for points under
    it, not for points beside it; light from the side is never blocked."""
    if direct:
        monkeypatch.setattr(embree_direct, "library_path", REAL_LIBRARY_PATH)
        if embree_direct.load() is None:
            pytest.skip("the direct Embree binding does not load here")
    roof = np.array([[-1, 1, -1], [1, 1, -1], [1, 1, 1], [-1, 1, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    points = np.array([[0, 0, 0], [0.5, 0, -0.5], [3, 0, 0]], np.float32)
    normals = np.tile(np.float32([0, 1, 0]), (3, 1))
    lights = np.array([[0, 1, 0], [1, 1e-3, 0]], np.float32)
    lights /= np.linalg.norm(lights, axis=1, keepdims=True)
    np.testing.assert_array_equal(occluded(roof, faces, points, normals, lights),
                                  [[True, False], [True, False], [False, False]])
