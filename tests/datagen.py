"""Tiny source datasets in the reference layout, for tests (render, features, training, demo).

`make_source_dataset(root, ...)` writes a few bent skinned tubes ("animals"), random poses, cameras,
metadata, RGB and mask PNGs (rendered with the project's own renderer) and optional packed features,
using only dualpm primitives. Everything is deterministic for a given seed and takes well under a
second for ~10 samples. Bad samples can be injected to test failure handling:

    corrupt_pose      poses/<id>_pose.npz is not an npz archive
    pose_node_count   the pose has one node too many for its mesh
    camera_away       the camera looks away from the object (nothing is covered)
    broken_mesh       the sample uses model "broken", whose glTF is not valid JSON
    bad_metadata      metadata/<id>_metadata.txt has no focal_length

    ds = make_source_dataset(tmp_path / "src", num_samples=8, models=2, val=2,
                             bad={sample_id(3): "corrupt_pose"})
    ds.root, ds.ids, ds.val_ids, ds.model_of["000001"], ds.bad

Every form the published-layout contract (docs/dataset.md) allows can be written: masks in each of
`MASK_ENCODINGS` and poses in each of `POSE_DTYPES` (cycled over the samples), and the whole dataset in
other units (`unit=100`: a rig in cm; the images stay those of the metre-sized scene).

`cli_output(command, *args, exit_code=0)` runs a click command in-process and returns its output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from dualpm.camera import camera_pose_from_view, format_camera_txt, look_at, projection_from_focal
from dualpm.data.source import Layout, SampleMetadata, format_metadata
from dualpm.fileio import atomic_output, atomic_write_bytes, atomic_write_text
from dualpm.gltf import SkinnedMesh, save_skinned_mesh, scaled_mesh
from dualpm.render import render_layers
from dualpm.skinning import POSE_KEY, rest_pose, skin, write_pose_file

BAD_KINDS = ("corrupt_pose", "pose_node_count", "camera_away", "broken_mesh", "bad_metadata")
MASK_ENCODINGS = ("0-255", "0-1", "1-bit")  # 8-bit grey 0/255, 8-bit grey 0/1 (published), 1-bit (synth)
POSE_DTYPES = ("float64", "float32")  # float64: the reference needs it and we write it; float32: we read it
BROKEN_MODEL = "broken"
TUBE_LENGTH = 2.4  # scene units, along x before posing
CAMERA_DISTANCE = 4.5  # keeps the whole bent tube inside the view at the focal lengths used


def sample_id(index: int) -> str:
    """Id of the `index`-th generated sample (0-based): '000001', '000002', ... (never a multiple of 5000)."""
    return f"{index + 1:06d}"


@dataclass(frozen=True)
class GeneratedDataset:
    """What `make_source_dataset` wrote."""

    root: Path
    ids: list[str]  # every sample with a pose file, in SourceDataset order
    model_of: dict[str, str]  # sample id -> model name
    val_ids: list[str]  # listed in splits/val.txt
    bad: dict[str, str] = field(default_factory=dict)  # sample id -> injected problem

    @property
    def good_ids(self) -> list[str]:
        return [i for i in self.ids if i not in self.bad]


def tube_mesh(name: str, rings: int = 14, segments: int = 12, radius: float = 0.25) -> SkinnedMesh:
    """A capped tube along x (length `TUBE_LENGTH`) skinned to a chain of 3 bones.

    Nodes: 0 the mesh node, 1 bone0 at x = -0.8 (root of the armature), 2 bone1 at x = 0,
    3 bone2 at x = 0.8. Each vertex blends its two nearest bones linearly in x. Inverse binds are
    the inverses of the rest globals, so the rest pose is the bind pose.
    V = rings * segments + 2, F = 2 * segments * rings.
    """
    x = np.linspace(-TUBE_LENGTH / 2, TUBE_LENGTH / 2, rings)
    # Slightly thinner towards the ends so the tube is not symmetric under a flip.
    r = radius * (1.0 - 0.3 * (x + TUBE_LENGTH / 2) / TUBE_LENGTH)
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring_y, ring_z = np.outer(r, np.cos(angle)).ravel(), np.outer(r, np.sin(angle)).ravel()
    ring_pts = np.stack([np.repeat(x, segments), ring_y, ring_z], axis=1)  # (rings * segments, 3)
    caps = np.array([[x[0] - radius * 0.5, 0, 0], [x[-1] + radius * 0.5, 0, 0]])
    vertices = np.concatenate([ring_pts, caps])

    ring = np.arange(rings - 1)[:, None] * segments  # (rings-1, 1)
    seg = np.arange(segments)[None, :]
    a, b = ring + seg, ring + (seg + 1) % segments  # (rings-1, segments)
    c, d = a + segments, b + segments
    # Counter-clockwise seen from outside: the ring angle runs counter-clockwise around +x.
    # (rings-1, segments, 2 triangles, 3) -> (F_side, 3)
    side = np.stack([np.stack([a, b, c], -1), np.stack([b, d, c], -1)], 2).reshape(-1, 3)
    start, end = rings * segments, rings * segments + 1
    last = (rings - 1) * segments
    cap0 = np.stack([np.full(segments, start), (seg[0] + 1) % segments, seg[0]], 1)
    cap1 = np.stack([np.full(segments, end), last + seg[0], last + (seg[0] + 1) % segments], 1)
    faces = np.concatenate([side, cap0, cap1])

    bone_x = np.array([-0.8, 0.0, 0.8])
    t = np.clip(np.interp(vertices[:, 0], bone_x, [0.0, 1.0, 2.0]), 0.0, 2.0)
    lower = np.minimum(np.floor(t), 1.0).astype(np.int64)  # blend bones lower and lower + 1
    frac = t - lower
    joints = np.stack([lower, lower + 1, np.zeros_like(lower), np.zeros_like(lower)], 1)
    weights = np.stack([1.0 - frac, frac, np.zeros_like(frac), np.zeros_like(frac)], 1)
    inverse_bind = np.tile(np.eye(4), (3, 1, 1))
    inverse_bind[:, 0, 3] = -bone_x  # rest globals are pure translations to bone_x
    return SkinnedMesh(
        name=name, vertices=vertices, faces=faces, joints=joints, weights=weights, joint_nodes=[1, 2, 3],
        inverse_bind=inverse_bind, node_names=(name, "bone0", "bone1", "bone2"), parents=[-1, -1, 1, 2],
        rest_translation=[[0, 0, 0], [-0.8, 0, 0], [0.8, 0, 0], [0.8, 0, 0]],
        rest_rotation=np.tile([1.0, 0, 0, 0], (4, 1)), rest_scale=np.ones((4, 3)), mesh_node=0,
    )


def _random_poses(mesh: SkinnedMesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, N, 7) poses: a random yaw of the whole armature and bends of up to 45 degrees."""
    poses = np.repeat(rest_pose(mesh)[None], count, axis=0).astype(np.float64)
    yaw = rng.uniform(-np.pi, np.pi, count)
    poses[:, 1, :4] = np.stack([np.cos(yaw / 2), 0 * yaw, np.sin(yaw / 2), 0 * yaw], 1)  # about +y
    # Turn about the tube's middle, not about bone0: move bone0 to R(yaw) @ (-0.8, 0, 0).
    poses[:, 1, 4:] = np.stack([-0.8 * np.cos(yaw), 0 * yaw, 0.8 * np.sin(yaw)], 1)
    for node in (2, 3):
        bend = rng.uniform(-np.pi / 4, np.pi / 4, count)
        twist = rng.uniform(-np.pi / 8, np.pi / 8, count)
        # bend about z then a small turn about y: q = q_y(twist) * q_z(bend)
        cz, sz, cy, sy = np.cos(bend / 2), np.sin(bend / 2), np.cos(twist / 2), np.sin(twist / 2)
        poses[:, node, :4] = np.stack([cy * cz, sy * sz, sy * cz, cy * sz], 1)
    return poses.astype(np.float32)


def _camera(rng: np.random.Generator, away: bool) -> tuple[torch.Tensor, float]:
    """(view (4, 4) float64, focal mm) of a camera on a sphere around the origin."""
    azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(math.radians(10), math.radians(40))
    ce, se = math.cos(elevation), math.sin(elevation)
    eye = CAMERA_DISTANCE * np.array([ce * math.sin(azimuth), se, ce * math.cos(azimuth)])
    target = 2 * eye if away else np.zeros(3)  # looking away: the object is behind the camera
    view = look_at(torch.tensor(eye), torch.tensor(target))
    return view, float(rng.uniform(45.0, 55.0))


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) unit area-weighted vertex normals of (B, V, 3) vertices."""
    corners = vertices[:, faces]  # (B, F, 3 corners, 3)
    edge1, edge2 = corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0]
    face_n = torch.linalg.cross(edge1, edge2, dim=-1)  # (B, F, 3), length = 2 * area
    normals = torch.zeros_like(vertices).index_add_(1, faces.reshape(-1), face_n.repeat_interleave(3, dim=1))
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _images(
    mesh: SkinnedMesh, posed: torch.Tensor, views: torch.Tensor, focals: torch.Tensor, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """RGB (B, size, size, 3) uint8 and mask (B, size, size) uint8 {0, 255} rendered with dualpm."""
    faces = torch.tensor(mesh.faces)
    canonical = torch.tensor(mesh.vertices)
    normals = _vertex_normals(posed, faces)  # world space
    normals_cam = normals @ views[:, :3, :3].transpose(1, 2).float()  # (B, V, 3) camera space
    attributes = torch.cat([canonical.expand(len(posed), -1, -1), normals_cam], dim=-1)  # (B, V, 6)
    out = render_layers(attributes, posed, faces, views.float(), projection_from_focal(focals.float()),
                        size, 1, backend="cpu", workers=1)[:, :, :, 0]  # (B, H, W, 6 + 4)
    alpha = out[..., -1:]
    albedo = 0.5 + 0.45 * out[..., :3] / torch.tensor([TUBE_LENGTH / 2, 0.3, 0.3])
    shade = 0.25 + 0.75 * out[..., 5:6].abs()  # camera-space normal z: facing the camera is bright
    rgb = (albedo.clamp(0, 1) * shade * alpha + 0.1 * (1 - alpha)) * 255  # dark grey background
    return rgb.round().to(torch.uint8).numpy(), (alpha[..., 0] * 255).to(torch.uint8).numpy()


def _save_png(path: Path, image: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_mask(path: Path, inside: np.ndarray, encoding: str) -> None:
    """Write an (H, W) bool mask as a PNG in one of `MASK_ENCODINGS`."""
    values = {"0-255": inside.astype(np.uint8) * 255, "0-1": inside.astype(np.uint8), "1-bit": inside}
    _save_png(path, values[encoding])


def save_pose(path: Path, pose: np.ndarray, dtype: str) -> None:
    """Write an (N, 7) pose file with its values stored as `dtype` (one of `POSE_DTYPES`)."""
    if dtype == "float64":
        write_pose_file(path, pose)  # what the project writes
    else:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{POSE_KEY: np.asarray(pose, dtype=dtype)})


def make_source_dataset(
    root: str | Path,
    num_samples: int = 8,
    models: int | Sequence[str] = 1,
    image_size: int = 64,
    seed: int = 0,
    bad: Mapping[str, str] | None = None,
    val: int = 0,
    rgb: bool = True,
    masks: bool = True,
    feature_channels: int = 0,
    feature_grid: int = 8,
    mask_encodings: Sequence[str] = ("0-255",),
    pose_dtypes: Sequence[str] = ("float64",),
    unit: float = 1.0,
) -> GeneratedDataset:
    """Write a small dataset in the reference layout under `root` and describe it.

    Args:
        num_samples: samples, ids `sample_id(0..num_samples-1)`, assigned to models round robin.
        models: number of models (named tube0, tube1, ... with different vertex counts) or names.
        image_size: side of the RGB and mask PNGs in pixels.
        bad: sample id -> one of `BAD_KINDS`, the problem injected into that sample.
        val: the last `val` ids are listed in splits/val.txt.
        rgb, masks: write renders/<id>_rgb.png and masks/<id>_mask.png.
        feature_channels: if > 0, also write features/<id>_feat.png packed features of that many
            channels on a `feature_grid` square grid (deterministic pseudo-random values in [-1, 1]).
        mask_encodings, pose_dtypes: the k-th sample's mask / pose file is written in entry k modulo
            the length (`MASK_ENCODINGS`, `POSE_DTYPES`).
        unit: scene units per metre of the files written (100: meshes, pose translations and cameras
            in cm); images, masks and everything drawn at random are those of `unit=1`.
    """
    root = Path(root)
    bad = dict(bad or {})
    names = [f"tube{i}" for i in range(models)] if isinstance(models, int) else list(models)
    if not names or num_samples < 1 or not 0 <= val <= num_samples:
        raise ValueError(
            f"need >= 1 model, >= 1 sample and 0 <= val <= num_samples; got {names}, {num_samples}, {val}"
        )
    ids = [sample_id(i) for i in range(num_samples)]
    unknown = {k: v for k, v in bad.items() if k not in ids or v not in BAD_KINDS}
    if unknown:
        raise ValueError(f"bad samples {unknown} are not generated ids with a kind in {BAD_KINDS}")
    layout = Layout(root)
    for sub in ("shapes", "poses", "cameras", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model_of = {}
    for m, name in enumerate(names):
        mesh = tube_mesh(name, rings=14 + 2 * m, segments=12, radius=0.25 + 0.03 * m)
        layout.mesh(name).parent.mkdir(parents=True, exist_ok=True)
        save_skinned_mesh(mesh if unit == 1.0 else scaled_mesh(mesh, unit), layout.mesh(name))
        mine = [i for k, i in enumerate(ids) if k % len(names) == m]
        if not mine:
            continue
        poses = _random_poses(mesh, len(mine), rng)
        cameras = [_camera(rng, bad.get(i) == "camera_away") for i in mine]
        views = torch.stack([v for v, _ in cameras])  # (B, 4, 4) float64
        focals = torch.tensor([f for _, f in cameras], dtype=torch.float64)
        posed = skin(mesh, poses)  # (B, V, 3)
        if rgb or masks:
            images, mask_images = _images(mesh, posed, views, focals, image_size)
        for b, i in enumerate(mine):
            k = ids.index(i)
            model_of[i] = BROKEN_MODEL if bad.get(i) == "broken_mesh" else name
            pose = poses[b].astype(np.float64)
            pose[:, 4:] *= unit
            save_pose(layout.pose(i), pose, pose_dtypes[k % len(pose_dtypes)])
            view = views[b].clone()
            view[:3, 3] *= unit  # the camera sits at `unit` times its position, turned the same way
            atomic_write_text(layout.camera(i), format_camera_txt(camera_pose_from_view(view).numpy()))
            meta = SampleMetadata(model_of[i], float(focals[b]))
            atomic_write_text(layout.metadata(i), format_metadata(meta))
            if rgb:
                _save_png(layout.rgb(i), images[b])
            if masks:
                save_mask(layout.mask(i), mask_images[b] > 0, mask_encodings[k % len(mask_encodings)])
    for i, kind in bad.items():
        if kind == "corrupt_pose":
            atomic_write_bytes(layout.pose(i), b"this is not an npz archive")
        elif kind == "pose_node_count":
            pose = np.concatenate([rest_pose(tube_mesh("x")), [[1, 0, 0, 0, 0, 0, 0]]]).astype(np.float32)
            write_pose_file(layout.pose(i), pose)
        elif kind == "bad_metadata":
            atomic_write_text(layout.metadata(i), f"model_name: {model_of[i]}\n")
    if "broken_mesh" in bad.values():
        layout.mesh(BROKEN_MODEL).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(layout.mesh(BROKEN_MODEL), '{"asset": {"version": "2.0"}, "meshes": [')
    if feature_channels > 0:
        from dualpm.features.precomputed import write_packed  # only when asked: optional module

        (root / "features").mkdir(exist_ok=True)
        for i in ids:
            values = rng.uniform(-1, 1, (feature_channels, feature_grid, feature_grid)).astype(np.float32)
            write_packed(layout.feature(i), values)
    val_ids = ids[num_samples - val :] if val else []
    if val_ids:
        (root / "splits").mkdir(exist_ok=True)
        atomic_write_text(layout.split("val"), "".join(f"{i}\n" for i in val_ids))
    return GeneratedDataset(root=root, ids=ids, model_of=model_of, val_ids=val_ids, bad=bad)


def cli_output(command: click.Command, *args: object, exit_code: int = 0) -> str:
    """Invoke `command` with `args` (str()-ed), assert its exit code, return what it printed."""
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return result.output
