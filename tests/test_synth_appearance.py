"""`dualpm-prep synth` with a textured, animated rig: its look, its clips, the same masks, the asset kept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dualpm.data.source import Layout
from dualpm.gltf import load_skinned_mesh
from dualpm.gltf_material import load_surface
from pipeline.synth.generate import SynthConfig, _model_state, build_model, make_plan, make_sample, prepare_output
from tests import reference_reader
from tests.rigs import png_bytes, textured_tube


def _run(root: Path, **options) -> Layout:
    torch.set_num_threads(1)
    config = SynthConfig(num_samples=4, num_models=options.pop("num_models", 1), image_size=48, faces=1000,
                         backend="cpu", seed=5, val_fraction=0.0, **options)
    plan = make_plan(config)
    prepare_output(root, config, plan, False)
    for model in plan.models:
        build_model(root, config, model, False)
    for model in plan.models:
        state = _model_state(root, config, model)
        for spec in plan.samples:
            if spec.model == model.index:
                make_sample(root, config, model, state, spec, "cpu")
    return Layout(root)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rig(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    return textured_tube(folder / "tube.gltf")


def test_asset_look_keeps_masks_poses_and_cameras(tmp_path, rig):
    ids = [f"{i:06d}" for i in range(1, 5)]
    runs = {look: _run(tmp_path / look, meshes=(rig,), appearance=look, poses="random")
            for look in ("procedural", "asset")}
    for look, lay in runs.items():  # the dual point maps are rendered from the pose and camera files
        digest = hashlib.sha256()
        for i in ids:
            for kind in ("pose", "camera", "mask"):
                digest.update(getattr(lay, kind)(i).read_bytes())
        # sha256 of the same files written by the code before the asset look (commit 767dc3f, this machine)
        assert digest.hexdigest() == "1c522afbcfea554af9a0e9aee719809fc3b0b6366245f561fcc6d49e164e5e2f", look
    for i in ids:
        assert _digest(runs["asset"].rgb(i)) != _digest(runs["procedural"].rgb(i))
    # the checker's colours show up: many distinct hues on the animal (the coat has two colours and fur noise)
    rgb = np.asarray(Image.open(runs["asset"].rgb(ids[0])))
    assert rgb.shape == (48, 48, 3)


def test_rig_as_given_is_kept_and_the_reference_reader_loads_the_shape(tmp_path, rig):
    lay = _run(tmp_path / "out", meshes=(rig,))
    folder = tmp_path / "out" / "shapes" / "tube"
    assert _digest(folder / "asset" / "tube.gltf") == _digest(rig)
    assert _digest(folder / "asset" / "tube.png") == _digest(rig.parent / "tube.png")
    assert load_surface(folder / "asset" / "tube.gltf").has_material
    # the reference reader (tests/reference_reader.py) loads <model>_shape.gltf and ignores asset/
    positions = reference_reader.shapes(tmp_path / "out")
    np.testing.assert_array_equal(positions["tube"], load_skinned_mesh(folder / "tube_shape.gltf").vertices)
    assert reference_reader.metadata(lay.metadata("000001"), tmp_path / "out")["model_name"] == "tube"
    assert lay.rgb("000001").exists()


def test_clip_poses_are_recorded_in_the_metadata(tmp_path, rig):
    lay = _run(tmp_path / "out", meshes=(rig,), poses="clips")
    for i in ("000001", "000002"):
        meta = yaml.safe_load(lay.metadata(i).read_text())
        assert meta["clip"] == "Bend" and 0.0 <= meta["clip_time"] <= 1.0
        pose = np.load(lay.pose(i))["poses"]
        angle = 2 * np.degrees(np.arcsin(pose[2, 3]))  # bone1 about z: 40 degrees x the clip time
        np.testing.assert_allclose(angle, 40.0 * meta["clip_time"], atol=1e-6)


def test_hdri_and_photo_backgrounds(tmp_path, rig):
    sky = np.zeros((32, 64, 3), np.uint8)
    sky[:16] = (90, 140, 250)
    sky[16:] = (60, 120, 40)
    photo = np.full((40, 50, 3), (200, 30, 30), np.uint8)
    (tmp_path / "hdri").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "hdri" / "sky.png").write_bytes(png_bytes(sky))
    (tmp_path / "photos" / "red.png").write_bytes(png_bytes(photo))
    lay = _run(tmp_path / "photo", meshes=(rig,), backgrounds=tmp_path / "photos")
    rgb = np.asarray(Image.open(lay.rgb("000001"))).astype(float)
    mask = np.asarray(Image.open(lay.mask("000001"))) > 0
    back = rgb[~mask]
    assert (back[:, 0] > 2 * back[:, 1]).all()  # the red photo, jittered, behind the animal
    lay = _run(tmp_path / "lit", meshes=(rig,), hdri=tmp_path / "hdri")
    rgb = np.asarray(Image.open(lay.rgb("000001"))).astype(float)
    mask = np.asarray(Image.open(lay.mask("000001"))) > 0
    back = rgb[~mask]
    assert ((back[:, 2] > back[:, 0]) | (back[:, 1] > back[:, 0])).all()  # sky or grass, never red


def test_procedural_animals_look_as_before(tmp_path):
    """Images of procedural animals are byte-identical to those of the code before the asset look
    (sha256 recorded with commit 767dc3f on this machine: 64 px, 1000 faces, seed 3)."""
    torch.set_num_threads(1)
    config = SynthConfig(num_samples=3, num_models=1, image_size=64, faces=1000, seed=3, backend="cpu")
    plan = make_plan(config)
    prepare_output(tmp_path, config, plan, False)
    build_model(tmp_path, config, plan.models[0], False)
    state = _model_state(tmp_path, config, plan.models[0])
    for spec in plan.samples:
        make_sample(tmp_path, config, plan.models[0], state, spec, "cpu")
    lay = Layout(tmp_path)
    assert [_digest(lay.rgb(s.id)) for s in plan.samples] == [
        "b15c9dad256db4150d95b7d9e057a86b7a404ac2b03f1e63a6a085b56c541b86",
        "909093c24477b98bb13dd52018fe9a591327b686043870a46bfc9e2ba4b70b36",
        "8bf95f072cc48ddf1ad33ab0d67fe8c2421a939fbe667ca54eb556958571ffd3",
    ]


def test_clip_jitter_turns_each_joint_by_at_most_its_bound(rig):
    from dualpm.animation import load_clips, sample_clip
    from pipeline.synth.rig_assets import choose_pose

    mesh = load_skinned_mesh(rig)
    clips = load_clips(rig, mesh.num_nodes)
    exact = choose_pose("clips", clips, mesh, np.random.default_rng(9))
    np.testing.assert_array_equal(exact[0], sample_clip(clips[0], mesh, exact[1].time))
    jittered, choice = choose_pose("clips", clips, mesh, np.random.default_rng(9), jitter_deg=5.0)
    assert choice == exact[1]  # the same clip and time: the jitter draws come after them
    dots = np.abs((jittered[:, :4] * exact[0][:, :4]).sum(1))
    angles = np.degrees(2 * np.arccos(np.clip(dots, -1, 1)))
    joints = mesh.joint_nodes
    assert (angles[joints] <= 5.0 + 1e-6).all() and (angles[joints] > 0).all()
    others = np.setdiff1d(np.arange(mesh.num_nodes), joints)
    np.testing.assert_array_equal(jittered[others], exact[0][others])
    np.testing.assert_array_equal(jittered[:, 4:], exact[0][:, 4:])
