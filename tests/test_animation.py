"""glTF animation clips: sampled values against hand-computed LINEAR / STEP / CUBICSPLINE interpolation."""

from __future__ import annotations

import numpy as np
import pytest

from dualpm.animation import clip_by_name, load_clips, sample_clip, scale_clip
from dualpm.errors import GltfError
from dualpm.gltf import load_skinned_mesh
from tests.rigs import quad_rig

S = np.sqrt(0.5)


def _rig(tmp_path, animations):
    path = quad_rig(tmp_path / "anim.glb", animations=animations)
    return path, load_skinned_mesh(path)


def test_linear_translation_and_slerp(tmp_path):
    path, mesh = _rig(tmp_path, [
        {"name": "move", "path": "translation", "times": [0.0, 1.0], "values": [[0, 0, 0], [4, 0, 0]]},
        {"name": "turn", "path": "rotation", "times": [1.0, 3.0], "values": [[0, 0, 0, 1], [0, S, 0, S]]},
    ])
    move, turn = load_clips(path, mesh.num_nodes)
    assert (move.name, move.start, move.end, turn.start, turn.end) == ("move", 0.0, 1.0, 1.0, 3.0)
    np.testing.assert_allclose(sample_clip(move, mesh, 0.25)[0], [1, 0, 0, 0, 1, 0, 0], atol=1e-12)
    # halfway between identity and 90 degrees about y: 45 degrees, q = [cos 22.5, 0, sin 22.5, 0]
    half = np.radians(22.5)
    np.testing.assert_allclose(sample_clip(turn, mesh, 2.0)[0, :4], [np.cos(half), 0, np.sin(half), 0], atol=1e-7)
    # a quarter: 22.5 degrees (slerp is uniform in angle; a normalised lerp would give 21.7)
    np.testing.assert_allclose(sample_clip(turn, mesh, 1.5)[0, :4], [np.cos(half / 2), 0, np.sin(half / 2), 0],
                               atol=1e-7)
    # outside the keyframes: the end values; nodes not animated keep their rest transform
    batch = sample_clip(move, mesh, np.array([-1.0, 5.0]))
    np.testing.assert_allclose(batch[:, 0, 4], [0, 4])
    np.testing.assert_allclose(batch[:, 1], np.tile([1, 0, 0, 0, 0, 0, 0], (2, 1)))
    np.testing.assert_allclose(sample_clip(scale_clip(move, 0.5), mesh, 0.25)[0, 4], 0.5)
    assert clip_by_name((move, turn), "turn") is turn
    with pytest.raises(GltfError, match="move, turn"):
        clip_by_name((move, turn), "run")


def test_step(tmp_path):
    path, mesh = _rig(tmp_path, [{"path": "translation", "interpolation": "STEP", "times": [0.0, 1.0, 2.0],
                                  "values": [[0, 0, 0], [1, 0, 0], [5, 0, 0]]}])
    (clip,) = load_clips(path)
    assert clip.name == "animation_0"
    got = sample_clip(clip, mesh, np.array([0.0, 0.99, 1.0, 1.5, 2.0, 9.0]))[:, 0, 4]
    np.testing.assert_allclose(got, [0, 0, 1, 1, 5, 5])


def test_cubic_spline(tmp_path):
    # keys t = 0, 2: (in-tangent, value, out-tangent) = (0, 0, 1) and (0, 1, 0) on x.
    # s = 0.5, td = 2: p = td (s^3 - 2 s^2 + s) * 1 + (-2 s^3 + 3 s^2) * 1 = 2 * 0.125 + 0.5 = 0.75
    values = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    path, mesh = _rig(tmp_path, [{"path": "translation", "interpolation": "CUBICSPLINE", "times": [0.0, 2.0],
                                  "values": values}])
    (clip,) = load_clips(path)
    np.testing.assert_allclose(sample_clip(clip, mesh, 1.0)[0, 4], 0.75, atol=1e-7)
    # s = 0.25: 2 * (1/64 - 2/16 + 1/4) + (-2/64 + 3/16) = 0.28125 + 0.15625 = 0.4375
    np.testing.assert_allclose(sample_clip(clip, mesh, 0.5)[0, 4], 0.4375, atol=1e-7)
    np.testing.assert_allclose(sample_clip(clip, mesh, 2.0)[0, 4], 1.0, atol=1e-7)


def test_malformed_clips_are_refused(tmp_path):
    path, _ = _rig(tmp_path, [{"path": "translation", "times": [1.0, 0.5], "values": [[0, 0, 0], [1, 0, 0]]}])
    with pytest.raises(GltfError, match="strictly increasing"):
        load_clips(path)
    path, _ = _rig(tmp_path, [{"path": "translation", "interpolation": "CUBICSPLINE", "times": [0.0, 1.0],
                               "values": [[0, 0, 0], [1, 0, 0]]}])
    with pytest.raises(GltfError, match="3 per keyframe"):
        load_clips(path)
    path, _ = _rig(tmp_path, [{"path": "translation", "node": 7, "times": [0.0], "values": [[0, 0, 0]]}])
    with pytest.raises(GltfError, match="targets node 7"):
        load_clips(path)
