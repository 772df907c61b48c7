"""A user rig as given: its files copied into the dataset, its look and its animation clips per sample.

`copy_asset` puts the user's .gltf/.glb and every file it refers to (buffers, images; relative URIs
only, never outside the file's folder: `dualpm.gltf_io.uri_bytes` rules) into
`shapes/<model>/asset/`, byte for byte, next to `<model>_shape.gltf` (the scaled single-primitive
mesh the reference reader loads). Samples are rendered from that copy, so a dataset carries what made
it. `choose_look` and `choose_pose` draw, per sample, the look (`--appearance mixed`) and the pose
source (`--poses mixed`): a clip of the rig and a time in it, sampled by `dualpm.animation`.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from dualpm.animation import AnimationClip, sample_clip
from dualpm.errors import GltfError
from dualpm.fileio import UnsafePathError, atomic_write_bytes, safe_join
from dualpm.gltf import SkinnedMesh
from dualpm.gltf_io import read_document

APPEARANCES = ("auto", "asset", "procedural", "mixed")
POSE_SOURCES = ("auto", "random", "clips", "mixed")
ASSET_FOLDER = "asset"


def referenced_files(path: Path) -> list[str]:
    """Relative URIs (unquoted) of the buffers and images a .gltf/.glb refers to (data: URIs excluded)."""
    doc, _ = read_document(path)
    uris = [b.uri for b in doc.buffers or []] + [i.uri for i in doc.images or []]
    return sorted({urllib.parse.unquote(u) for u in uris if u and not u.startswith("data:")})


def copy_asset(source: Path, folder: Path) -> Path:
    """Copy `source` and its referenced files into `folder` (same relative layout); returns the copy."""
    for rel in referenced_files(source):
        try:
            src, dst = safe_join(source.parent, rel), safe_join(folder, rel)
        except UnsafePathError as err:
            raise GltfError(f"{source}: {err}") from err
        if not src.is_file():
            raise GltfError(f"{source}: referenced file {rel!r} not found")
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dst, src.read_bytes())
    target = folder / source.name
    atomic_write_bytes(target, source.read_bytes())  # last: its presence means the copy is complete
    return target


def choose_look(appearance: str, has_material: bool, rng: np.random.Generator) -> str:
    """'asset' or 'procedural' for one sample (`mixed`: half and half, when the rig has a material)."""
    if not has_material or appearance == "procedural":
        return "procedural"
    if appearance == "mixed":
        return "asset" if rng.random() < 0.5 else "procedural"
    return "asset"  # auto or asset


@dataclass(frozen=True)
class ClipChoice:
    clip: str
    time: float  # seconds, in the clip's own time


def choose_pose(poses: str, clips: tuple[AnimationClip, ...], mesh: SkinnedMesh,
                rng: np.random.Generator, jitter_deg: float = 0.0) -> tuple[np.ndarray, ClipChoice] | None:
    """A clip pose for one sample, or None when this sample takes a random pose.

    `poses`: random -> None; clips -> always a clip; mixed / auto -> a clip half the time (auto and
    mixed without clips: None). Draws: one uniform (mixed), the clip, the time, then (jitter_deg > 0)
    per skin joint a rotation about a uniformly random axis by an angle uniform in [0, jitter_deg]
    degrees, applied after the clip's local rotation.
    """
    if poses == "random" or not clips:
        return None
    if poses in ("mixed", "auto") and rng.random() >= 0.5:
        return None
    clip = clips[int(rng.integers(len(clips)))]
    time = float(rng.uniform(clip.start, clip.end)) if clip.end > clip.start else clip.start
    pose = sample_clip(clip, mesh, time)
    if jitter_deg > 0:
        joints = mesh.joint_nodes
        axis = rng.normal(size=(len(joints), 3))
        axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-12)
        angle = np.radians(jitter_deg) * rng.random(len(joints))
        delta = Rotation.from_rotvec(axis * angle[:, None])
        turned = Rotation.from_quat(np.roll(pose[joints, :4], -1, axis=1)) * delta  # SciPy: [x, y, z, w]
        quat = np.roll(turned.as_quat(), 1, axis=1)
        quat[quat[:, 0] < 0] *= -1
        pose[joints, :4] = quat
    return pose, ClipChoice(clip.name, time)
