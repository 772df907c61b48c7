"""Synthetic data building blocks: procedural quadrupeds, pose limits, camera framing, coats and shading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation

from dualpm.camera import (
    FAR,
    format_camera_txt,
    project_points,
    projection_from_focal,
    read_camera_txt,
    view_from_camera_pose,
)
from dualpm.gltf import load_skinned_mesh, save_skinned_mesh
from dualpm.skinning import rest_pose, skin
from pipeline.synth.appearance import albedo, sample_appearance, shade, value_noise, vertex_normals
from pipeline.synth.cameras import CameraRanges, FramingError, frame_camera, in_frame
from pipeline.synth.generate import sample_number
from pipeline.synth.poses import LIMITS_DEG, TAIL_CONE_DEG, JointClass, PoseSampler, classify_joint
from pipeline.synth.quadruped import JOINT_NAMES, LEGS, MAX_INFLUENCES, is_clean_surface, make_quadruped


@pytest.fixture(scope="module")
def animal():
    return make_quadruped("quadruped_007", np.random.default_rng([0, 1, 7]), 2000)


@pytest.fixture(scope="module")
def fine_animal():
    return make_quadruped("fine", np.random.default_rng([0, 1, 3]), 20000)


def dense_weights(mesh) -> np.ndarray:
    out = np.zeros((mesh.num_vertices, mesh.num_joints))
    np.add.at(out, (np.arange(mesh.num_vertices)[:, None], mesh.joints), mesh.weights)
    return out


# ---- quadruped ------------------------------------------------------------------------------------


def test_quadruped_gltf_loads_with_our_loader_and_trimesh_and_is_watertight(tmp_path, animal):
    path = tmp_path / "quadruped_007_shape.gltf"
    save_skinned_mesh(animal, path)
    loaded = load_skinned_mesh(path)
    for key in ("vertices", "faces", "joints", "weights", "joint_nodes", "inverse_bind", "parents",
                "rest_translation", "rest_rotation", "rest_scale"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(animal, key), err_msg=key)
    assert loaded.node_names == ("quadruped_007",) + JOINT_NAMES and loaded.mesh_node == 0

    geometry = trimesh.load(path, force="mesh")  # trimesh's own reader, merging coincident vertices
    assert len(geometry.vertices) == animal.num_vertices and len(geometry.faces) == len(animal.faces)
    assert geometry.is_watertight and geometry.is_winding_consistent and geometry.body_count == 1
    assert geometry.volume > 0  # outward-facing
    closed = trimesh.Trimesh(animal.vertices, animal.faces, process=False)
    np.testing.assert_allclose(closed.volume, geometry.volume, rtol=1e-5)
    assert abs(len(animal.faces) - 2000) <= 40


def test_is_clean_surface_rejects_holes_pinches_and_pieces():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    assert is_clean_surface(v, f)
    assert not is_clean_surface(v, f[1:])  # a hole
    assert not is_clean_surface(v, np.concatenate([f[:1, ::-1], f[1:]]))  # one face wound the wrong way
    top = np.argmax(v[:, 2])
    touching = np.concatenate([v, v - 2 * v[top]])  # a second sphere touching the first at one vertex
    assert not is_clean_surface(touching, np.concatenate([f, f + len(v)]))
    apart = np.concatenate([v, v + [5.0, 0, 0]])
    assert not is_clean_surface(apart, np.concatenate([f, f + len(v)]))  # two pieces


def test_quadruped_skeleton_and_size(animal):
    # The mesh node is a root and not a joint; every other node is a skin joint.
    assert animal.parents[animal.mesh_node] == -1 and animal.mesh_node not in animal.joint_nodes
    np.testing.assert_array_equal(animal.joint_nodes, np.arange(1, animal.num_nodes))
    names = list(animal.node_names)
    for leg in LEGS:  # four legs of four segments, each chained to the torso
        chain = [n for n in names if n.startswith(leg)]
        assert len(chain) == 4
        for parent, child in zip(chain, chain[1:], strict=False):
            assert animal.parents[names.index(child)] == names.index(parent)
    assert sum(n.startswith("tail_") for n in names) >= 3
    # Rest pose skins to the bind pose (inverse binds match the rest transforms).
    np.testing.assert_allclose(skin(animal, rest_pose(animal))[0].numpy(), animal.vertices, atol=1e-5)
    lo, hi = animal.vertices.min(0), animal.vertices.max(0)
    assert np.abs(0.5 * (lo + hi)).max() < 0.05  # centred on the origin
    assert 1.0 < (hi - lo).max() < 3.0  # horse-sized, longest along the facing axis z
    assert np.argmax(hi - lo) in (1, 2) and (hi - lo)[0] < (hi - lo)[2]


def test_quadruped_shapes_differ_per_seed():
    a = make_quadruped("a", np.random.default_rng([0, 1, 0]), 1000)
    b = make_quadruped("b", np.random.default_rng([0, 1, 1]), 1000)
    again = make_quadruped("a", np.random.default_rng([0, 1, 0]), 1000)
    np.testing.assert_array_equal(a.vertices, again.vertices)
    assert np.abs(np.ptp(a.vertices, 0) - np.ptp(b.vertices, 0)).max() > 0.05


def test_skin_weights_are_valid_and_smooth_across_joints(fine_animal):
    mesh = fine_animal
    assert mesh.joints.shape[1] == MAX_INFLUENCES
    assert (mesh.weights >= 0).all() and (mesh.joints >= 0).all() and (mesh.joints < mesh.num_joints).all()
    np.testing.assert_allclose(mesh.weights.sum(1), 1.0, atol=1e-6)
    dense = dense_weights(mesh)
    assert ((dense > 0).sum(1) <= MAX_INFLUENCES).all()
    edges = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).edges_unique
    jump = np.abs(dense[edges[:, 0]] - dense[edges[:, 1]]).sum(1)
    # A hard (nearest-bone) assignment jumps by 2.0 across every boundary edge.
    hard = np.zeros_like(dense)
    hard[np.arange(len(dense)), dense.argmax(1)] = 1
    assert np.abs(hard[edges[:, 0]] - hard[edges[:, 1]]).sum(1).max() == 2.0
    assert jump.max() < 1.2 and np.percentile(jump, 99) < 0.6
    # Every leg joint blends with its parent: some vertices carry both substantially.
    names = list(mesh.node_names)
    for leg in LEGS:
        chain = [names.index(n) - 1 for n in names if n.startswith(leg)]  # node -> joint index
        for parent, child in zip(chain, chain[1:], strict=False):
            both = (dense[:, parent] > 0.25) & (dense[:, child] > 0.25)
            assert both.sum() >= 3, (names[parent + 1], names[child + 1])


# ---- poses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("tail_3", (JointClass.TAIL, 0)), ("neck_1", (JointClass.NECK, 0)), ("head", (JointClass.HEAD, 0)),
        ("spine_2", (JointClass.SPINE, 0)), ("pelvis", (JointClass.SPINE, 0)),
        ("front_left_shoulder", (JointClass.LEG_UPPER, 0)), ("front_left_elbow", (JointClass.LEG_MIDDLE, -1)),
        ("front_right_carpus", (JointClass.LEG_MIDDLE, 1)), ("hind_left_hip", (JointClass.LEG_UPPER, 0)),
        ("hind_left_stifle", (JointClass.LEG_MIDDLE, 1)), ("hind_right_hock", (JointClass.LEG_MIDDLE, -1)),
        ("hind_right_fetlock", (JointClass.LEG_LOWER, 1)),
        ("mixamorig:LeftUpLeg", (JointClass.LEG_UPPER, 0)), ("mixamorig:LeftLeg", (JointClass.LEG_MIDDLE, 0)),
        ("mixamorig:RightToeBase", (JointClass.LEG_LOWER, 0)), ("mixamorig:Hips", (JointClass.SPINE, 0)),
        ("DEF-thigh.L", (JointClass.LEG_UPPER, 0)), ("Bip01 L Calf", (JointClass.LEG_MIDDLE, 0)),
        ("LeftEar", (JointClass.HEAD, 0)), ("forearm.R", (JointClass.LEG_MIDDLE, 0)),
        ("rear_leg_L", (JointClass.LEG_MIDDLE, 0)), ("Bone.003", (JointClass.OTHER, 0)),
    ],
)
def test_classify_joint(name, expected):
    assert classify_joint(name) == expected


def _local_delta_euler(mesh, pose: np.ndarray) -> np.ndarray:
    """Extrinsic xyz angles (degrees) of rest^-1 * pose rotation per node (body frame = world here)."""
    rest = Rotation.from_quat(mesh.rest_rotation.astype(np.float64), scalar_first=True)
    posed = Rotation.from_quat(pose[:, :4].astype(np.float64), scalar_first=True)
    return np.degrees((rest.inv() * posed).as_euler("xyz"))


def test_poses_stay_within_joint_limits(animal):
    sampler = PoseSampler.for_mesh(animal, yaw=False, forward=np.array([0.0, 0.0, 1.0]))
    names = list(animal.node_names)
    classes = {n: classify_joint(n)[0] for n in names[1:]}
    classes["root"] = JointClass.ROOT
    rng = np.random.default_rng(5)
    for _ in range(50):
        pose = sampler.sample(rng)
        assert pose.shape == (animal.num_nodes, 7) and pose.dtype == np.float64
        np.testing.assert_allclose(np.linalg.norm(pose[:, :4], axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(pose[:, 4:], animal.rest_translation)  # rest translations
        np.testing.assert_array_equal(pose[0], [1, 0, 0, 0, 0, 0, 0])  # mesh node keeps its rest
        angles = _local_delta_euler(animal, pose)
        for i, name in enumerate(names[1:], start=1):
            cls = classes[name]
            if cls == JointClass.TAIL:
                swing = Rotation.from_euler("xyz", np.radians(angles[i])).magnitude()
                assert np.degrees(swing) <= TAIL_CONE_DEG + 10 + 1e-3
                continue
            limits = np.array(LIMITS_DEG[cls], dtype=np.float64)
            flex = classify_joint(name)[1]
            if flex < 0:
                limits[0] = -limits[0, ::-1]
            assert (angles[i] >= limits[:, 0] - 1e-3).all() and (angles[i] <= limits[:, 1] + 1e-3).all(), name


def test_leg_joints_flex_their_own_way_and_yaw_turns_the_root(animal):
    names = list(animal.node_names)
    rng = np.random.default_rng(9)
    sampler = PoseSampler.for_mesh(animal, yaw=True, forward=np.array([0.0, 0.0, 1.0]))
    poses = np.stack([sampler.sample(rng) for _ in range(200)])
    angles = np.stack([_local_delta_euler(animal, p) for p in poses])  # (200, N, 3)
    elbow, carpus = names.index("front_left_elbow"), names.index("front_left_carpus")
    assert angles[:, elbow, 0].mean() < -15 and angles[:, carpus, 0].mean() > 15
    hip = names.index("hind_left_hip")
    assert np.abs(angles[:, hip, 0]).max() > 20 and np.abs(angles[:, hip, 2]).max() <= 6 + 1e-3
    root = Rotation.from_quat(poses[:, names.index("root"), :4], scalar_first=True)
    root_yaw = np.degrees(root.as_euler("yxz")[:, 0])
    assert root_yaw.min() < -120 and root_yaw.max() > 120  # the whole circle
    again = PoseSampler.for_mesh(animal, yaw=True, forward=np.array([0.0, 0.0, 1.0]))
    np.testing.assert_array_equal(again.sample(np.random.default_rng(9)), poses[0])


def test_user_rig_forward_is_estimated_from_its_head(animal):
    # The same animal turned to face +X (rotate the joint positions and mesh about +Y by 90 degrees).
    turn = Rotation.from_rotvec([0, np.pi / 2, 0])
    rot = turn.as_matrix()
    inverse_bind = animal.inverse_bind.astype(np.float64).copy()
    inverse_bind[:, :3, 3] = inverse_bind[:, :3, 3] @ rot.T
    turned = type(animal)(
        name="t", vertices=animal.vertices @ rot.T, faces=animal.faces, joints=animal.joints,
        weights=animal.weights, joint_nodes=animal.joint_nodes, inverse_bind=inverse_bind,
        node_names=animal.node_names, parents=animal.parents,
        rest_translation=animal.rest_translation @ rot.T,
        rest_rotation=animal.rest_rotation, rest_scale=animal.rest_scale, mesh_node=0,
    )
    sampler = PoseSampler.for_mesh(turned)
    forward_row = sampler.to_joint[names_index(turned, "head")][2]  # body forward in the head's rest frame
    np.testing.assert_allclose(forward_row, [1.0, 0.0, 0.0], atol=1e-6)


def names_index(mesh, name: str) -> int:
    return list(mesh.node_names).index(name)


# ---- cameras -----------------------------------------------------------------------------------------


def test_framed_camera_round_trips_through_the_camera_file(tmp_path, animal):
    posed = torch.tensor(animal.vertices, dtype=torch.float64)
    camera = frame_camera(posed, np.random.default_rng(1), 64, CameraRanges(), where="test")
    (tmp_path / "c.txt").write_text(camera.text)
    pose = read_camera_txt(tmp_path / "c.txt")
    np.testing.assert_array_equal(pose, camera.camera_pose)
    view = view_from_camera_pose(torch.from_numpy(pose)).numpy()
    np.testing.assert_array_equal(view, camera.view)
    assert format_camera_txt(pose) == camera.text
    assert in_frame(posed, view, camera.focal_mm, 64, 0.03)
    # It looks at the bounding-box centre: that projects to the image centre.
    centre = 0.5 * (posed.min(0).values + posed.max(0).values)
    cam = centre @ torch.from_numpy(view[:3, :3]).T + torch.from_numpy(view[:3, 3])
    projection = projection_from_focal(torch.tensor(camera.focal_mm, dtype=torch.float64))
    pixel, _ = project_points(cam[None], projection, 64, 64)
    np.testing.assert_allclose(pixel[0].numpy(), [32.0, 32.0], atol=1e-9)


def test_in_frame_detects_points_outside_the_margin():
    view = np.eye(4)
    view[2, 3] = -5.0  # camera at z = 5 looking down -z at the origin
    # 36 mm focal: cot(fov/2) = 2, so x = 0.5 * depth * ndc; depth 5 -> ndc 1 at x = 2.5.
    inside = torch.tensor([[2.5 * 0.9, 0.0, 0.0], [-2.5 * 0.9, 0.0, 0.0]], dtype=torch.float64)
    outside = torch.tensor([[2.5 * 0.97, 0.0, 0.0]], dtype=torch.float64)
    assert in_frame(inside, view, 36.0, 100, 0.03)
    assert not in_frame(outside, view, 36.0, 100, 0.03)
    far = view.copy()
    far[2, 3] = -(FAR + 1.0)
    assert not in_frame(inside * 0.01, far, 36.0, 100, 0.03)  # beyond the far plane


@pytest.mark.parametrize("offset,bad", [(1e6, "far"), (0.0, "nan"), (0.0, "huge")])
def test_unframable_points_raise_naming_the_source(offset, bad):
    points = torch.rand(50, 3, dtype=torch.float64) + offset
    if bad == "nan":
        points[3, 1] = float("nan")
    if bad == "huge":
        points = points * 100.0  # 100 units across: beyond the far plane at any distance that frames it
    with pytest.raises(FramingError, match="my_mesh.glb"):
        frame_camera(points, np.random.default_rng(0), 64, CameraRanges(), where="my_mesh.glb")


# ---- appearance ------------------------------------------------------------------------------------


def test_value_noise_interpolates_its_lattice():
    lattice = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0))
    corners = torch.tensor([[0, 0, 0], [3, 5, 7], [7, 1, 2]], dtype=torch.float32)
    expected = torch.stack([lattice[0, 0, 0], lattice[3, 5, 7], lattice[7, 1, 2]])
    np.testing.assert_array_equal(value_noise(corners, lattice).numpy(), expected.numpy())
    shifted = value_noise(corners + 8, lattice).numpy()
    np.testing.assert_allclose(shifted, value_noise(corners, lattice).numpy(), atol=1e-6)  # periodic
    mid = value_noise(torch.tensor([[0.5, 0.0, 0.0]]), lattice)
    np.testing.assert_allclose(mid.numpy(), [(lattice[0, 0, 0] + lattice[1, 0, 0]).item() / 2], atol=1e-6)
    points = torch.rand(1000, 3) * 8
    values = value_noise(points, lattice)
    assert values.min() >= 0 and values.max() <= 1
    step = value_noise(points + 1e-3, lattice) - values  # continuous: tiny steps, tiny changes
    assert step.abs().max() < 0.01


def test_coat_is_not_a_colour_ramp_of_canonical_coordinates(animal):
    points = torch.tensor(animal.vertices)
    design = torch.cat([points, torch.ones(len(points), 1)], dim=1).double()
    for k in range(8):
        colour = albedo(sample_appearance(np.random.default_rng([0, 2, k]), animal.vertices), points).double()
        assert colour.min() >= 0 and colour.max() <= 1
        fit = torch.linalg.lstsq(design, colour).solution
        residual = ((design @ fit - colour) ** 2).sum(0)
        total = ((colour - colour.mean(0)) ** 2).sum(0)
        assert (1 - residual / total).max() < 0.3  # an affine ramp of xyz would explain ~all of it


def test_vertex_normals_of_a_sphere_are_radial():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v, f = torch.tensor(sphere.vertices), torch.tensor(sphere.faces)
    normals = vertex_normals(v, f)
    cos = (normals * v / v.norm(dim=1, keepdim=True)).sum(1)
    assert cos.min() > 0.999


def test_shade_composes_mask_and_background(animal):
    from pipeline.synth.appearance import background, sample_lighting

    layer = torch.zeros(16, 16, 10)
    layer[4:8, 2:12, 9] = 1.0
    layer[4:8, 2:12, 3:6] = torch.tensor([0.0, 0.0, 1.0])
    layer[4:8, 2:12, 6:9] = torch.tensor([0.0, 0.0, -3.0])
    app = sample_appearance(np.random.default_rng(0), animal.vertices)
    light = sample_lighting(np.random.default_rng(0))
    rgb, mask = shade(layer, app, light, torch.eye(4, dtype=torch.float64))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8 and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (layer[..., 9].numpy() > 0) * 255)
    expected = (background(light, 16, 16).pow(1 / 2.2) * 255 + 0.5).to(torch.uint8).numpy()
    np.testing.assert_array_equal(rgb[mask == 0], expected[mask == 0])


def test_sample_numbers_skip_multiples_of_5000():
    numbers = np.array([sample_number(k) for k in range(20000)])
    assert numbers[0] == 1 and (np.diff(numbers) >= 1).all()
    assert not (numbers % 5000 == 0).any()
    assert sample_number(4998) == 4999 and sample_number(4999) == 5001 and sample_number(9997) == 9999
    assert sample_number(9998) == 10001


def test_user_rig_yaw_goes_to_the_node_above_its_skeleton():
    from dualpm.gltf import SkinnedMesh

    # Nodes: 0 mesh, 1 Armature (root, not a joint), 2 Hips (joint), 3 Head (joint), 4 Prop (root, no joints).
    vertices = np.array([[0, 0, -0.5], [0, 0.2, 0], [0, 0, 0.5], [0.2, 0, 0]], dtype=np.float32)
    mesh = SkinnedMesh(
        name="rig", vertices=vertices, faces=[[0, 1, 2], [0, 2, 3]], joints=[[0, 1, 0, 0]] * 4,
        weights=[[1, 0, 0, 0]] * 4, joint_nodes=[2, 3], inverse_bind=np.tile(np.eye(4), (2, 1, 1)),
        node_names=("rig", "Armature", "Hips", "Head", "Prop"), parents=[-1, -1, 1, 2, -1],
        rest_translation=np.zeros((5, 3)), rest_rotation=np.tile([1.0, 0, 0, 0], (5, 1)),
        rest_scale=np.ones((5, 3)), mesh_node=0,
    )
    sampler = PoseSampler.for_mesh(mesh, yaw=True)
    assert sampler.yaw_roots.tolist() == [1]
    assert sampler.classes.tolist() == [JointClass.NONE, JointClass.NONE, JointClass.ROOT, JointClass.HEAD,
                                        JointClass.NONE]
    pose = sampler.sample(np.random.default_rng(0))
    assert abs(pose[1, 1]) < 1e-7 and abs(pose[1, 3]) < 1e-7 and abs(pose[1, 2]) > 1e-3  # a pure yaw
    np.testing.assert_array_equal(pose[[0, 4]], [[1, 0, 0, 0, 0, 0, 0]] * 2)  # non-joint nodes stay at rest
